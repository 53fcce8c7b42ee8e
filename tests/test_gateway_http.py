"""The gateway's edge listener speaks HTTP as a CDN would, and serves nothing but verified files."""
from __future__ import annotations

import http.client
import socket

import pytest
import requests

from fleet import Site, rss_high_water_kib, wait_for_version


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import otad_release

    root = tmp_path_factory.mktemp("edge")
    prefix = root / "release"
    assert otad_release("keygen", "--output-prefix", str(prefix)).returncode == 0
    site = Site(root, prefix.with_suffix(".key"), prefix.with_suffix(".pub"))
    site.start_dashboard()
    manifest = site.release("1.0.0", size=300 * 1024)
    gw = site.gateway().start()
    wait_for_version(gw.url, "1.0.0")
    data = requests.get(f"{gw.url}/ota/{manifest['artifact']}", timeout=10).content
    yield site, gw, manifest, data
    site.stop_all()


def raw_get(url: str, target: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("GET", target, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_etag_and_conditional_get(served):
    _, gw, manifest, data = served
    url = f"{gw.url}/ota/{manifest['artifact']}"
    first = requests.get(url, timeout=10)
    assert first.headers["Accept-Ranges"] == "bytes" and first.headers["Last-Modified"]
    etag = first.headers["ETag"]
    again = requests.get(url, headers={"If-None-Match": etag}, timeout=10)
    assert again.status_code == 304 and again.content == b""
    manifest_response = requests.get(f"{gw.url}/manifest", timeout=10)
    assert requests.get(f"{gw.url}/manifest", headers={"If-None-Match": manifest_response.headers["ETag"]}, timeout=10).status_code == 304


def test_ranges(served):
    _, gw, manifest, data = served
    url = f"{gw.url}/ota/{manifest['artifact']}"
    part = requests.get(url, headers={"Range": "bytes=100-199"}, timeout=10)
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = requests.get(url, headers={"Range": "bytes=-50"}, timeout=10)
    assert tail.status_code == 206 and tail.content == data[-50:]
    open_end = requests.get(url, headers={"Range": f"bytes={len(data) - 10}-"}, timeout=10)
    assert open_end.content == data[-10:]
    beyond = requests.get(url, headers={"Range": f"bytes={len(data)}-"}, timeout=10)
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{len(data)}"
    etag = part.headers["ETag"]
    assert requests.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}, timeout=10).status_code == 206
    stale = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'}, timeout=10)
    assert stale.status_code == 200 and stale.content == data


def test_head_has_headers_and_no_body(served):
    _, gw, manifest, data = served
    head = requests.head(f"{gw.url}/ota/{manifest['artifact']}", timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(data)


@pytest.mark.parametrize(
    "target",
    ["/ota/../setup.py", "/ota/%2e%2e/x", "/ota/..%2fsetup.py", "/ota/%2Fetc%2Fpasswd", "/ota//etc/passwd",
     "/ota/.hidden", "/ota/manifest.json/../../x", "/ota/app-v9.9.9.tar.gz", "/ota/%00", "/etc/passwd", "/ota/"],
)
def test_nothing_but_cached_verified_files_is_served(served, target):
    _, gw, _, _ = served
    status, body = raw_get(gw.url, target)
    assert status == 404
    assert body.startswith(b'{"error"')


def test_write_methods_are_refused(served):
    _, gw, _, _ = served
    response = requests.post(f"{gw.url}/manifest", data=b"x", timeout=10)
    assert response.status_code == 405 and response.json()["error"]


def test_garbage_request_does_not_stop_the_listener(served):
    _, gw, _, _ = served
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01garbage that is not http\r\n\r\n")
        sock.recv(1024)
    assert requests.get(f"{gw.url}/healthz", timeout=5).json()["release"] == "1.0.0"


def test_large_download_keeps_the_gateway_small(tmp_path, keypair):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    site.start_dashboard()
    try:
        manifest = site.release("1.0.0", size=64 * 1024 * 1024)
        gw = site.gateway(READ_TIMEOUT=30).start()
        wait_for_version(gw.url, "1.0.0", timeout=60)
        received = 0
        with requests.get(f"{gw.url}/ota/{manifest['artifact']}", stream=True, timeout=30) as response:
            for chunk in response.iter_content(1 << 20):
                received += len(chunk)
        assert received == manifest["size"]
        assert rss_high_water_kib(gw.proc.pid) < 80 * 1024
    finally:
        site.stop_all()
