"""TLS on both links, with the real daemons: gateway -> dashboard through a real nginx
(the dashboard's TLS terminator, docs/security.md) with mutual TLS, and robots and
agents -> the gateway's own TLS edge listener with client certificates.

Certificates come from a throwaway CA made here with `cryptography`. nginx is
Debian's (`make tls-deps`); without it the nginx tests skip and say why.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet import Site, dashboard_records, metric, robot_token, wait_for_version, write_tokens
from harness import Daemon, run_command, wait_until, write_config

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx not installed (make tls-deps: apt-get install nginx-light)")


# -- a throwaway PKI ---------------------------------------------------------------------
class Pki:
    def __init__(self, root: Path, name: str = "otad test CA") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                                  key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = root / f"{name.replace(' ', '-')}.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), client: bool = False,
              days: int = 30) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        sans = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.root / f"{name}.crt", self.root / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path


# -- nginx in front of the dashboard ---------------------------------------------------------
NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {client_ca};
        ssl_verify_client on;
        client_max_body_size 8m;
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, root: Path, upstream: str, cert: Path, key: Path, client_ca: Path) -> None:
        self.prefix = root / "nginx"
        (self.prefix / "tmp").mkdir(parents=True)
        self.proc: subprocess.Popen | None = None
        for _ in range(5):  # nginx cannot bind port 0 and say which it got: pick one, retry if taken
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            conf = self.prefix / "nginx.conf"
            conf.write_text(NGINX_CONF.format(prefix=self.prefix, port=port, cert=cert, key=key, client_ca=client_ca,
                                              upstream=upstream.removeprefix("http://")))
            log = open(self.prefix / "stderr.log", "ab")
            self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-e", str(self.prefix / "error.log"), "-c", str(conf)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            self.url = f"https://127.0.0.1:{port}"
            if wait_until(lambda: self._state(port), 20, "nginx to listen") == "up":
                return
            self.proc.wait(5)
        raise AssertionError(f"nginx did not start: {self.error_log()[-2000:]}")

    def _state(self, port: int) -> str | None:
        if self.proc.poll() is not None:
            return "exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return "up"
        except OSError:
            return None

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def fronted(tmp_path, keypair, pki):
    """A real dashboard on loopback behind a real nginx doing TLS with client certificates."""
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    site.tokens = write_tokens(tmp_path, ["r1"])
    site.start_dashboard(TOKENS_FILE=site.tokens["dashboard"])
    server_cert, server_key = pki.issue("dashboard")
    site.nginx = Nginx(tmp_path, site.dashboard.url, server_cert, server_key, pki.ca_file)
    site.pki = pki
    yield site
    site.stop_all()
    site.nginx.stop()


def start_https_gateway(site: Site, name: str = "gw", dashboard_url: str | None = None, **overrides) -> Daemon:
    """A gateway whose listener may be https://: the harness waits for http:// only."""
    dashboard_url = dashboard_url or (site.nginx.url if hasattr(site, "nginx") else None)
    gw = site.gateway(dashboard_url=dashboard_url, name=name, **overrides)
    gw.start(wait_listening=False)
    gw.url = gw.wait_for_log(r"listening on (https?://\S+)")[1]
    return gw


@needs_nginx
def test_gateway_syncs_and_forwards_over_mutual_tls_through_nginx(fronted):
    site, pki = fronted, fronted.pki
    cert, key = pki.issue("gw-client", hosts=(), client=True)
    gw = start_https_gateway(site, DASHBOARD_CA_FILE=pki.ca_file, CLIENT_CERT=cert, CLIENT_KEY=key,
                             TOKEN_FILE=site.tokens["gateway_own"], ROBOT_TOKENS_FILE=site.tokens["robots"])
    manifest = site.release("1.0.0")
    wait_for_version(gw.url, "1.0.0")
    data = requests.get(f"{gw.url}/ota/{manifest['artifact']}", timeout=10).content
    assert len(data) == manifest["size"]

    posted = requests.post(f"{gw.url}/metrics", json={"records": [metric("r1", 1)]}, timeout=10,
                           headers={"Authorization": f"Bearer {robot_token('r1')}"})
    assert posted.status_code == 200
    db = site.root / "dashboard-state" / "telemetry.db"
    wait_until(lambda: db.exists() and len(dashboard_records(db)) == 1, 20, "the record at the dashboard via nginx")
    assert "is plain HTTP" not in gw.log()
    assert "GET /manifest HTTP/1.1\" 200" in (site.nginx.prefix / "access.log").read_text()


@needs_nginx
@pytest.mark.parametrize("problem", ["untrusted-ca", "wrong-host", "no-ca-file"])
def test_gateway_refuses_a_dashboard_certificate_it_cannot_verify(tmp_path, keypair, pki, problem):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    site.start_dashboard()
    site.release("1.0.0")
    hosts = ("dashboard.example.com",) if problem == "wrong-host" else ("127.0.0.1", "localhost")
    server_cert, server_key = pki.issue("dashboard", hosts=hosts)
    site.nginx = Nginx(tmp_path, site.dashboard.url, server_cert, server_key, pki.ca_file)
    try:
        cert, ckey = pki.issue("gw-client", hosts=(), client=True)
        ca = Pki(tmp_path / "other-pki", "another CA").ca_file if problem == "untrusted-ca" else pki.ca_file
        ca_setting = {} if problem == "no-ca-file" else {"DASHBOARD_CA_FILE": ca}
        gw = start_https_gateway(site, CLIENT_CERT=cert, CLIENT_KEY=ckey, **ca_setting)
        line = gw.wait_for_log(r"sync failed, retrying in \d+s: (.*)")[1]
        assert "SSLError" in line and "certificate verify failed" in line.lower(), line
        if problem == "wrong-host":
            assert "hostname" in line.lower() or "ip address mismatch" in line.lower(), line
        response = requests.get(f"{gw.url}/manifest", timeout=5)
        assert response.status_code == 404 and response.json()["error"]
        files = tmp_path / "gw-state" / "cache" / "files"
        assert not files.exists() or not any(files.iterdir())
        assert gw.running()
    finally:
        site.stop_all()
        site.nginx.stop()


@needs_nginx
def test_nginx_refuses_a_gateway_without_a_client_certificate(fronted):
    site = fronted
    site.release("1.0.0")
    gw = start_https_gateway(site, DASHBOARD_CA_FILE=site.pki.ca_file)
    line = gw.wait_for_log(r"sync failed, retrying in \d+s: (.*)")[1]
    assert "HTTP 400" in line, line  # nginx: "No required SSL certificate was sent"
    assert requests.get(f"{gw.url}/manifest", timeout=5).status_code == 404
    assert "client sent no required SSL certificate" in site.nginx.error_log()


def test_robot_and_agent_use_the_gateways_tls_listener_with_client_certificates(tmp_path, keypair, pki):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    tokens = write_tokens(tmp_path, ["robot"])
    site.start_dashboard(TOKENS_FILE=tokens["dashboard"])
    edge_cert, edge_key = pki.issue("gateway")
    try:
        gw = start_https_gateway(site, TLS_CERT=edge_cert, TLS_KEY=edge_key, TLS_CLIENT_CA=pki.ca_file,
                                 TOKEN_FILE=tokens["gateway_own"], ROBOT_TOKENS_FILE=tokens["robots"])
        assert gw.url.startswith("https://127.0.0.1:")
        site.release("1.0.0")
        cert, ckey = pki.issue("robot-client", hosts=(), client=True)
        tls = {"GATEWAY_CA_FILE": pki.ca_file, "CLIENT_CERT": cert, "CLIENT_KEY": ckey}
        robot = site.robot(gw.url, **tls).start(wait_listening=False)
        robot.wait_for_log("installed app 1.0.0", timeout=30)
        assert "is plain HTTP" not in robot.log()
        agent = site.agent(gw.url, **tls).start(wait_listening=False)
        db = tmp_path / "dashboard-state" / "telemetry.db"
        wait_until(lambda: db.exists() and any(r[0] == "robot" for r in dashboard_records(db)), 30,
                   "the agent's records at the dashboard, via the TLS edge")
        assert agent.running()

        # No client certificate: the handshake fails, nothing is served, the gateway says why.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{gw.url}/manifest", verify=str(pki.ca_file), timeout=5)
        gw.wait_for_log(r"TLS handshake with 127\.0\.0\.1 failed")
        # Plain HTTP spoken to the TLS port gets no answer either.
        with pytest.raises(requests.RequestException):
            requests.get(gw.url.replace("https", "http") + "/manifest", timeout=5)
        # With one, the listener answers as before (sendfile falls back to send() under TLS).
        with_cert = requests.get(f"{gw.url}/healthz", verify=str(pki.ca_file), cert=(str(cert), str(ckey)), timeout=5)
        assert with_cert.json()["release"] == "1.0.0"
        assert gw.running()
    finally:
        site.stop_all()


def test_plain_http_is_allowed_with_a_one_line_warning(tmp_path, keypair):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    site.start_dashboard()
    try:
        gw = site.gateway().start()
        site.release("1.0.0")
        wait_for_version(gw.url, "1.0.0")
        warnings = [line for line in gw.log().splitlines() if "is plain HTTP" in line]
        assert len(warnings) == 1 and warnings[0].startswith("warning: DASHBOARD_URL http://127.0.0.1:"), warnings
        robot = site.robot(gw.url).start(wait_listening=False)
        robot.wait_for_log("installed app 1.0.0", timeout=30)
        assert sum("GATEWAY_URL" in line and "is plain HTTP" in line for line in robot.log().splitlines()) == 1
    finally:
        site.stop_all()


@pytest.mark.parametrize("problem", ["missing-ca", "key-world-readable", "key-without-cert", "not-a-certificate"])
def test_unusable_tls_files_stop_start_up_with_one_line(tmp_path, pki, problem):
    cert, key = pki.issue("gw-client", hosts=(), client=True)
    values = {"DASHBOARD_URL": "https://127.0.0.1:1", "TRUSTED_KEYS": tmp_path, "STATE_DIR": tmp_path / "state",
              "DASHBOARD_CA_FILE": pki.ca_file, "CLIENT_CERT": cert, "CLIENT_KEY": key}
    if problem == "missing-ca":
        values["DASHBOARD_CA_FILE"] = tmp_path / "nope.pem"
    elif problem == "key-world-readable":
        key.chmod(0o644)
    elif problem == "key-without-cert":
        del values["CLIENT_CERT"]
    else:
        (tmp_path / "junk.pem").write_text("not a certificate\n")
        values["DASHBOARD_CA_FILE"] = tmp_path / "junk.pem"
    (tmp_path / "release.pub").write_bytes(pki.cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    values["TRUSTED_KEYS"] = tmp_path / "release.pub"
    conf = write_config(tmp_path / "gateway.conf", values)
    result = run_command("otad-gateway", "--config", str(conf), "--check-config")
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    expected = {"missing-ca": "DASHBOARD_CA_FILE", "key-world-readable": "readable by other users",
                "key-without-cert": "CLIENT_KEY is set but CLIENT_CERT is not", "not-a-certificate": "DASHBOARD_CA_FILE"}
    assert expected[problem] in lines[0], lines[0]


def test_session_options_for_requests(tmp_path, pki):
    """The one place TLS settings become requests options: verify = CA path, cert = (cert, key)."""
    from otad.transfer.tls import ClientTls, system_ca_bundle

    cert, key = pki.issue("c", hosts=(), client=True)
    assert ClientTls(pki.ca_file, cert, key).session_options() == {"verify": str(pki.ca_file), "cert": (str(cert), str(key))}
    assert ClientTls().session_options() == {"verify": system_ca_bundle()}
    assert system_ca_bundle() is True or os.path.isfile(system_ca_bundle())
    ssl.create_default_context(cafile=str(pki.ca_file))  # the CA file we hand out is loadable


def test_a_silent_tls_client_is_cut_after_header_timeout(tmp_path, keypair, pki):
    """The handshake has HEADER_TIMEOUT in all (CPython bounds do_handshake by one deadline)."""
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    edge_cert, edge_key = pki.issue("gateway")
    try:
        gw = start_https_gateway(site, dashboard_url="http://127.0.0.1:1", TLS_CERT=edge_cert, TLS_KEY=edge_key,
                                 HEADER_TIMEOUT=2)
        host, port = gw.url.removeprefix("https://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            started = time.monotonic()
            assert sock.recv(1024) == b""  # the gateway hangs up
            assert 1 <= time.monotonic() - started < 8
        gw.wait_for_log(r"TLS handshake with 127\.0\.0\.1 failed")
        assert requests.get(f"{gw.url}/healthz", verify=str(pki.ca_file), timeout=5).json()["status"] == "ok"
    finally:
        site.stop_all()
