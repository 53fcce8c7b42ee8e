"""The power-loss layer itself (tests/lazyfs.py): what survives its crash(), and what does not.

Each test writes through a real FUSE mount, cuts the power with crash(), unmounts, and
looks at the backing folder (the "disk") or at a fresh mount over it.
"""
from __future__ import annotations

import mmap
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lazyfs import LazyMount  # noqa: E402

WHY_NOT = LazyMount.available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"power-loss layer unavailable: {WHY_NOT}")


@pytest.fixture
def lazy(tmp_path):
    mount = LazyMount(tmp_path / "disk", tmp_path / "mnt").mount()
    yield mount
    mount.unmount()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, sync: bool = False) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        if sync:
            os.fsync(out.fileno())


def cut(mount: LazyMount) -> Path:
    """Power cut, then unmount: returns the backing folder as the disk holds it."""
    mount.crash()
    mount.unmount()
    return mount.backing


def durable_file(mount: LazyMount, name: str, data: bytes) -> Path:
    path = mount.mountpoint / name
    write(path, data, sync=True)
    fsync_path(mount.mountpoint)
    return path


def test_write_without_fsync_is_lost(lazy):
    path = durable_file(lazy, "f", b"old")
    write(path, b"new contents, never fsynced")
    assert path.read_bytes() == b"new contents, never fsynced"
    assert (cut(lazy) / "f").read_bytes() == b"old"


def test_write_after_fsync_survives(lazy):
    path = durable_file(lazy, "f", b"old")
    write(path, b"new", sync=True)
    assert (cut(lazy) / "f").read_bytes() == b"new"


def test_fdatasync_counts_as_fsync(lazy):
    path = durable_file(lazy, "f", b"old")
    with open(path, "r+b") as out:
        out.write(b"NEW")
        out.flush()
        os.fdatasync(out.fileno())
    assert (cut(lazy) / "f").read_bytes() == b"NEW"


def test_create_without_directory_fsync_is_lost_even_with_data_fsynced(lazy):
    write(lazy.mountpoint / "f", b"data", sync=True)
    assert not (cut(lazy) / "f").exists()


def test_name_made_durable_before_data_comes_back_empty(lazy):
    write(lazy.mountpoint / "f", b"data")
    fsync_path(lazy.mountpoint)
    assert (cut(lazy) / "f").read_bytes() == b""


def test_rename_without_directory_fsync_is_lost(lazy):
    durable_file(lazy, "target", b"old")
    write(lazy.mountpoint / "tmp", b"new", sync=True)
    fsync_path(lazy.mountpoint)
    os.replace(lazy.mountpoint / "tmp", lazy.mountpoint / "target")
    disk = cut(lazy)
    assert (disk / "target").read_bytes() == b"old"
    assert (disk / "tmp").read_bytes() == b"new"


def test_rename_after_directory_fsync_survives(lazy):
    durable_file(lazy, "target", b"old")
    write(lazy.mountpoint / "tmp", b"new", sync=True)
    os.replace(lazy.mountpoint / "tmp", lazy.mountpoint / "target")
    fsync_path(lazy.mountpoint)
    disk = cut(lazy)
    assert (disk / "target").read_bytes() == b"new"
    assert sorted(os.listdir(disk)) == ["target"]


def test_cross_directory_rename_is_atomic(lazy):
    """Fsyncing only the destination keeps the file under its new name only, never both."""
    for name in ("a", "b"):
        (lazy.mountpoint / name).mkdir()
    fsync_path(lazy.mountpoint)
    durable_file(lazy, "a/f", b"x")
    fsync_path(lazy.mountpoint / "a")
    os.rename(lazy.mountpoint / "a/f", lazy.mountpoint / "b/f")
    fsync_path(lazy.mountpoint / "b")
    disk = cut(lazy)
    assert os.listdir(disk / "a") == []
    assert (disk / "b/f").read_bytes() == b"x"


def test_unlink_without_directory_fsync_comes_back(lazy):
    durable_file(lazy, "f", b"keep")
    os.unlink(lazy.mountpoint / "f")
    assert (cut(lazy) / "f").read_bytes() == b"keep"


def test_unlink_after_directory_fsync_is_gone(lazy):
    durable_file(lazy, "f", b"keep")
    os.unlink(lazy.mountpoint / "f")
    fsync_path(lazy.mountpoint)
    assert not (cut(lazy) / "f").exists()


def test_mkdir_needs_the_parent_fsynced(lazy):
    (lazy.mountpoint / "d").mkdir()
    write(lazy.mountpoint / "d/f", b"x", sync=True)
    fsync_path(lazy.mountpoint / "d")  # d itself, not its parent
    assert not (cut(lazy) / "d").exists()


def test_directory_fsynced_before_its_parent_keeps_its_entries(lazy):
    (lazy.mountpoint / "d").mkdir()
    write(lazy.mountpoint / "d/f", b"x", sync=True)
    fsync_path(lazy.mountpoint / "d")
    fsync_path(lazy.mountpoint)
    assert (cut(lazy) / "d/f").read_bytes() == b"x"


def test_unlinked_file_stays_usable_through_its_descriptor(lazy):
    path = durable_file(lazy, "f", b"abc")
    with open(path, "r+b") as handle:
        os.unlink(path)
        handle.write(b"XY")
        handle.flush()
        os.fsync(handle.fileno())
        handle.seek(0)
        assert handle.read() == b"XYc"
    assert os.listdir(lazy.mountpoint) == []


def test_hard_link_shares_data_and_needs_its_directory_fsynced(lazy):
    path = durable_file(lazy, "f", b"one")
    os.link(path, lazy.mountpoint / "g")
    fsync_path(lazy.mountpoint)
    write(lazy.mountpoint / "g", b"two", sync=True)
    disk = cut(lazy)
    assert (disk / "f").read_bytes() == b"two"
    assert os.stat(disk / "f").st_ino == os.stat(disk / "g").st_ino


def test_clean_unmount_keeps_everything(lazy):
    write(lazy.mountpoint / "f", b"never fsynced")
    lazy.unmount()
    assert (lazy.backing / "f").read_bytes() == b"never fsynced"


def test_fresh_mount_serves_the_survivors(lazy):
    durable_file(lazy, "f", b"durable")
    write(lazy.mountpoint / "g", b"lost")
    lazy.crash()
    lazy.remount()
    assert os.listdir(lazy.mountpoint) == ["f"]
    assert (lazy.mountpoint / "f").read_bytes() == b"durable"


def test_every_operation_fails_after_the_cut(lazy):
    path = durable_file(lazy, "f", b"x")
    lazy.crash()
    with pytest.raises(OSError) as info:
        path.read_bytes()
    assert info.value.errno == 5  # EIO: the disk is gone


def test_torn_mode_keeps_a_prefix_of_the_unsynced_writes(tmp_path):
    """With --torn, what survives is the fsynced content plus a prefix of the later writes."""
    chunk = 4096
    final = b"".join(bytes([65 + i]) * chunk for i in range(16))
    lengths = set()
    for seed in range(6):
        mount = LazyMount(tmp_path / f"disk{seed}", tmp_path / f"mnt{seed}", torn=True, seed=seed).mount()
        path = durable_file(mount, "f", b"")
        fd = os.open(path, os.O_WRONLY)
        try:
            for i in range(16):
                os.pwrite(fd, final[i * chunk:(i + 1) * chunk], i * chunk)
        finally:
            os.close(fd)
        survived = (cut(mount) / "f").read_bytes()
        assert final.startswith(survived)
        assert len(survived) % 512 == 0
        lengths.add(len(survived))
    assert len(lengths) > 1, "torn mode should keep different prefixes for different seeds"
    assert any(0 < n < len(final) for n in lengths)


def test_torn_mode_never_tears_fsynced_data(tmp_path):
    mount = LazyMount(tmp_path / "disk", tmp_path / "mnt", torn=True, seed=1).mount()
    durable_file(mount, "f", b"synced" * 1000)
    assert (cut(mount) / "f").read_bytes() == b"synced" * 1000


def test_shared_mmap_works(lazy):
    path = durable_file(lazy, "f", b"\0" * 4096)
    with open(path, "r+b") as handle:
        with mmap.mmap(handle.fileno(), 4096) as region:
            region[:5] = b"hello"
            region.flush()
        os.fsync(handle.fileno())
    assert (cut(lazy) / "f").read_bytes()[:5] == b"hello"


def sqlite_rows(mount: LazyMount, synchronous: str, rows: int) -> None:
    # In a child process: its descriptors and -shm mapping go when it exits, as with a daemon.
    script = f"""
import sqlite3
db = sqlite3.connect({str(mount.mountpoint / 'db.sqlite')!r}, isolation_level=None)
assert db.execute('PRAGMA journal_mode=WAL').fetchone()[0] == 'wal'
db.execute('PRAGMA synchronous={synchronous}')
db.execute('CREATE TABLE t (n INTEGER)')
for n in range({rows}):
    db.execute('INSERT INTO t VALUES (?)', (n,))
print('committed', flush=True)
import os, signal; os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "committed" in done.stdout, done.stderr


def count_rows(disk: Path) -> int:
    try:
        with sqlite3.connect(disk / "db.sqlite") as db:
            return db.execute("SELECT count(*) FROM t").fetchone()[0]
    except sqlite3.OperationalError:  # no table: nothing of it survived
        return 0


def test_sqlite_wal_synchronous_full_keeps_committed_rows(lazy):
    sqlite_rows(lazy, "FULL", 200)
    assert count_rows(cut(lazy)) == 200


def test_sqlite_synchronous_off_loses_commits(lazy):
    """The control: without fsyncs the same commits are gone, so the layer really drops writes."""
    sqlite_rows(lazy, "OFF", 200)
    assert count_rows(cut(lazy)) < 200
