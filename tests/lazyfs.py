"""lazyfs: a FUSE file system for tests that loses, on command, every write not yet made durable.

Modelled on Jepsen's LazyFS. It serves a folder (the *backing* folder, standing for the
disk) at a mount point, keeps the whole tree in its own memory while mounted (its own
page cache), and writes the backing folder only when it stops:

- `crash()` (SIGUSR1 to the server): the power cut. From that instant every operation
  fails with EIO, and the backing folder is rewritten to hold exactly what was durable
  (see below), as the disk would after the cut. The caller then SIGKILLs the processes,
  unmounts, and mounts afresh over the same backing folder.
- a clean unmount (`umount`, SIGTERM): everything is written, as `sync` and a clean
  unmount of a real file system would.

What is durable, and so survives `crash()`. This is the part of ext4's (data=ordered)
behaviour that otad relies on, and no more; where ext4 keeps more (see "stricter"), the
layer keeps less, so code that passes here does not depend on ext4's extras:

1. File data and size are durable only after `fsync` or `fdatasync` of that file (any
   descriptor of the inode). Until then, after a cut, the file has the content it had at
   its last fsync (or is empty if it never had one). No otad code opens files with
   O_SYNC/O_DSYNC, so those flags are not modelled (they are ignored).
2. Names are durable only after an fsync of the directory that holds them: a create,
   mkdir, symlink, link, unlink, rmdir or rename is undone by a cut unless its
   directory was fsynced after it. A name made durable before its file's data was
   fsynced comes back as the data of the last fsync: the zero-length-file case.
3. rename is atomic but not durable until a directory fsync: after a cut the inode has
   either its old name or its new one, never both and never neither. Fsyncing either
   directory of a cross-directory rename makes both halves durable.
4. A file's mode is durable with its name (at create) or with an fsync of the file.
   Timestamps, owners and extended attributes are not modelled (xattrs are unsupported).
5. Torn writes (`--torn`, optional, stricter): instead of losing all of a file's writes
   since its last fsync, a random prefix of them survives, the last one possibly cut
   at a 512-byte sector boundary, as when the cut lands while the disk writes back.
   Names still follow rules 2-3.

Stricter than ext4, deliberately: ext4's fsync of a new file also commits its directory
entry (the whole journal), and ext4 replaces data on rename-over-existing
(auto_da_alloc); neither happens here. Not modelled at all: media errors, reordering
*within* an fsynced file, and more than one file system.

Other semantics: POSIX and flock locks are handled by the kernel (the layer does not
implement them), so SQLite and flock work. Shared writable mmap works (no direct_io), so
SQLite's WAL with its -shm file works; the -shm is never fsynced, and SQLite does not need
it to be: after a cut it rebuilds the index from the -wal on first open. An unlinked file
stays readable through open descriptors (hard_remove: no .fuse_hidden files).
One difference from a kernel file system, from libfuse2's path-based API: an open(2)
racing a rename over the same name can fail with ENOENT (the kernel resolved the old
inode, whose path libfuse no longer has), where ext4 would open the old file. A reader
of a file another process replaces by rename should retry ENOENT on this layer.

Control: SIGUSR1 = crash (answers `crashed <stats json>` on stdout), SIGUSR2 = print
`stats <json>` (fsync counts, for the durability-cost measurements). `ready` is printed
once mounted. `LazyMount` below runs the server as its own process, so the processes
using the mount can be SIGKILLed independently of it.

Run: python tests/lazyfs.py BACKING MOUNTPOINT [--torn] [--seed N]. Needs /dev/fuse,
libfuse2 (fusepy's library) and root.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import queue
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

SECTOR = 512
HERE = Path(__file__).resolve()


class FuseMissing(RuntimeError):
    """fusepy, libfuse2 or /dev/fuse is not available."""


def _fuse_module():
    # PyPI's fusepy installs `fuse`; Debian's python3-fusepy installs it as `fusepy`.
    try:
        import fuse as mod
        if hasattr(mod, "FUSE") and hasattr(mod, "FuseOSError"):
            return mod
    except (ImportError, OSError, EnvironmentError):
        pass
    try:
        import fusepy as mod
        return mod
    except (ImportError, OSError, EnvironmentError) as exc:
        raise FuseMissing(f"fusepy with libfuse2 is needed: {exc}") from exc


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Node:
    """One inode: its current state (what the mount shows) and its durable state."""

    __slots__ = ("ino", "mode", "uid", "gid", "atime", "mtime", "ctime",
                 "data", "synced", "smode", "log", "target", "entries", "dentries", "opens")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0) -> None:
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.smode = mode
        self.uid, self.gid = uid, gid
        self.atime = self.mtime = self.ctime = now
        self.data = bytearray()      # files: current content
        self.synced = b""            # files: content as of the last fsync
        self.log: list[tuple] = []   # files, torn mode: writes since the last fsync
        self.target = b""            # symlinks
        self.entries: dict[str, int] = {}   # dirs: current names
        self.dentries: dict[str, int] = {}  # dirs: names as of the last directory fsync
        self.opens = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


class LazyFS:
    """The FUSE operations (fusepy's high-level API), one lock around the whole model."""

    use_ns = True
    flag_nullpath_ok = True   # read/write/fsync an unlinked file through its descriptor

    def __init__(self, backing: str, torn: bool = False, seed: int | None = None) -> None:
        self.backing = os.path.abspath(backing)
        self.torn = torn
        self.rng = random.Random(seed)
        self.mutex = threading.RLock()
        self.nodes: dict[int, Node] = {}
        self.names: dict[int, set[tuple[int, str]]] = {}   # ino -> current (dir ino, name)
        self.dnames: dict[int, set[tuple[int, str]]] = {}  # ino -> durable (dir ino, name)
        self.fhs: dict[int, tuple[int, int]] = {}           # fh -> (ino, open flags)
        self.next_ino = 1
        self.next_fh = 1
        self.crashed = False
        self.stats = {"fsync": 0, "fdatasync": 0, "fsyncdir": 0, "writes": 0, "bytes": 0}
        self.root = self._load(self.backing)

    # -- model -----------------------------------------------------------------------

    def _new(self, mode: int, uid: int = 0, gid: int = 0) -> Node:
        node = Node(self.next_ino, mode, uid, gid)
        self.next_ino += 1
        self.nodes[node.ino] = node
        self.names[node.ino] = set()
        self.dnames[node.ino] = set()
        return node

    def _load(self, top: str) -> Node:
        """Read the backing folder: at mount, everything in it is durable."""
        seen: dict[tuple[int, int], Node] = {}

        def node_for(path: str, st: os.stat_result) -> Node | None:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                return seen[key]
            if stat.S_ISDIR(st.st_mode):
                node = self._new(st.st_mode, st.st_uid, st.st_gid)
                for entry in os.scandir(path):
                    child = node_for(entry.path, entry.stat(follow_symlinks=False))
                    if child is not None:
                        self._attach(node, entry.name, child.ino)
                        self._dset(node, entry.name, child.ino)
            elif stat.S_ISREG(st.st_mode):
                node = self._new(st.st_mode, st.st_uid, st.st_gid)
                with open(path, "rb") as src:
                    node.synced = src.read()
                node.data = bytearray(node.synced)
            elif stat.S_ISLNK(st.st_mode):
                node = self._new(st.st_mode, st.st_uid, st.st_gid)
                node.target = os.fsencode(os.readlink(path))
            else:
                return None  # sockets, fifos: not kept across a mount
            node.mtime = node.atime = st.st_mtime_ns
            node.ctime = st.st_ctime_ns
            seen[key] = node
            return node

        os.makedirs(top, exist_ok=True)
        return node_for(top, os.stat(top))

    def _attach(self, parent: Node, name: str, ino: int) -> None:
        old = parent.entries.get(name)
        if old is not None:
            self._detach(parent, name)
        parent.entries[name] = ino
        self.names[ino].add((parent.ino, name))
        parent.mtime = parent.ctime = time.time_ns()

    def _detach(self, parent: Node, name: str) -> int:
        ino = parent.entries.pop(name)
        self.names[ino].discard((parent.ino, name))
        parent.mtime = parent.ctime = time.time_ns()
        self._maybe_free(ino)
        return ino

    def _dset(self, parent: Node, name: str, ino: int | None) -> None:
        """Set the durable entry parent/name (None: no durable entry)."""
        old = parent.dentries.get(name)
        if old == ino:
            return
        if old is not None:
            del parent.dentries[name]
            self.dnames[old].discard((parent.ino, name))
            self._maybe_free(old)
        if ino is not None:
            parent.dentries[name] = ino
            self.dnames[ino].add((parent.ino, name))

    def _maybe_free(self, ino: int) -> None:
        node = self.nodes.get(ino)
        if node is None or self.names[ino] or self.dnames[ino] or node.opens or node is getattr(self, "root", None):
            return
        del self.nodes[ino], self.names[ino], self.dnames[ino]
        for name in list(node.dentries):
            self._dset(node, name, None)

    def _fsync_file(self, node: Node) -> None:
        if node.is_reg:
            node.synced = bytes(node.data)
            node.log.clear()
        node.smode = node.mode

    def _fsync_dir(self, d: Node) -> None:
        changed = [(name, d.dentries.get(name), d.entries.get(name))
                   for name in set(d.entries) | set(d.dentries)
                   if d.entries.get(name) != d.dentries.get(name)]
        for name, _old, new in changed:
            if new is not None and not self.dnames[new]:
                self.nodes[new].smode = self.nodes[new].mode
            self._dset(d, name, new)
        for _name, old, new in changed:
            if new is not None:
                # Rename atomicity: the durable names the inode no longer has go with
                # the new one (its old directory need not be fsynced for that).
                for pino, pname in list(self.dnames.get(new, ())):
                    parent = self.nodes[pino]
                    if parent.entries.get(pname) != new:
                        self._dset(parent, pname, None)
            if old is not None and old in self.nodes:
                # The other half: an inode renamed out of this directory gets its new
                # name made durable with the removal of the old one.
                for pino, pname in list(self.names[old] - self.dnames[old]):
                    self._dset(self.nodes[pino], pname, old)

    def _torn_prefix(self, node: Node) -> bytes:
        keep = self.rng.randint(0, len(node.log))
        data = bytearray(node.synced)
        for i, op in enumerate(node.log[:keep + 1]):
            if op[0] == "t":
                if i == keep:
                    break
                del data[op[1]:]
                data.extend(b"\0" * (op[1] - len(data)))
                continue
            _, off, chunk = op
            if i == keep:  # the write in flight: a whole number of sectors of it
                chunk = chunk[:SECTOR * self.rng.randint(0, len(chunk) // SECTOR)]
            if off > len(data):
                data.extend(b"\0" * (off - len(data)))
            data[off:off + len(chunk)] = chunk
        return bytes(data)

    def crash(self) -> dict:
        """The power cut: freeze, and leave on the backing folder only what was durable."""
        with self.mutex:
            if not self.crashed:
                self.crashed = True
                if self.torn:
                    for node in self.nodes.values():
                        if node.is_reg and node.log:
                            node.synced = self._torn_prefix(node)
                self._render(durable=True)
            return dict(self.stats)

    def _render(self, durable: bool) -> None:
        """Write the durable (after a cut) or current (clean unmount) tree to the backing folder."""
        new = self.backing + ".lazyfs-new"
        old = self.backing + ".lazyfs-old"
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
        written: dict[int, str] = {}

        def put(node: Node, path: str) -> None:
            mode = stat.S_IMODE(node.smode if durable else node.mode)
            if node.is_dir:
                os.mkdir(path)
                for name, ino in (node.dentries if durable else node.entries).items():
                    put(self.nodes[ino], os.path.join(path, name))
                os.chmod(path, mode)
            elif stat.S_ISLNK(node.mode):
                os.symlink(node.target, path)
            elif node.ino in written:
                os.link(written[node.ino], path)
            else:
                with open(path, "wb") as out:
                    out.write(node.synced if durable else node.data)
                os.chmod(path, mode)
                written[node.ino] = path
            if not stat.S_ISLNK(node.mode):
                os.utime(path, ns=(node.atime, node.mtime))

        put(self.root, new)
        os.rename(self.backing, old)
        os.rename(new, self.backing)
        shutil.rmtree(old)

    # -- path helpers ----------------------------------------------------------------

    def _check(self) -> None:
        if self.crashed:
            raise _err(errno.EIO)

    def _lookup(self, path: str) -> Node:
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if not node.is_dir:
                raise _err(errno.ENOTDIR)
            ino = node.entries.get(part)
            if ino is None:
                raise _err(errno.ENOENT)
            node = self.nodes[ino]
        return node

    def _split(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._lookup(head)
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        return parent, name

    def _node(self, path: str | None, fh) -> Node:
        if isinstance(fh, int) and fh in self.fhs:
            node = self.nodes.get(self.fhs[fh][0])
            if node is not None:
                return node
        if path is None:
            raise _err(errno.EBADF)
        return self._lookup(path)

    def _open_fh(self, node: Node, flags: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.fhs[fh] = (node.ino, flags)
        node.opens += 1
        return fh

    # -- FUSE operations -------------------------------------------------------------

    def __call__(self, op: str, *args):
        with self.mutex:
            self._check()
            return getattr(self, "op_" + op)(*args)

    def __getattr__(self, name: str):
        # fusepy registers an operation when the object has an attribute of that name.
        if not name.startswith("op_") and hasattr(type(self), "op_" + name):
            return getattr(self, "op_" + name)
        raise AttributeError(name)

    def op_init(self, path):
        print("ready", flush=True)

    def op_destroy(self, path):
        if not self.crashed:
            self._render(durable=False)

    def op_access(self, path, amode):
        self._lookup(path)
        return 0

    def op_getattr(self, path, fh=None):
        node = self._node(path, fh)
        if node.is_dir:
            nlink = 2 + sum(1 for ino in node.entries.values() if self.nodes[ino].is_dir)
            size = 4096
        else:
            nlink = len(self.names[node.ino])
            size = len(node.data) if node.is_reg else len(node.target)
        return {"st_mode": node.mode, "st_ino": node.ino, "st_nlink": nlink, "st_size": size,
                "st_uid": node.uid, "st_gid": node.gid, "st_blocks": (size + 511) // 512,
                "st_atime": node.atime, "st_mtime": node.mtime, "st_ctime": node.ctime}

    def op_statfs(self, path):
        st = os.statvfs(os.path.dirname(self.backing) or "/")
        return {key: getattr(st, key) for key in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
            "f_files", "f_ffree", "f_favail", "f_namemax")}

    def op_readdir(self, path, fh):
        node = self._node(path, fh)
        return [".", ".."] + list(node.entries)

    def op_opendir(self, path):
        node = self._lookup(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        return self._open_fh(node, os.O_RDONLY)

    def op_releasedir(self, path, fh):
        self.op_release(path, fh)

    def op_fsyncdir(self, path, datasync, fh):
        self.stats["fsyncdir"] += 1
        self._fsync_dir(self._node(path, fh))

    def _make(self, path: str, mode: int) -> Node:
        parent, name = self._split(path)
        if name in parent.entries:
            raise _err(errno.EEXIST)
        node = self._new(mode)
        self._attach(parent, name, node.ino)
        return node

    def op_mkdir(self, path, mode):
        self._make(path, stat.S_IFDIR | (mode & 0o7777))

    def op_mknod(self, path, mode, dev):
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)):
            raise _err(errno.EPERM)
        self._make(path, mode)

    def op_create(self, path, mode, fi=None):
        node = self._make(path, stat.S_IFREG | (mode & 0o7777))
        return self._open_fh(node, os.O_RDWR)

    def op_open(self, path, flags):
        node = self._lookup(path)
        if node.is_dir:
            raise _err(errno.EISDIR)
        if flags & os.O_TRUNC:
            self._truncate(node, 0)
        return self._open_fh(node, flags)

    def op_release(self, path, fh):
        ino, _flags = self.fhs.pop(fh, (None, 0))
        node = self.nodes.get(ino) if ino is not None else None
        if node is not None:
            node.opens -= 1
            self._maybe_free(ino)

    def op_flush(self, path, fh):
        return 0

    def op_read(self, path, size, offset, fh):
        node = self._node(path, fh)
        return bytes(node.data[offset:offset + size])

    def op_write(self, path, data, offset, fh):
        node = self._node(path, fh)
        if fh in self.fhs and self.fhs[fh][1] & os.O_APPEND:
            offset = len(node.data)
        if offset > len(node.data):
            node.data.extend(b"\0" * (offset - len(node.data)))
        node.data[offset:offset + len(data)] = data
        if self.torn:
            node.log.append(("w", offset, bytes(data)))
        node.mtime = node.ctime = time.time_ns()
        self.stats["writes"] += 1
        self.stats["bytes"] += len(data)
        return len(data)

    def _truncate(self, node: Node, length: int) -> None:
        if not node.is_reg:
            raise _err(errno.EINVAL)
        del node.data[length:]
        node.data.extend(b"\0" * (length - len(node.data)))
        if self.torn:
            node.log.append(("t", length))
        node.mtime = node.ctime = time.time_ns()

    def op_truncate(self, path, length, fh=None):
        self._truncate(self._node(path, fh), length)

    def op_fsync(self, path, datasync, fh):
        self.stats["fdatasync" if datasync else "fsync"] += 1
        self._fsync_file(self._node(path, fh))

    def op_unlink(self, path):
        parent, name = self._split(path)
        node = self._lookup(path)
        if node.is_dir:
            raise _err(errno.EISDIR)
        self._detach(parent, name)

    def op_rmdir(self, path):
        parent, name = self._split(path)
        node = self._lookup(path)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if node.entries:
            raise _err(errno.ENOTEMPTY)
        self._detach(parent, name)

    def op_rename(self, old, new):
        sparent, sname = self._split(old)
        node = self._lookup(old)
        dparent, dname = self._split(new)
        target = dparent.entries.get(dname)
        if target == node.ino:
            return
        if target is not None:
            tnode = self.nodes[target]
            if tnode.is_dir and not node.is_dir:
                raise _err(errno.EISDIR)
            if node.is_dir and not tnode.is_dir:
                raise _err(errno.ENOTDIR)
            if tnode.is_dir and tnode.entries:
                raise _err(errno.ENOTEMPTY)
        if node.is_dir:  # no moving a directory into itself
            walk = dparent
            while True:
                if walk.ino == node.ino:
                    raise _err(errno.EINVAL)
                up = next(iter(self.names[walk.ino]), None)
                if up is None:
                    break
                walk = self.nodes[up[0]]
        self.nodes[node.ino].opens += 1  # keep it alive between detach and attach
        self._detach(sparent, sname)
        self._attach(dparent, dname, node.ino)
        node.opens -= 1
        node.ctime = time.time_ns()

    def op_link(self, target, source):
        node = self._lookup(source)
        if node.is_dir:
            raise _err(errno.EPERM)
        parent, name = self._split(target)
        if name in parent.entries:
            raise _err(errno.EEXIST)
        self._attach(parent, name, node.ino)

    def op_symlink(self, target, source):
        node = self._make(target, stat.S_IFLNK | 0o777)
        node.target = os.fsencode(source)

    def op_readlink(self, path):
        node = self._lookup(path)
        if not stat.S_ISLNK(node.mode):
            raise _err(errno.EINVAL)
        return os.fsdecode(node.target)

    def op_chmod(self, path, mode):
        node = self._lookup(path)
        node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        node.ctime = time.time_ns()

    def op_chown(self, path, uid, gid):
        node = self._lookup(path)
        if uid != -1 and uid != 0xFFFFFFFF:
            node.uid = uid
        if gid != -1 and gid != 0xFFFFFFFF:
            node.gid = gid

    def op_utimens(self, path, times=None):
        node = self._lookup(path)
        if times is None:
            now = time.time_ns()
            times = (now, now)
        node.atime, node.mtime = times


# -- the server process --------------------------------------------------------------

def serve(backing: str, mountpoint: str, torn: bool, seed: int | None) -> None:
    fuse = _fuse_module()
    fs = LazyFS(backing, torn=torn, seed=seed)
    # The signals are taken by one thread with sigwait: FUSE's own threads and the
    # main thread (inside libfuse's C loop, where Python handlers never run) block them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})

    def control() -> None:
        while True:
            sig = signal.sigwait({signal.SIGUSR1, signal.SIGUSR2})
            if sig == signal.SIGUSR1:
                print("crashed " + json.dumps(fs.crash()), flush=True)
            else:
                with fs.mutex:
                    print("stats " + json.dumps(fs.stats), flush=True)

    threading.Thread(target=control, daemon=True, name="control").start()
    fuse.FUSE(fs, mountpoint, foreground=True, nothreads=False, use_ino=True,
              hard_remove=True, allow_other=True, fsname="lazyfs", subtype="lazyfs",
              entry_timeout=0, negative_timeout=0, attr_timeout=0)


class LazyMount:
    """The test side: run the server as its own process, crash it, remount it."""

    def __init__(self, backing: Path, mountpoint: Path, torn: bool = False, seed: int | None = None) -> None:
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.torn = torn
        self.seed = seed
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str] = queue.Queue()

    @staticmethod
    def available() -> str | None:
        """None if FUSE can be used here, else why not."""
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if os.geteuid() != 0:
            return "mounting the FUSE layer needs root"
        try:
            _fuse_module()
        except FuseMissing as exc:
            return str(exc)
        return None

    def mount(self, timeout: float = 20.0) -> "LazyMount":
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(HERE), str(self.backing), str(self.mountpoint)]
        if self.torn:
            cmd.append("--torn")
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        self.lines = queue.Queue()
        # Its stderr (fusepy's tracebacks) goes to a file: an inherited pipe would outlive the caller.
        with open(f"{self.mountpoint}.lazyfs.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         text=True, start_new_session=True)
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        self._expect("ready", timeout)
        deadline = time.monotonic() + timeout
        while not self.mounted():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"lazyfs did not mount {self.mountpoint}")
            time.sleep(0.02)
        return self

    @staticmethod
    def _read(proc: subprocess.Popen, lines: "queue.Queue[str]") -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put("")

    def _expect(self, word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"lazyfs: no {word!r} within {timeout}s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line == "" and self.proc.poll() is not None:
                raise RuntimeError(f"lazyfs exited ({self.proc.returncode}) before {word!r}")
            if line.split(" ", 1)[0] == word:
                return line[len(word):].strip()

    def crash(self, timeout: float = 60.0) -> dict:
        """Cut the power: everything not durable is gone from the backing folder when this returns.

        The mount stays, failing every operation with EIO, until `unmount()`: kill the
        processes using it first.
        """
        self.proc.send_signal(signal.SIGUSR1)
        return json.loads(self._expect("crashed", timeout))

    def stats(self, timeout: float = 10.0) -> dict:
        self.proc.send_signal(signal.SIGUSR2)
        return json.loads(self._expect("stats", timeout))

    def unmount(self, timeout: float = 60.0) -> None:
        """Unmount (after a crash, or cleanly: then everything is written to the backing folder)."""
        if self.proc is None:
            return
        # Not os.path.ismount: after a crash its lstat fails with EIO and it says False.
        if self.mounted():
            done = subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        self.proc = None

    def mounted(self) -> bool:
        target = os.path.abspath(self.mountpoint)
        with open("/proc/self/mountinfo") as table:
            return any(line.split()[4] == target for line in table)

    def remount(self) -> "LazyMount":
        self.unmount()
        return self.mount()

    def __enter__(self) -> "LazyMount":
        return self.mount()

    def __exit__(self, *exc) -> None:
        self.unmount()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--torn", action="store_true", help="a random prefix of unsynced writes survives a crash")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    serve(args.backing, args.mountpoint, args.torn, args.seed)


if __name__ == "__main__":
    main()
