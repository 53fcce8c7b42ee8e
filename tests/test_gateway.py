"""otad-gateway with a real dashboard on loopback: sync, verify, cache, serve, survive faults."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import threading

import pytest
import requests

from conftest import otad_release
from notify import NotifySocket
from otad.demo.faultproxy import FaultProxy
from harness import run_command, wait_until, write_config
from fleet import fetch_release, served_manifest, wait_for_version


def cached_files(gateway_state) -> set[str]:
    files = gateway_state / "cache" / "files"
    return {p.name for p in files.iterdir()} if files.exists() else set()


def test_gateway_caches_v1_then_switches_to_v2_within_a_poll(site):
    v1 = site.release("1.0.0")
    gw = site.gateway().start()
    wait_for_version(gw.url, "1.0.0")
    fetch_release(gw.url, v1)
    gw.wait_for_log("verified app 1.0.0")  # logged after the release is served, not before

    # A robot polling hard during the switch must only ever see complete, verified releases.
    seen, problems, done = set(), [], threading.Event()

    def robot():
        while not done.is_set():
            manifest = served_manifest(gw.url)
            if manifest is None:
                problems.append("manifest missing")
                continue
            seen.add(manifest["version"])
            try:
                fetch_release(gw.url, manifest)
            except AssertionError as exc:
                problems.append(f"{manifest['version']}: {exc}")

    checker = threading.Thread(target=robot)
    checker.start()
    try:
        v2 = site.release("2.0.0", size=2 * 1024 * 1024)
        wait_for_version(gw.url, "2.0.0", timeout=15)
        wait_until(lambda: "2.0.0" in seen, 10, "the robot to see 2.0.0")
    finally:
        done.set()
        checker.join(30)
    assert problems == []
    fetch_release(gw.url, v2)
    assert seen == {"1.0.0", "2.0.0"}


def test_download_resumes_over_five_cuts_without_refetching(site):
    proxy = FaultProxy(("127.0.0.1", int(site.dashboard.url.rsplit(":", 1)[1])))
    try:
        size = 6 * 1024 * 1024
        manifest = site.publish(site.build("1.0.0", size=size))
        proxy.cut_connections(5, after_bytes=size // 7)
        gw = site.gateway(dashboard_url=proxy.url).start()
        wait_for_version(gw.url, "1.0.0", timeout=60)
        assert proxy.cuts_done == 5
        fetch_release(gw.url, manifest)
        # Everything the gateway pulled, manifests and retries included, stays under 1.1x.
        assert proxy.downstream_bytes < 1.1 * manifest["size"], proxy.downstream_bytes
        assert gw.log().count("sync failed") >= 1
    finally:
        proxy.close()


def test_stalled_transfer_is_cut_and_resumed(site):
    proxy = FaultProxy(("127.0.0.1", int(site.dashboard.url.rsplit(":", 1)[1])))
    try:
        size = 4 * 1024 * 1024
        manifest = site.publish(site.build("1.0.0", size=size))
        proxy.cut_connections(1, after_bytes=size // 3)  # one cut, so a .part exists
        gw = site.gateway(dashboard_url=proxy.url).start()
        wait_until(lambda: proxy.cuts_done == 1, 30, "the first cut")
        proxy.stall()
        gw.wait_for_log(r"sync failed.*(too slow|ReadTimeout|Timeout|ConnectionError)", timeout=30)
        proxy.unstall()
        wait_for_version(gw.url, "1.0.0", timeout=60)
        fetch_release(gw.url, manifest)
        assert proxy.downstream_bytes < 1.5 * size
    finally:
        proxy.close()


@pytest.mark.parametrize("attack", ["tampered-artifact", "bad-bundle", "unknown-key", "lying-sha256", "edited-manifest"])
def test_untrusted_release_is_never_cached_or_served(site, tmp_path, attack):
    site.release("1.0.0")
    gw = site.gateway().start()
    wait_for_version(gw.url, "1.0.0")
    out = site.build("2.0.0")
    if attack == "tampered-artifact":
        reason = "sha256 is"
        site.publish_tampered(out)
    elif attack == "bad-bundle":
        bundle = json.loads((out / "app-v2.0.0.tar.gz.bundle").read_text())
        other = site.build("2.0.0-x") / "app-v2.0.0-x.tar.gz.bundle"
        bundle["messageSignature"]["signature"] = json.loads(other.read_text())["messageSignature"]["signature"]
        (out / "app-v2.0.0.tar.gz.bundle").write_text(json.dumps(bundle))
        reason = "signature does not verify"
        site.publish(out)
    elif attack == "unknown-key":
        stranger = tmp_path / "stranger"
        assert otad_release("keygen", "--output-prefix", str(stranger)).returncode == 0
        out = site.build("2.0.0", key=stranger.with_suffix(".key"))
        reason = "unknown key"
        site.publish(out)
    else:
        # Prepared first, swapped in right after publishing (the gateway polls every second).
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["sha256"] = hashlib.sha256(b"something else").hexdigest()
        tmp, tmp_bundle = site.ota / ".manifest.tmp", site.ota / ".manifest.bundle.tmp"
        tmp.write_text(json.dumps(manifest))
        if attack == "lying-sha256":  # the signer itself lies: the artifact's own digest still decides
            signed = otad_release("sign", "--key", str(site.key), "--bundle", str(tmp_bundle), str(tmp))
            assert signed.returncode == 0, signed.stderr
            reason = "sha256 is"
        else:  # edited without the key; the bundle's digest forged to match (else the dashboard would not pair them)
            bundle = json.loads((out / "manifest.json.bundle").read_text())
            digest = hashlib.sha256(tmp.read_bytes()).digest()
            bundle["messageSignature"]["messageDigest"]["digest"] = base64.b64encode(digest).decode()
            tmp_bundle.write_text(json.dumps(bundle))
            reason = "manifest signature: signature does not verify"
        # Published by hand, files first, so the gateway never sees the genuine 2.0.0 manifest.
        for name in ("app-v2.0.0.tar.gz", "app-v2.0.0.tar.gz.bundle"):
            (site.ota / name).write_bytes((out / name).read_bytes())
        (site.ota / "app-v2.0.0.sha256").write_text(f"{manifest['sha256']}  app-v2.0.0.tar.gz\n")
        os.replace(tmp_bundle if tmp_bundle.exists() else out / "manifest.json.bundle", site.ota / "manifest.json.bundle")
        os.replace(tmp, site.ota / "manifest.json")
    match = gw.wait_for_log(r"rejected app 2\.0\.0: (.*)")
    assert reason in match[1]
    assert served_manifest(gw.url)["version"] == "1.0.0"
    assert requests.get(f"{gw.url}/ota/app-v2.0.0.tar.gz", timeout=5).status_code == 404
    assert not any("2.0.0" in name for name in cached_files(site.root / "gw-state"))
    # Not retried every poll: the same bad manifest is looked at again only after a long backoff.
    marker = site.release("2.0.1")["version"]
    wait_for_version(gw.url, marker)
    assert gw.log().count("rejected app 2.0.0") == 1


def test_offline_restart_still_serves_cached_release(site):
    manifest = site.release("1.0.0", size=512 * 1024)
    gw = site.gateway().start()
    wait_for_version(gw.url, "1.0.0")
    site.dashboard.stop()
    gw.kill9()
    gw.start()
    wait_for_version(gw.url, "1.0.0", timeout=5)
    fetch_release(gw.url, manifest)
    gw.wait_for_log("sync failed")
    fetch_release(gw.url, manifest)


def test_refused_wan_keeps_serving_and_recovers(site):
    proxy = FaultProxy(("127.0.0.1", int(site.dashboard.url.rsplit(":", 1)[1])))
    try:
        site.release("1.0.0")
        gw = site.gateway(dashboard_url=proxy.url).start()
        wait_for_version(gw.url, "1.0.0")
        proxy.refuse()
        gw.wait_for_log("sync failed")
        site.release("1.1.0")
        fetch_release(gw.url, served_manifest(gw.url))
        assert served_manifest(gw.url)["version"] == "1.0.0"
        proxy.refuse(False)
        wait_for_version(gw.url, "1.1.0", timeout=20)
        gw.wait_for_log("dashboard reachable again")
    finally:
        proxy.close()


def test_gc_keeps_version_and_size_bounds_and_the_active_release(site):
    gw = site.gateway(CACHE_KEEP_VERSIONS=2, CACHE_MAX_MB=5).start()
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        site.release(version, size=1024 * 1024)
        wait_for_version(gw.url, version)
    state = site.root / "gw-state"
    wait_until(lambda: not any("1.0.0" in n for n in cached_files(state)), 10, "1.0.0 to be evicted")
    assert {n for n in cached_files(state) if n.endswith(".tar.gz")} == {"app-v1.1.0.tar.gz", "app-v1.2.0.tar.gz"}
    # Too big to fit beside the active release: refused, active kept.
    site.release("2.0.0", size=5 * 1024 * 1024)
    assert "does not fit in CACHE_MAX_MB=5" in gw.wait_for_log(r"rejected app 2\.0\.0: .*")[0]
    assert served_manifest(gw.url)["version"] == "1.2.0"
    # Shrink the budget below the active release alone (SIGHUP reload): only the active survives GC.
    write_config(gw.config, {**_config_values(gw.config), "CACHE_MAX_MB": 1, "CACHE_GC_INTERVAL": 1})
    gw.signal(signal.SIGHUP)
    gw.wait_for_log("reloaded config")
    wait_until(lambda: {n for n in cached_files(state) if n.endswith(".tar.gz")} == {"app-v1.2.0.tar.gz"}, 15, "GC down to the active release")
    fetch_release(gw.url, served_manifest(gw.url))


def _config_values(path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_systemd_notifications(site, tmp_path):
    site.release("1.0.0")
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        gw = site.gateway(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}).start()
        wait_for_version(gw.url, "1.0.0")
        wait_until(lambda: sum("WATCHDOG=1" in m for m in notify.drain()) >= 3, 10, "three watchdog pings")
        messages = notify.drain()
        ready = [m for m in messages if "READY=1" in m]
        assert ready, messages
        wait_until(lambda: any("STATUS=serving app 1.0.0" in m for m in notify.drain()), 10, "a STATUS line naming the release")
        assert gw.stop() == 0
        assert any("STOPPING=1" in m for m in notify.drain())
    finally:
        notify.close()


def test_a_notify_socket_nobody_reads_does_not_hang_the_daemon(site, tmp_path):
    """The kernel queues only ~10 datagrams: past that a blocking send would freeze the main loop."""
    notify = NotifySocket(tmp_path / "notify.sock")  # never drained
    try:
        gw = site.gateway(dashboard_url="http://127.0.0.1:9", env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "20000"})
        gw.start()
        gw.wait_for_log("ready")
        wait_until(lambda: _datagram_queue_full(notify.path), 20, "the notify queue to fill with pings")
        assert requests.get(f"{gw.url}/healthz", timeout=5).status_code == 200
        assert gw.stop(timeout=10) == 0
    finally:
        notify.close()


def _datagram_queue_full(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    probe.setblocking(False)
    try:
        probe.sendto(b"X-PROBE=1", path)
        return False
    except BlockingIOError:
        return True
    finally:
        probe.close()


def test_ready_comes_after_the_listener_is_bound(site, tmp_path):
    """READY=1 must mean robots can connect: the listener answers as soon as READY arrives."""
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        gw = site.gateway(env={"NOTIFY_SOCKET": notify.path}).start(wait_listening=False)
        wait_until(lambda: any("READY=1" in m for m in notify.drain()), 20, "READY=1")
        url = gw.wait_for_log(r"listening on (http://\S+)", timeout=1)[1]
        assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
    finally:
        notify.close()


@pytest.mark.parametrize(
    "key,value,named",
    [("POLL_INTERVAL", "abc", "POLL_INTERVAL"), ("TRUSTED_KEYS", "/nonexistent/key.pub", "TRUSTED_KEYS"),
     ("LISTEN", "nowhere", "LISTEN"), ("DASHBOARD_URL", "ftp://x", "DASHBOARD_URL"), ("CACHE_KEEP_VERSIONS", "0", "CACHE_KEEP_VERSIONS"),
     # Site orchestration (issue 16): each key's own parser, its one line naming the key.
     ("SITE_MAX_CONCURRENT", "12x", "SITE_MAX_CONCURRENT"), ("ROBOT_GROUPS", "a=r1 min_available=3", "ROBOT_GROUPS"),
     ("MAINTENANCE_WINDOWS", "Mon 25:00-01:00", "MAINTENANCE_WINDOWS"), ("SITE_TIMEZONE", "../../etc/passwd", "SITE_TIMEZONE"),
     ("LEASE_TTL_S", "100000", "LEASE_TTL_S")],
)
def test_bad_config_stops_start_up_naming_the_key(site, key, value, named):
    gw = site.gateway(**{key: value})
    for args in (["--check-config"], []):
        result = run_command("otad-gateway", "--config", str(gw.config), *args, timeout=30)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], result.stderr


def test_environment_overrides_the_file_and_check_config_passes(site):
    gw = site.gateway(POLL_INTERVAL="abc")
    result = run_command("otad-gateway", "--config", str(gw.config), "--check-config", env={"POLL_INTERVAL": "5"})
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_unknown_key_in_file_is_an_error(site):
    gw = site.gateway(POLL_INTERVALL=5)
    result = run_command("otad-gateway", "--config", str(gw.config), "--check-config")
    assert result.returncode == 1 and "unknown key POLL_INTERVALL" in result.stderr


def test_a_release_refused_for_cache_size_is_fetched_at_once_when_cache_max_mb_is_raised(site):
    """Issue 13 (8): the gateway kept the ETag of a manifest it had refused (CacheFull), so
    every later poll was a 304 and it never downloaded, even after the operator raised
    CACHE_MAX_MB and reloaded. The refusal must hold back the download (not every poll),
    and a SIGHUP must look at the manifest again at once. Also: the message said "0 MiB"."""
    proxy = FaultProxy(("127.0.0.1", int(site.dashboard.url.rsplit(":", 1)[1])))  # counts the polls' bytes
    try:
        site.release("1.0.0", size=700 * 1024)
        gw = site.gateway(dashboard_url=proxy.url, CACHE_MAX_MB=1).start()
        wait_for_version(gw.url, "1.0.0")
        site.release("2.0.0", size=700 * 1024)
        line = gw.wait_for_log(r"rejected app 2\.0\.0: (.*)")[1]
        assert line.startswith("0.7 MiB does not fit in CACHE_MAX_MB=1 beside the active 1.0.0 (0.7 MiB)"), line
        # Held back: three more polls, and no second refusal.
        polled = proxy.downstream_bytes
        wait_until(lambda: proxy.downstream_bytes > polled + 3 * 150, 15, "three more polls")
        assert gw.log().count("rejected app 2.0.0") == 1
        # The operator makes room and reloads: the gateway takes 2.0.0 now, not in 10 minutes.
        write_config(gw.config, {**_config_values(gw.config), "CACHE_MAX_MB": 10})
        gw.signal(signal.SIGHUP)
        wait_for_version(gw.url, "2.0.0", timeout=15)
        fetch_release(gw.url, served_manifest(gw.url))
    finally:
        proxy.close()
