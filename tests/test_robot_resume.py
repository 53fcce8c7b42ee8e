"""Regression (found by the fault tests, issue 9): a robot whose download is cut must resume it.

The worker noted the manifest's ETag before downloading; when the transfer was
cut, every later poll got `304 Not Modified` and the robot never tried again
until the gateway's manifest changed. Here, on loopback without root: a real
dashboard and gateway, and a fault proxy between the robot and the gateway that
cuts the first connection half way through the artifact.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from fleet import Site, wait_for_version
from harness import wait_until
from invariants import current_version
from otad.demo.faultproxy import FaultProxy


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
