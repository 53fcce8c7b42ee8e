"""Shared fixtures: real CLIs run as subprocesses, real keys, throwaway folders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VECTORS = Path(__file__).resolve().parent / "vectors" / "cosign"
BIN = Path(sys.executable).parent


def otad_release(*args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run the installed `otad-release` console script, as CI and users do."""
    full_env = {**os.environ, "COSIGN_PASSWORD": "test-password", **(env or {})}
    return subprocess.run(
        [str(BIN / "otad-release"), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got: {result.stderr!r}"
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def make_keypair(folder: Path) -> tuple[Path, Path]:
    """A cosign key pair written by our own `keygen` into a new `folder` (password: test-password)."""
    prefix = folder / "release"
    folder.mkdir()
    result = otad_release("keygen", "--output-prefix", str(prefix))
    assert result.returncode == 0, result.stderr
    return prefix.with_suffix(".key"), prefix.with_suffix(".pub")


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    """A cosign key pair written by our own `keygen` (password: test-password)."""
    return make_keypair(tmp_path / "keys")


def make_app(root: Path, version: str, files: dict[str, bytes] | None = None) -> Path:
    """A small app folder the way CI would hand it to ci/build-release."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "VERSION").write_text(version + "\n")
    for name, data in (files or {"bin/app": b"#!/bin/sh\necho app\n", "lib/data.txt": b"data\n"}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if (root / "bin" / "app").exists():
        (root / "bin" / "app").chmod(0o755)
    return root


@pytest.fixture
def site(tmp_path: Path, keypair: tuple[Path, Path]):
    """A loopback site (tests/fleet.py) with its dashboard running; every daemon is killed afterwards."""
    from fleet import Site  # fleet imports this module

    s = Site(tmp_path, *keypair)
    s.start_dashboard()
    yield s
    s.stop_all()


@pytest.fixture(scope="session")
def role_keys(tmp_path_factory):
    """Two real cosign key pairs from `otad-release keygen`: the release key and the rollout key
    (issue 15's two roles). Returns {"release"|"rollout": (private key, PublicKey)}."""
    from otad.trust.keys import load_private_key, load_public_key

    folder = tmp_path_factory.mktemp("role-keys")
    keys = {}
    for role in ("release", "rollout"):
        result = otad_release("keygen", "--output-prefix", str(folder / role))
        assert result.returncode == 0, result.stderr
        private = load_private_key((folder / f"{role}.key").read_bytes(), b"test-password", f"{role}.key")
        keys[role] = (private, load_public_key((folder / f"{role}.pub").read_bytes(), f"{role}.pub"))
    keys["folder"] = folder
    return keys
