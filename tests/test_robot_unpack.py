"""Hostile release archives: refused by the unpacker, and by a real robot, with nothing written outside.

The corpus is tests/hostile_archives.py. Absolute names and link targets point
into a folder of the test's own (`outside`), never at the real /tmp or /etc.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import otad_release
from fleet import Site
from hostile_archives import BUILDERS, CASES, LIMIT_BYTES, LIMIT_FILES, REASONS, member_bomb, prepare_outside
from invariants import current_problem, current_version, robot_state

VERSION = "2.0.0"
PEAK_RSS_LIMIT_KIB = 100 * 1024  # the unpacker streams: no case may need more than this, bombs included

# unpack_release runs in a child process: a regression to a memory bomb then fails one
# test (MemoryError under RLIMIT_AS) instead of taking the test machine down, and the
# child's peak RSS is the unpacker's own.
CHILD = r"""
import json, resource, sys
from pathlib import Path
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, hard))
from otad.robot.unpack import UnsafeArchive, unpack_release
archive, dest, version, max_bytes, max_files = sys.argv[1:]
try:
    result = {"written": unpack_release(Path(archive), Path(dest), version, int(max_bytes), int(max_files))}
except UnsafeArchive as exc:
    result = {"unsafe": str(exc)}
# VmHWM, not ru_maxrss: a child started by vfork+exec keeps its parent's ru_maxrss
# (pytest's, large in a full run), while exec gives it a fresh VmHWM.
result["peak_kib"] = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps(result))
"""


def unpack_in_child(archive: Path, dest: Path, version: str, max_bytes: int, max_files: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(archive), str(dest), version, str(max_bytes), str(max_files)],
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"unpack_release raised something other than UnsafeArchive:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple]:
    """Everything under root but `skip`: type, mode, and for files size, mtime, inode, link count; link targets.

    A folder's own mtime is left out: creating the release folder changes its parent's.
    """
    found: dict[str, tuple] = {}
    for here, folders, files in os.walk(root):
        here = Path(here)
        folders[:] = [f for f in folders if here / f not in skip]
        for name in folders + files:
            path = here / name
            if path in skip:
                continue
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                found[str(path.relative_to(root))] = (kind, st.st_mode)
            elif stat.S_ISLNK(st.st_mode):
                found[str(path.relative_to(root))] = (kind, os.readlink(path))
            else:
                found[str(path.relative_to(root))] = (kind, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, st.st_nlink)
    return found


def differences(before: dict, after: dict) -> list[str]:
    return ([f"created {p}" for p in sorted(after.keys() - before.keys())]
            + [f"removed {p}" for p in sorted(before.keys() - after.keys())]
            + [f"changed {p}: {before[p]} -> {after[p]}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]])


def bytes_under(folder: Path) -> int:
    total = 0
    for here, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(here, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


@pytest.mark.parametrize("case_id,builder,reason", CASES, ids=[case[0] for case in CASES])
def test_unpacker_refuses_and_writes_nothing_outside(tmp_path, case_id, builder, reason):
    outside = tmp_path / "outside"
    prepare_outside(outside)
    archive = builder(tmp_path / "corpus", VERSION, outside)
    releases = tmp_path / "root" / "releases"
    releases.mkdir(parents=True)
    (releases / "1.0.0").mkdir()
    (releases / "1.0.0" / "VERSION").write_text("1.0.0\n")  # a neighbour release a `..` could reach
    dest = releases / VERSION
    before = snapshot(tmp_path, skip={dest})

    result = unpack_in_child(archive, dest, VERSION, LIMIT_BYTES, LIMIT_FILES)

    assert differences(before, snapshot(tmp_path, skip={dest})) == []
    assert result["peak_kib"] < PEAK_RSS_LIMIT_KIB, f"peak RSS {result['peak_kib']} KiB"
    if reason is None:
        assert "unsafe" not in result, result["unsafe"]
        UNPACKED_CHECKS[case_id](dest)
        return
    assert "unsafe" in result, f"unpacked, {result.get('written')} bytes: not refused"
    assert reason in result["unsafe"], result["unsafe"]
    # The unpacker may leave a partial folder (the caller removes it), but never past its limit.
    if dest.exists():
        assert bytes_under(dest) <= LIMIT_BYTES


def test_unpacker_memory_does_not_grow_with_the_member_count(tmp_path):
    """The real unpack_release in a child (its own VmHWM), on the same member bomb at 1,000 and
    at 20,000 members: a global PAX header and symlinks with long names. Kept per member
    (tarfile's member list with each one's copy of the global records, lists of names) that
    is 25 KiB a member; bounded, twenty times the members costs next to nothing."""
    peaks = {}
    for members in (1_000, 20_000):
        archive = member_bomb(tmp_path / f"corpus-{members}", VERSION, tmp_path, members=members)
        result = unpack_in_child(archive, tmp_path / f"dest-{members}", VERSION, LIMIT_BYTES, members + 2)
        assert "unsafe" not in result, result["unsafe"]
        peaks[members] = result["peak_kib"]
    assert peaks[20_000] - peaks[1_000] < 2 * 1024, f"peak RSS in KiB by member count: {peaks}"


def check_modes_dropped(dest: Path) -> None:
    seen = set()
    for here, folders, files in os.walk(dest):
        for name in folders + files:
            path = Path(here) / name
            mode = os.lstat(path).st_mode
            seen.add(str(path.relative_to(dest)))
            if stat.S_ISLNK(mode):
                continue
            assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0, f"{path}: {oct(mode)}"
            assert mode & (stat.S_IWGRP | stat.S_IWOTH) == 0, f"{path}: {oct(mode)}"
    assert {"VERSION", "bin/app", "bin/su", "bin/wide-open", "etc/shared.conf", "tmp"} <= seen
    assert stat.S_IMODE(os.stat(dest / "bin" / "su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "bin" / "wide-open").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "etc" / "shared.conf").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(dest / "tmp").st_mode) == 0o755
    assert (dest / "bin" / "su").read_bytes() == b"#!/bin/sh\nid\n"


def check_member_bomb(dest: Path) -> None:
    links = [Path(here) / name for here, _, files in os.walk(dest) for name in files if name.startswith("l")]
    assert len(links) == LIMIT_FILES - 2 and all(os.readlink(link) == "target" for link in links)


UNPACKED_CHECKS = {"setuid-setgid": check_modes_dropped, "member-bomb": check_member_bomb}


# -- through the real daemons -------------------------------------------------------------
ROBOT_MAX_MB = 32
# version-mismatch is not here: the gateway already refuses it (it reads the archive's first
# member); tests/test_metadata_trust.py shows both the gateway and the robot refusing it.
DAEMON_CASES = [
    "absolute-member", "symlink-dotdot", "symlink-chain-escape", "hardlink-absolute", "char-device",
    "gzip-bomb", "write-through-symlink-dir", "symlink-nul-target", "pax-header-chain",
]
DAEMON_REASONS = {**REASONS, "gzip-bomb": f"unpacked size exceeds {ROBOT_MAX_MB} MiB"}


def publish_signed(site: Site, staged: Path) -> None:
    """Copy a signed release into OTA_DIR the way `otad-release publish` does: manifest.json last, by rename."""
    for name in ("artifact", "bundle", "checksum"):
        path = staged / json.loads((staged / "manifest.json").read_text())[name]
        shutil.copyfile(path, site.ota / path.name)
    tmp_bundle = site.ota / ".manifest.json.bundle.tmp"
    shutil.copyfile(staged / "manifest.json.bundle", tmp_bundle)
    os.replace(tmp_bundle, site.ota / "manifest.json.bundle")
    tmp = site.ota / ".manifest.json.tmp"
    shutil.copyfile(staged / "manifest.json", tmp)
    os.replace(tmp, site.ota / "manifest.json")


def stage_signed(site: Site, archive: Path, version: str, out: Path) -> Path:
    """Sign a hand-built archive with the real CLI and write its .sha256 and manifest.json (docs/formats.md)."""
    out.mkdir(parents=True)
    artifact = out / f"app-v{version}.tar.gz"
    shutil.copyfile(archive, artifact)
    bundle = out / f"{artifact.name}.bundle"
    signed = otad_release("sign", "--key", str(site.key), "--bundle", str(bundle), str(artifact))
    assert signed.returncode == 0, signed.stderr
    data = artifact.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    checksum = out / f"app-v{version}.sha256"
    checksum.write_text(f"{digest}  {artifact.name}\n")
    manifest = {
        "schema": 1, "name": "app", "version": version, "artifact": artifact.name, "size": len(data),
        "sha256": digest, "bundle": bundle.name, "checksum": checksum.name, "signature": "cosign",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400)),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    signed = otad_release("sign", "--key", str(site.key), "--bundle", str(out / "manifest.json.bundle"), str(out / "manifest.json"))
    assert signed.returncode == 0, signed.stderr
    return out


@pytest.fixture
def site(site):
    """conftest's site, plus a running gateway as site.gw."""
    site.gw = site.gateway().start()
    return site


def test_robot_rejects_signed_hostile_releases(site, tmp_path):
    """Properly signed, so the gateway caches and serves them; the robot must still refuse to unpack them."""
    outside = tmp_path / "outside"
    prepare_outside(outside)
    app, state = tmp_path / "robot-app", tmp_path / "robot-state"
    site.release("1.0.0")
    robot = site.robot(site.gw.url, MAX_UNPACKED_MB=ROBOT_MAX_MB).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")

    versions = {case_id: f"1.0.{n}" for n, case_id in enumerate(DAEMON_CASES, start=1)}
    staged = {case_id: stage_signed(site, BUILDERS[case_id](tmp_path / "hostile", version, outside), version,
                                    tmp_path / "signed" / version)
              for case_id, version in versions.items()}
    daemons_own = {state, tmp_path / "gw-state", tmp_path / "dashboard-state", site.ota,
                   tmp_path / "robot.log", tmp_path / "gw.log", tmp_path / "dashboard.log"}
    before = snapshot(tmp_path, skip=daemons_own)

    for case_id, version in versions.items():
        publish_signed(site, staged[case_id])
        line = robot.wait_for_log(rf"rejected app {re.escape(version)}: (.*)", timeout=30)
        assert DAEMON_REASONS[case_id] in line[1], f"{case_id}: {line[0]}"
        assert not os.path.lexists(app / "releases" / version), case_id
        assert current_version(app) == "1.0.0"

    assert robot.running()
    assert differences(before, snapshot(tmp_path, skip=daemons_own)) == []
    assert sorted(os.listdir(app / "releases")) == ["1.0.0", "1.0.0.ok"]
    assert not os.path.lexists(app / "NEW") and not os.path.lexists(app / "OLD")
    assert current_problem(app) is None
    assert robot_state(state)["phase"] == "idle" and robot_state(state)["committed"] == "1.0.0"
    events = [json.loads(p.read_text()) for p in sorted((state / "outbox").glob("*.json"))]
    assert [(e["event"], e["version"]) for e in events] == [("installed", "1.0.0")] + [("rejected", v) for v in versions.values()]
    assert "Traceback" not in robot.log()
    # Each was downloaded and verified once: it was the unpacker that refused them.
    assert robot.log().count("verified app 1.0.") == 1 + len(versions)


def test_unpacker_reports_its_progress_through_the_archive(site, tmp_path):
    """The robot's heartbeat during an unpack (issue 13, item 9): the real unpacker, called
    in-process on a real release archive, reports every read, always further into the archive,
    up to its whole size. (A daemon-level test would need a disk slow enough to make an
    unpack outlast the worker's allowed silence; the beat itself is tested in test_robot.py.)"""
    from otad.robot.unpack import unpack_release

    archive = site.build(VERSION, size=3 * 1024 * 1024) / f"app-v{VERSION}.tar.gz"
    seen: list[int] = []
    written = unpack_release(archive, tmp_path / "dest", VERSION, LIMIT_BYTES, LIMIT_FILES, progress=seen.append)
    assert written >= 3 * 1024 * 1024
    assert len(seen) > 10, seen  # many beats over a 3 MiB archive, not one at the end
    assert all(b > a for a, b in zip(seen, seen[1:])), "progress must only ever advance"
    assert seen[-1] == archive.stat().st_size
    assert (tmp_path / "dest" / "VERSION").read_text().strip() == VERSION
