"""Regression (found by the fault tests, issue 9): a robot whose download is cut must resume it.

The worker noted the manifest's ETag before downloading; when the transfer was
cut, every later poll got `304 Not Modified` and the robot never tried again
until the gateway's manifest changed. Here, on loopback without root: a real
dashboard and gateway, and a fault proxy between the robot and the gateway that
cuts the first connection half way through the artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
from urllib.parse import urlsplit

import pytest
import requests

from fleet import Site, wait_for_version
from harness import wait_until
from invariants import current_version
from otad.demo.faultproxy import FaultProxy
from otad.transfer import client as client_module
from otad.transfer.client import HttpClient


def test_robot_resumes_a_download_cut_half_way(tmp_path, keypair):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    site.start_dashboard()
    try:
        gateway = site.gateway().start()
        size = 1024 * 1024
        site.release("1.0.0", size=size)
        wait_for_version(gateway.url, "1.0.0")
        edge = urlsplit(gateway.url)
        proxy = FaultProxy((edge.hostname, edge.port))
        proxy.cut_connections(1, after_bytes=size // 2)  # manifest, bundle, checksum, then half the artifact
        try:
            robot = site.robot(proxy.url).start(wait_listening=False)
            robot.wait_for_log(r"gateway unreachable, retrying in \d+s: GET \S+/ota/app-v1\.0\.0\.tar\.gz")
            wait_until(lambda: current_version(tmp_path / "robot-app") == "1.0.0", 30, "1.0.0 installed after the cut")
            assert proxy.cuts_done == 1
            assert robot.log().count("downloading app 1.0.0") == 2
            assert proxy.downstream_bytes < 1.25 * size, f"{proxy.downstream_bytes} bytes through the proxy: not resumed"
        finally:
            proxy.close()
    finally:
        site.stop_all()


class _Killed(BaseException):
    """Stands for SIGKILL or a power cut at one instant of the downloader."""


def test_a_kill_right_after_a_restart_from_zero_never_splices_two_files(site, tmp_path, monkeypatch):
    """Issue 13 (17): when the server's file had changed, the downloader wrote the new ETag
    to .meta before it truncated the .part, so a kill between the two left the old bytes
    under the new ETag, and the next resume spliced old and new. The instant lies between
    two writes a few microseconds apart, which a daemon cannot be stopped at on purpose
    (OTAD_TEST_CRASH_AT is the robot installer's, not the downloader's), so this drives
    the real HttpClient against a real dashboard and 'kills' it as .meta is written."""
    site.release("1.0.0", size=256 * 1024)
    name = "app-v1.0.0.tar.gz"
    old = (site.ota / name).read_bytes()
    client = HttpClient(site.dashboard.url)
    old_etag = requests.head(client.url(f"/ota/{name}"), timeout=5).headers["ETag"]
    part = tmp_path / "dl" / f"{name}.part"
    part.parent.mkdir()
    part.write_bytes(old[: len(old) // 2])  # half of the old file, as a cut download leaves it
    part.with_name(part.name + ".meta").write_text(json.dumps({"url": client.url(f"/ota/{name}"), "size": len(old), "etag": old_etag}))
    new = bytes(b ^ 0xFF for b in old)  # the server's file changes (same size, new ETag)
    (site.ota / f".{name}.tmp").write_bytes(new)
    os.replace(site.ota / f".{name}.tmp", site.ota / name)

    real_write = client_module.atomic_write_bytes

    def write_then_die(path, data):
        real_write(path, data)
        raise _Killed()

    monkeypatch.setattr(client_module, "atomic_write_bytes", write_then_die)
    with pytest.raises(_Killed):
        client.download(f"/ota/{name}", part, len(new))
    monkeypatch.setattr(client_module, "atomic_write_bytes", real_write)
    # Restarted: whatever the kill left, the download ends as the server's new file, whole.
    got = client.download(f"/ota/{name}", part, len(new))
    assert got.sha256 == hashlib.sha256(new).digest(), "old and new bytes spliced"
    assert part.read_bytes() == new
    client.close()
