"""The CI side: ci/build-release -> verify, tampering, reproducibility, hostile app folders, publish."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import BIN, REPO, assert_one_line_error, make_app, otad_release


def ci_build(app: Path, out: Path, key: Path, ota: Path | None = None, env: dict | None = None):
    full_env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "COSIGN_KEY": str(key),
        "COSIGN_PASSWORD": "test-password",
        **(env or {}),
    }
    args = [str(REPO / "ci" / "build-release"), str(app), str(out)] + ([str(ota)] if ota else [])
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def release(tmp_path, keypair):
    key, pub = keypair
    app = make_app(tmp_path / "app", "1.2.3")
    out = tmp_path / "out"
    result = ci_build(app, out, key)
    assert result.returncode == 0, result.stderr
    return out, pub


def verify_manifest(out: Path, pub: Path):
    return otad_release("verify", "--key", str(pub), "--manifest", str(out / "manifest.json"))


def test_ci_build_release_verifies(release):
    out, pub = release
    names = sorted(p.name for p in out.iterdir())
    assert names == ["app-v1.2.3.sha256", "app-v1.2.3.tar.gz", "app-v1.2.3.tar.gz.bundle", "manifest.json", "manifest.json.bundle"]
    manifest = json.loads((out / "manifest.json").read_text())
    artifact = (out / "app-v1.2.3.tar.gz").read_bytes()
    assert manifest["version"] == "1.2.3"
    assert manifest["size"] == len(artifact)
    assert manifest["sha256"] == hashlib.sha256(artifact).hexdigest()
    assert manifest["signature"] == "cosign" and manifest["schema"] == 1
    # The checksum file is exactly what sha256sum prints, and sha256sum -c accepts it.
    check = subprocess.run(["sha256sum", "-c", "app-v1.2.3.sha256"], cwd=out, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    result = verify_manifest(out, pub)
    assert result.returncode == 0, result.stderr
    assert "verified app-v1.2.3.tar.gz" in result.stdout and "key release.pub" in result.stdout
    plain = otad_release("verify", "--key", str(pub), "--bundle", str(out / "app-v1.2.3.tar.gz.bundle"), str(out / "app-v1.2.3.tar.gz"))
    assert plain.returncode == 0, plain.stderr


def test_archive_carries_version_and_normalised_metadata(release):
    out, _ = release
    with tarfile.open(out / "app-v1.2.3.tar.gz") as tar:
        members = tar.getmembers()
        assert members[0].name == "VERSION"
        assert tar.extractfile("VERSION").read() == b"1.2.3\n"
        for member in members:
            assert (member.uid, member.gid, member.uname, member.gname, member.mtime) == (0, 0, "", "", 0)
        assert tar.getmember("bin/app").mode == 0o755
        assert tar.getmember("lib/data.txt").mode == 0o644
    assert (out / "app-v1.2.3.tar.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip header mtime


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_artifact_byte_is_a_sha256_mismatch(release):
    out, pub = release
    flip_byte(out / "app-v1.2.3.tar.gz", 100)
    assert_one_line_error(verify_manifest(out, pub), "sha256 is", "manifest says")


def test_flipped_bundle_signature_fails(release):
    out, pub = release
    bundle = out / "app-v1.2.3.tar.gz.bundle"
    doc = json.loads(bundle.read_text())
    sig = doc["messageSignature"]["signature"]
    doc["messageSignature"]["signature"] = sig[:30] + ("A" if sig[30] != "A" else "B") + sig[31:]
    bundle.write_text(json.dumps(doc))
    assert_one_line_error(verify_manifest(out, pub), "signature does not verify")


def test_flipped_bundle_byte_is_malformed_or_bad(release):
    out, pub = release
    flip_byte(out / "app-v1.2.3.tar.gz.bundle", 5)
    assert_one_line_error(verify_manifest(out, pub), "bundle")


def test_manifest_sha256_that_lies_is_rejected(release):
    out, pub = release
    path = out / "manifest.json"
    doc = json.loads(path.read_text())
    doc["sha256"] = ("0" if doc["sha256"][0] != "0" else "1") + doc["sha256"][1:]
    path.write_text(json.dumps(doc))
    # The edited manifest no longer matches its signature.
    assert_one_line_error(verify_manifest(out, pub), "manifest signature", "does not match")
    # Re-signed with the release key (the signer lies): the checksum file from the build disagrees.
    key = pub.with_suffix(".key")
    assert otad_release("sign", "--key", str(key), "--bundle", str(out / "manifest.json.bundle"), str(path)).returncode == 0
    assert_one_line_error(verify_manifest(out, pub), "checksum file's sha256 differs")
    (out / "app-v1.2.3.sha256").write_text(f"{doc['sha256']}  app-v1.2.3.tar.gz\n")
    assert_one_line_error(verify_manifest(out, pub), "sha256 is", "manifest says")


def test_unknown_key_is_named(release, tmp_path):
    out, _ = release
    other = tmp_path / "other"
    assert otad_release("keygen", "--output-prefix", str(other)).returncode == 0
    assert_one_line_error(verify_manifest(out, other.with_suffix(".pub")), "unknown key")


def test_two_builds_are_byte_identical(tmp_path, keypair):
    key, _ = keypair
    app = make_app(tmp_path / "app", "2.0.0", {"a.txt": b"a" * 5000, "sub/b.bin": os.urandom(3000), "sub/deeper/c": b"c"})
    os.symlink("../a.txt", app / "sub" / "link-to-a")
    first, second = tmp_path / "one", tmp_path / "two"
    assert ci_build(app, first, key).returncode == 0
    # Touch every file: mtimes must not leak into the archive.
    for path in app.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (1_700_000_000, 1_700_000_000))
    assert ci_build(app, second, key).returncode == 0
    for name in ("app-v2.0.0.tar.gz", "app-v2.0.0.sha256"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_source_date_epoch_sets_entry_times(tmp_path, keypair):
    key, _ = keypair
    app = make_app(tmp_path / "app", "1.0.0")
    out = tmp_path / "out"
    assert ci_build(app, out, key, env={"SOURCE_DATE_EPOCH": "1700000000"}).returncode == 0
    with tarfile.open(out / "app-v1.0.0.tar.gz") as tar:
        assert {m.mtime for m in tar.getmembers()} == {1_700_000_000}
    assert json.loads((out / "manifest.json").read_text())["created"] == "2023-11-14T22:13:20Z"


def build(app: Path, out: Path, key: Path, version: str):
    return otad_release("build", "--app-dir", str(app), "--version", version, "--key", str(key), "--out", str(out))


def test_symlink_out_of_the_app_folder_is_refused(tmp_path, keypair):
    key, _ = keypair
    app = make_app(tmp_path / "app", "1.0.0")
    os.symlink("../../etc/passwd", app / "lib" / "escape")
    assert_one_line_error(build(app, tmp_path / "out", key, "1.0.0"), "leaves the release folder")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_absolute_symlink_is_refused(tmp_path, keypair):
    key, _ = keypair
    app = make_app(tmp_path / "app", "1.0.0")
    os.symlink("/etc/passwd", app / "abs")
    assert_one_line_error(build(app, tmp_path / "out", key, "1.0.0"), "symlink to absolute path")


def test_fifo_is_refused(tmp_path, keypair):
    key, _ = keypair
    app = make_app(tmp_path / "app", "1.0.0")
    os.mkfifo(app / "pipe")
    assert_one_line_error(build(app, tmp_path / "out", key, "1.0.0"), "device files, fifos")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_device_file_is_refused(tmp_path, keypair):
    key, _ = keypair
    app = make_app(tmp_path / "app", "1.0.0")
    os.mknod(app / "null", 0o600 | 0o020000, os.makedev(1, 3))
    assert_one_line_error(build(app, tmp_path / "out", key, "1.0.0"), "device files, fifos")


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0.0", "01.0.0", "1.0.0+build", "1.0.0-", "latest"])
def test_bad_version_is_refused(tmp_path, keypair, version):
    key, _ = keypair
    app = make_app(tmp_path / "app", version)
    assert_one_line_error(build(app, tmp_path / "out", key, version), "MAJOR.MINOR.PATCH")


def test_suffix_version_is_allowed(tmp_path, keypair):
    key, pub = keypair
    app = make_app(tmp_path / "app", "1.0.0-rc.1")
    assert build(app, tmp_path / "out", key, "1.0.0-rc.1").returncode == 0
    assert (tmp_path / "out" / "app-v1.0.0-rc.1.tar.gz").exists()


def test_version_file_disagreeing_with_version_is_refused(tmp_path, keypair):
    key, _ = keypair
    app = make_app(tmp_path / "app", "1.0.0")
    assert_one_line_error(build(app, tmp_path / "out", key, "1.0.1"), "says '1.0.0'")


def test_ci_script_without_version_file_is_a_clear_error(tmp_path, keypair):
    key, _ = keypair
    app = tmp_path / "app"
    app.mkdir()
    result = ci_build(app, tmp_path / "out", key)
    assert result.returncode == 1 and "VERSION is missing" in result.stderr


def test_publish_copies_artifacts_and_keeps_older_versions(tmp_path, keypair):
    key, pub = keypair
    ota = tmp_path / "ota"
    for version in ("1.0.0", "1.1.0"):
        app = make_app(tmp_path / f"app-{version}", version)
        result = ci_build(app, tmp_path / f"out-{version}", key, ota)
        assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in ota.iterdir())
    assert names == sorted(
        [f"app-v{v}{s}" for v in ("1.0.0", "1.1.0") for s in (".tar.gz", ".tar.gz.bundle", ".sha256")]
        + ["manifest.json", "manifest.json.bundle", "releases"]
    )
    assert json.loads((ota / "manifest.json").read_text())["version"] == "1.1.0"
    assert verify_manifest(ota, pub).returncode == 0
    # Each version keeps its own signed pair, the exact bytes it was published with (rollout plans may
    # assign an older release: gateways fetch it by version).
    assert sorted(p.name for p in (ota / "releases").iterdir()) == ["1.0.0", "1.1.0"]
    for version in ("1.0.0", "1.1.0"):
        kept = ota / "releases" / version
        assert sorted(p.name for p in kept.iterdir()) == ["manifest.json", "manifest.json.bundle"]
        for name in ("manifest.json", "manifest.json.bundle"):
            assert (kept / name).read_bytes() == (tmp_path / f"out-{version}" / name).read_bytes()


def test_publish_refuses_a_release_that_does_not_match_its_manifest(release, tmp_path):
    out, _ = release
    flip_byte(out / "app-v1.2.3.tar.gz", 50)
    ota = tmp_path / "ota"
    result = otad_release("publish", "--from", str(out), "--to", str(ota))
    assert_one_line_error(result, "refusing to publish")
    assert not (ota / "manifest.json").exists()


def test_publish_refuses_to_change_a_published_version(release, tmp_path, keypair):
    out, _ = release
    ota = tmp_path / "ota"
    assert otad_release("publish", "--from", str(out), "--to", str(ota)).returncode == 0
    key, _ = keypair
    changed = make_app(tmp_path / "changed", "1.2.3", {"other": b"different content\n"})
    out2 = tmp_path / "out2"
    assert build(changed, out2, key, "1.2.3").returncode == 0
    assert_one_line_error(otad_release("publish", "--from", str(out2), "--to", str(ota)), "already published")


def test_publish_writes_the_manifest_last(release, tmp_path):
    """A poller must never see a manifest whose files are not all in place: the kernel's
    inotify queue records the order in which names appear in the OTA folder."""
    import pyinotify

    out, _ = release
    ota = tmp_path / "ota"
    ota.mkdir()
    appeared: list[str] = []
    manager = pyinotify.WatchManager()
    manager.add_watch(str(ota), pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE)
    notifier = pyinotify.Notifier(manager, lambda event: appeared.append((event.maskname, event.name)))
    try:
        assert otad_release("publish", "--from", str(out), "--to", str(ota)).returncode == 0
        while notifier.check_events(timeout=0):
            notifier.read_events()
            notifier.process_events()
    finally:
        notifier.stop()
    visible = [name for mask, name in appeared if mask == "IN_MOVED_TO"]
    # The pair is staged (bundle, then manifest: the commit point) and renamed in: never a manifest without its signature.
    assert visible[-4:] == [".manifest.json.bundle.next", ".manifest.json.next", "manifest.json.bundle", "manifest.json"]
    assert set(visible[:-4]) == {"app-v1.2.3.tar.gz", "app-v1.2.3.tar.gz.bundle", "app-v1.2.3.sha256"}
    # Nothing ever appeared under a final name by being written in place.
    assert all(name.startswith(".") for mask, name in appeared if mask == "IN_CLOSE_WRITE")


def test_symlink_chain_that_leads_out_is_refused(tmp_path, keypair):
    """Each link looks inside on its own; together they lead out of the app folder."""
    key, _ = keypair
    app = make_app(tmp_path / "app", "1.0.0")
    (app / "sub").mkdir()
    os.symlink("..", app / "sub" / "up")  # the app folder itself: fine alone
    os.symlink("sub/up/..", app / "esc")  # reads as "sub", resolves to the app's parent
    assert_one_line_error(build(app, tmp_path / "out", key, "1.0.0"), "'..' only at its start")


def test_manifest_is_signed_and_expires_after_the_given_days(tmp_path, keypair):
    key, pub = keypair
    app = make_app(tmp_path / "app", "1.0.0")
    before = time.time()
    result = otad_release("build", "--app-dir", str(app), "--version", "1.0.0", "--key", str(key), "--out", str(tmp_path / "out"),
                          "--expires-in", "2.5", "--allow-downgrade", env={"SOURCE_DATE_EPOCH": "0"})
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    expires = datetime.fromisoformat(doc["expires"].replace("Z", "+00:00")).timestamp()
    assert before + 2.5 * 86400 - 1 <= expires <= time.time() + 2.5 * 86400  # from the wall clock, not SOURCE_DATE_EPOCH
    assert doc["created"] == "1970-01-01T00:00:00Z" and doc["allow_downgrade"] is True
    verified = verify_manifest(tmp_path / "out", pub)
    assert verified.returncode == 0, verified.stderr
    assert f"verified manifest.json (key release.pub, expires {doc['expires']}, allows a downgrade)" in verified.stdout
    soon = otad_release("build", "--app-dir", str(app), "--version", "1.0.0", "--key", str(key), "--out", str(tmp_path / "o"),
                        "--expires-in", "soon")
    assert_one_line_error(soon, "'soon' is not a number of days")


def test_an_expired_release_does_not_verify(tmp_path, keypair):
    key, pub = keypair
    app = make_app(tmp_path / "app", "1.0.0")
    assert otad_release("build", "--app-dir", str(app), "--version", "1.0.0", "--key", str(key), "--out", str(tmp_path / "out"),
                        "--expires-in", "-1").returncode == 0
    assert_one_line_error(verify_manifest(tmp_path / "out", pub), "manifest expired at", "24 hours ago")


def test_an_edited_manifest_is_re_signed_with_sign_and_only_then_published(release, tmp_path):
    """The operator's refresh: push `expires` out, re-sign with `otad-release sign`, publish."""
    out, pub = release
    path = out / "manifest.json"
    doc = json.loads(path.read_text())
    doc["expires"] = "2099-01-01T00:00:00Z"
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    assert_one_line_error(verify_manifest(out, pub), "manifest signature")
    ota = tmp_path / "ota"
    assert_one_line_error(otad_release("publish", "--from", str(out), "--to", str(ota)), "does not sign this manifest.json")
    assert not (ota / "manifest.json").exists()
    signed = otad_release("sign", "--key", str(pub.with_suffix(".key")), "--bundle", str(out / "manifest.json.bundle"), str(path))
    assert signed.returncode == 0, signed.stderr
    verified = verify_manifest(out, pub)
    assert verified.returncode == 0 and "expires 2099-01-01T00:00:00Z" in verified.stdout, verified.stderr
    assert otad_release("publish", "--from", str(out), "--to", str(ota)).returncode == 0
    assert (ota / "manifest.json").read_bytes() == path.read_bytes()
    assert (ota / "manifest.json.bundle").read_bytes() == (out / "manifest.json.bundle").read_bytes()


def test_publish_refuses_a_manifest_without_its_bundle(release, tmp_path):
    out, _ = release
    (out / "manifest.json.bundle").unlink()
    assert_one_line_error(otad_release("publish", "--from", str(out), "--to", str(tmp_path / "ota")), "manifest.json.bundle is missing")
