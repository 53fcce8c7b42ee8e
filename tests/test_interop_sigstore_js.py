"""Bundles `otad-release` writes verify under an independent implementation.

tests/interop/sigstore_js/verify.mjs is built on the official npm
@sigstore/verify (see its README): exit 0 = verified, 1 = rejected, 2 = usage.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import VECTORS, make_app, otad_release

JS_DIR = Path(__file__).resolve().parent / "interop" / "sigstore_js"
VERIFY_MJS = JS_DIR / "verify.mjs"
HAPPY = VECTORS / "conformance" / "managed-key-happy-path"
BLOB = VECTORS / "conformance" / "a.txt"
TRUSTED_ROOT = VECTORS / "sigstore-python" / "trusted_root.prod.json"
MIN_NODE = (20, 17)  # what the pinned @sigstore/verify 3.1.1 needs (package.json engines)


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the verifier's dependencies installed (`npm ci` if missing)."""
    binary = shutil.which("node")
    if binary is None:
        pytest.skip("node is not installed, so the @sigstore/verify (JavaScript) verifier cannot run")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    found = re.match(r"v(\d+)\.(\d+)", version)
    if not found or tuple(map(int, found.groups())) < MIN_NODE:
        pytest.skip(f"node {version or '(unknown version)'} is older than 20.17, which @sigstore/verify 3.1.1 needs")
    if not (JS_DIR / "node_modules" / "@sigstore" / "verify").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip(f"{JS_DIR / 'node_modules'} is missing and npm is not installed to run `npm ci` there")
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(JS_DIR)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
        )
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"`npm ci --prefix {JS_DIR}` failed, so @sigstore/verify is not installed: {tail}")
    return binary


def verify_js(node: str, key: Path, bundle: Path, artifact: Path, trusted_root: Path | None = None) -> subprocess.CompletedProcess:
    args = [node, str(VERIFY_MJS), "--key", str(key), "--bundle", str(bundle), "--artifact", str(artifact)]
    if trusted_root is not None:
        args += ["--trusted-root", str(trusted_root)]
    return subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


def assert_verified(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.strip() == "verified"


def assert_rejected(result: subprocess.CompletedProcess, code: str = "SIGNATURE_ERROR") -> None:
    """Exit 1 is a failed check; exit 2 (usage, unreadable file) would prove nothing."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout.startswith(f"{code}: "), result.stdout
    assert len(result.stdout.strip().splitlines()) == 1


@pytest.fixture
def signed(keypair, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(public key, artifact, bundle) from our own keygen + sign."""
    key, pub = keypair
    artifact = tmp_path / "artifact.bin"
    artifact.write_bytes(b"robot firmware\n" + bytes(range(256)) * 64)
    bundle = tmp_path / "artifact.bin.bundle"
    result = otad_release("sign", "--key", str(key), "--bundle", str(bundle), str(artifact))
    assert result.returncode == 0, result.stderr
    return pub, artifact, bundle


def test_our_bundle_verifies_under_sigstore_js(node, signed):
    pub, artifact, bundle = signed
    assert json.loads(bundle.read_text())["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert_verified(verify_js(node, pub, bundle, artifact))


def test_sigstore_js_rejects_our_bundle_over_a_flipped_byte(node, signed):
    pub, artifact, bundle = signed
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    assert_rejected(verify_js(node, pub, bundle, artifact))


def test_sigstore_js_rejects_our_bundle_under_another_key(node, signed, tmp_path):
    _, artifact, bundle = signed
    prefix = tmp_path / "other" / "release"
    prefix.parent.mkdir()
    assert otad_release("keygen", "--output-prefix", str(prefix)).returncode == 0
    assert_rejected(verify_js(node, prefix.with_suffix(".pub"), bundle, artifact))


def test_a_built_release_verifies_under_sigstore_js(node, keypair, tmp_path):
    key, pub = keypair
    out = tmp_path / "out"
    result = otad_release("build", "--app-dir", str(make_app(tmp_path / "app", "1.0.0")), "--version", "1.0.0",
                          "--key", str(key), "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["signature"] == "cosign"
    assert manifest["bundle"] == "app-v1.0.0.tar.gz.bundle"
    assert_verified(verify_js(node, pub, out / manifest["bundle"], out / manifest["artifact"]))


@pytest.mark.parametrize("trusted_root", [None, TRUSTED_ROOT], ids=["key-only", "with-rekor-entry-checked"])
def test_shared_happy_path_vector_verifies_under_sigstore_js(node, trusted_root):
    """The vector otad's own tests use is accepted by @sigstore/verify too (with its Rekor entry checked offline)."""
    assert_verified(verify_js(node, HAPPY / "key.pub", HAPPY / "bundle.sigstore.json", BLOB, trusted_root))


def test_shared_happy_path_vector_is_rejected_over_other_content(node, tmp_path):
    other = tmp_path / "a.txt"
    other.write_bytes(BLOB.read_bytes() + b"x")
    assert_rejected(verify_js(node, HAPPY / "key.pub", HAPPY / "bundle.sigstore.json", other, TRUSTED_ROOT))
