"""Metadata trust with the real daemons: signed and expiring manifests, the robot's grace
while the WAN is down, key rotation, and the dashboard serving manifest and bundle as a pair.

Time is never waited for: releases are built already expired (`--expires-in -1`) or
short-lived, and a robot is played days into the future with OTAD_TEST_CLOCK_SKEW
(the test-only clock hook of otad/trust/clock.py).
"""
from __future__ import annotations

import json
import threading

import requests

from conftest import otad_release
from fleet import fetch_release, served_manifest, wait_for_version
from harness import wait_until
from invariants import current_version
from otad.demo.faultproxy import FaultProxy
from otad.errors import TrustError
from otad.transfer.client import HttpClient
from otad.trust.keys import load_public_key_files
from otad.trust.metadata import verify_manifest
from otad.trust.verify import TrustAnchors

DAY = 86400


def anchors(*pubs) -> TrustAnchors:
    return TrustAnchors(cosign_keys=tuple(load_public_key_files([str(p) for p in pubs])))


def keygen(site, name: str):
    prefix = site.root / name
    assert otad_release("keygen", "--output-prefix", str(prefix)).returncode == 0
    return prefix.with_suffix(".key"), prefix.with_suffix(".pub")


# -- the dashboard's pair -------------------------------------------------------------------
def test_dashboard_serves_the_manifest_and_its_bundle_as_one_verifiable_pair(site):
    site.release("1.0.0")
    url = site.dashboard.url
    for manifest_path, bundle_path in (("/manifest", "/manifest.bundle"), ("/ota/manifest.json", "/ota/manifest.json.bundle")):
        manifest, bundle = requests.get(url + manifest_path, timeout=5), requests.get(url + bundle_path, timeout=5)
        assert manifest.status_code == bundle.status_code == 200
        signed = verify_manifest(manifest.content, bundle.content, anchors(site.pub), now=None)
        assert signed.manifest.version == "1.0.0" and signed.key == "release.pub"
    etag = requests.get(url + "/manifest.bundle", timeout=5).headers["ETag"]
    assert requests.get(url + "/manifest.bundle", headers={"If-None-Match": etag}, timeout=5).status_code == 304


def test_a_reader_racing_publishes_always_gets_a_pair_that_verifies(site):
    """Manifest and bundle are two GETs; publishes land between them. The client's one
    retry (HttpClient.verified_manifest) must always come back with a verified pair."""
    outs = [site.build(v) for v in ("1.0.0", "1.1.0", "1.2.0")]
    site.publish(outs[0])
    trust, client, seen, errors, done = anchors(site.pub), HttpClient(site.dashboard.url), set(), [], threading.Event()

    def reader():
        while not done.is_set():
            body = client.get_small("/manifest", 65536).body
            try:
                signed, _, _ = client.verified_manifest(body, lambda m, b: verify_manifest(m, b, trust, now=None))
                seen.add(signed.manifest.version)
            except TrustError as exc:
                errors.append(str(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(4):  # bounded: 12 publishes
            for out in outs:
                site.publish(out)
    finally:
        done.set()
        thread.join(30)
        client.close()
    assert errors == []
    assert len(seen) >= 2, seen


# -- the gateway refuses, and keeps serving ----------------------------------------------
def test_gateway_refuses_an_expired_manifest_and_keeps_serving(site):
    site.release("1.0.0")
    gw = site.gateway().start()
    wait_for_version(gw.url, "1.0.0")
    site.release("2.0.0", args=("--expires-in", "-1"))
    line = gw.wait_for_log(r"rejected app 2\.0\.0: (.*)")[1]
    assert line.startswith("manifest expired at ") and "24 hours ago; keeping app 1.0.0" in line, line
    assert served_manifest(gw.url)["version"] == "1.0.0"
    assert requests.get(f"{gw.url}/ota/app-v2.0.0.tar.gz", timeout=5).status_code == 404
    assert "downloading app 2.0.0" not in gw.log()  # refused before a byte of the artifact moved


def test_gateway_refuses_an_unsigned_manifest(site):
    site.release("1.0.0")
    gw = site.gateway().start()
    wait_for_version(gw.url, "1.0.0")
    # An old-style publish: every file but manifest.json.bundle.
    out = site.build("2.0.0")
    (site.ota / "manifest.json.bundle").unlink()
    (out / "manifest.json.bundle").unlink()
    for name in ("app-v2.0.0.tar.gz", "app-v2.0.0.tar.gz.bundle", "app-v2.0.0.sha256", "manifest.json"):
        (site.ota / f".{name}.tmp").write_bytes((out / name).read_bytes())
        (site.ota / f".{name}.tmp").rename(site.ota / name)
    assert site.dashboard.wait_for_log(r"has no manifest\.json\.bundle: gateways will refuse")
    line = gw.wait_for_log(r"rejected app 2\.0\.0: (.*)")[1]
    assert line.startswith("manifest is not signed: GET ") and "HTTP 404" in line, line
    assert served_manifest(gw.url)["version"] == "1.0.0"
    fetch_release(gw.url, served_manifest(gw.url))
    assert gw.running()


# -- the robot's grace while the WAN is down ------------------------------------------------
def test_robot_accepts_a_manifest_expired_within_its_grace_and_refuses_beyond(site):
    """The gateway verified 2.0.0 while it was fresh (expires in 2 days), then lost the WAN.
    Three days later a robot that was off comes up: within a 2-day grace it installs what
    the gateway holds; a robot whose grace is half a day refuses, and keeps what it runs."""
    site.release("2.0.0", args=("--expires-in", "2"))
    gw = site.gateway().start()
    wait_for_version(gw.url, "2.0.0")
    site.dashboard.stop()
    gw.wait_for_log("sync failed")
    later = {"OTAD_TEST_CLOCK_SKEW": str(3 * DAY)}
    patient = site.robot(gw.url, name="patient", env=later, MANIFEST_GRACE_S=2 * DAY).start(wait_listening=False)
    strict = site.robot(gw.url, name="strict", env=later, MANIFEST_GRACE_S=DAY // 2).start(wait_listening=False)
    patient.wait_for_log("installed app 2.0.0", timeout=30)
    assert "accepting the manifest of app 2.0.0 although it expired 24 hours ago (within MANIFEST_GRACE_S=172800" in patient.log()
    line = strict.wait_for_log(r"rejected app 2\.0\.0: (.*)")[1]
    assert line.startswith("manifest expired at ") and "more than the 43200s grace" in line, line
    assert current_version(site.root / "patient-app") == "2.0.0"
    assert current_version(site.root / "strict-app") is None
    assert "downloading app 2.0.0" not in strict.log()
    events = [json.loads(p.read_text()) for p in (site.root / "strict-state" / "outbox").glob("*.json")]
    assert [(e["event"], e["version"]) for e in events] == [("rejected", "2.0.0")]


def test_gateway_warns_once_when_the_manifest_it_serves_has_expired(site):
    """Nobody re-signed the dashboard's manifest: the gateway keeps serving it (robots judge
    it with their grace) and tells the operator once, not at every poll."""
    site.release("1.0.0", args=("--expires-in", "1"))
    proxy = FaultProxy(("127.0.0.1", int(site.dashboard.url.rsplit(":", 1)[1])))  # counts the polls' bytes
    try:
        gw = site.gateway(dashboard_url=proxy.url).start()
        wait_for_version(gw.url, "1.0.0")
        gw.stop()
        gw.env["OTAD_TEST_CLOCK_SKEW"] = str(2 * DAY)
        gw.start()
        gw.wait_for_log(r"warning: the manifest of app 1\.0\.0 being served expired at .* \(24 hours ago\)")
        polled = proxy.downstream_bytes
        wait_until(lambda: proxy.downstream_bytes > polled + 3 * 150, 15, "three more polls")
        assert served_manifest(gw.url)["version"] == "1.0.0"
        assert gw.new_log().count("being served expired") == 1
    finally:
        proxy.close()


# -- key rotation ---------------------------------------------------------------------------------
def test_key_rotation_add_new_sign_with_new_remove_old(site):
    new_key, new_pub = keygen(site, "release-2027")
    both = f"{site.pub} {new_pub}"
    site.release("1.0.0")  # signed with the old key
    gw = site.gateway(TRUSTED_KEYS=both).start()
    gw.pin_port()  # the robot keeps its GATEWAY_URL across the restart below
    robot = site.robot(gw.url, TRUSTED_KEYS=both).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    # Step 2: CI signs with the new key; both keys are trusted fleet-wide.
    site.release("1.1.0", key=new_key)
    robot.wait_for_log("installed app 1.1.0")
    gw.wait_for_log("manifest signed by release-2027.pub")  # logged after the release is served, not before
    # Step 3: the old key is removed (restart); a release signed by it is refused from now on.
    for daemon, conf in ((gw, gw.config), (robot, robot.config)):
        daemon.stop()
        conf.write_text(conf.read_text().replace(f"TRUSTED_KEYS={both}", f"TRUSTED_KEYS={new_pub}"))
    gw.start()
    robot.start(wait_listening=False)
    wait_for_version(gw.url, "1.1.0")  # its cache re-check keeps what the new key signed
    site.release("1.2.0")  # the old key again: leaked, or a CI job not yet switched
    line = gw.wait_for_log(r"rejected app 1\.2\.0: (.*)")[1]
    assert line.startswith("manifest signature: signed by an unknown key") and "trusted: release-2027.pub" in line, line
    assert served_manifest(gw.url)["version"] == "1.1.0"
    site.release("1.3.0", key=new_key)
    robot.wait_for_log("installed app 1.3.0")
    assert current_version(site.root / "robot-app") == "1.3.0"


def test_refreshing_an_expired_release_gets_it_through(site):
    """CI forgot to refresh: the manifest expired before it was even published. `otad-release
    refresh` gives it a new expiry and signs it again; published again, the gateway takes it."""
    site.release("1.0.0")
    gw = site.gateway().start()
    wait_for_version(gw.url, "1.0.0")
    out = site.build("2.0.0", args=("--expires-in", "-1"))
    site.publish(out)
    gw.wait_for_log(r"rejected app 2\.0\.0: manifest expired at")
    before = json.loads((out / "manifest.json").read_text())
    refreshed = otad_release("refresh", "--from", str(out), "--expires-in", "7", "--key", str(site.key))
    assert refreshed.returncode == 0, refreshed.stderr
    after = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if k != "expires"} == {k: v for k, v in before.items() if k != "expires"}
    assert after["expires"] > before["expires"]
    site.publish(out)
    wait_for_version(gw.url, "2.0.0")
    assert served_manifest(gw.url)["expires"] == after["expires"]
