"""A clean Debian bookworm booted with systemd-nspawn, for `make deb-check`.

The debootstrap root is cached (CACHE/bookworm, rebuilt when missing) and
never booted itself: every run boots a fresh copy in a folder of its own.
Commands run inside through nsenter into the container's PID 1 (its systemd),
so `systemctl` and `journalctl` there talk to the container's own systemd.
The container shares the host's network (apt reaches Debian's archive; the
daemons listen on free 127.0.0.1 ports picked by the check).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# What a booted robot or gateway image has beyond minbase: an init and a system
# bus. Everything else must come from the packages' dependencies through apt.
INCLUDE = "systemd,systemd-sysv,dbus"
ROOT_MARKER = ".otad-deb-check-root"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class CheckFailed(AssertionError):
    pass


def log(message: str) -> None:
    print(message, flush=True)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5) -> object:
    """Poll `predicate` until it returns something true, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def cached_root(cache: Path) -> Path:
    """CACHE/bookworm, made with debootstrap if missing or made differently (under a lock: one builder at a time)."""
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / SUITE
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recipe = f"debootstrap --variant=minbase --include={INCLUDE} {SUITE} {MIRROR}\n"
        marker = root / ROOT_MARKER
        if marker.exists() and marker.read_text() == recipe:
            return root
        staging = cache / f"{SUITE}.new"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        log(f"== building the cached Debian {SUITE} root with debootstrap ({MIRROR}) into {root}")
        started = time.monotonic()
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(staging), MIRROR],
            check=True, stdout=subprocess.DEVNULL,
        )
        (staging / "etc/apt/sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
        # Booted copies get their own machine id at first boot.
        (staging / "etc/machine-id").write_text("")
        subprocess.run(["chroot", str(staging), "apt-get", "clean"], check=True, env={"PATH": PATH})
        (staging / ROOT_MARKER).write_text(recipe)
        staging.rename(root)
        log(f"   cached root built in {time.monotonic() - started:.0f}s")
        return root


class Container:
    """One booted copy of the cached root. Use as a context manager: it always cleans up."""

    def __init__(self, cache: Path, name: str) -> None:
        self.cache = cache
        self.name = name
        self.workdir = Path(tempfile.mkdtemp(prefix="otad-deb-check.", dir="/var/tmp"))
        self.root = self.workdir / "root"
        self.console = self.workdir / "console.log"
        self.nspawn: subprocess.Popen | None = None
        self.pid1 = 0

    # -- life cycle -------------------------------------------------------------
    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def boot(self) -> None:
        base = cached_root(self.cache)
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(self.root)], check=True)
        archives = self.cache / "apt-archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        console = open(self.console, "wb")
        # --register=no --keep-unit: this host's PID 1 is not systemd (no machined, no
        # scope units to ask for). The apt archive cache is shared between runs so a warm
        # run downloads nothing; the packages still come from Debian's archive through apt.
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--boot", f"--directory={self.root}", f"--machine={self.name}",
             "--register=no", "--keep-unit", "--console=read-only",
             f"--bind={archives}:/var/cache/apt/archives"],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
        )
        console.close()
        self.pid1 = int(wait_until(self._find_pid1, 60, "the container's systemd to start"))
        state = wait_until(self._booted, 120, "the container to finish booting")
        log(f"   container {self.name} booted (PID 1 = host pid {self.pid1}, system {state})")

    def _find_pid1(self) -> int:
        if self.nspawn is not None and self.nspawn.poll() is not None:
            raise CheckFailed(f"systemd-nspawn exited {self.nspawn.returncode}: {self.console.read_text()[-2000:]}")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("PPid", "").strip() == str(self.nspawn.pid) and fields.get("NSpid", "").split()[-1:] == ["1"]:
                return int(entry.name)
        return 0

    def _booted(self) -> str:
        result = self.run("systemctl is-system-running", check=False)
        state = result.stdout.strip()
        return state if state in ("running", "degraded") else ""

    def destroy(self) -> None:
        """Power off, then make sure no process, mount or file of this run is left."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            # SIGTERM makes systemd-nspawn shut the container down in order.
            self.nspawn.terminate()
            try:
                self.nspawn.wait(timeout=45)
            except subprocess.TimeoutExpired:
                log("   container did not power off in 45s; killing it")
                if self.pid1:
                    try:
                        os.kill(self.pid1, signal.SIGKILL)  # takes its whole PID namespace with it
                    except ProcessLookupError:
                        pass
                self.nspawn.kill()
                self.nspawn.wait(timeout=30)
        for mount in reversed(self.mounts()):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        leftovers = self.leftovers()
        if leftovers:
            raise CheckFailed(f"cleanup left behind: {leftovers}")

    def mounts(self) -> list[str]:
        found = []
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                point = line.split()[4]
                if point.startswith(str(self.workdir)):
                    found.append(point)
        return found

    def leftovers(self) -> list[str]:
        left = [f"mount {m}" for m in self.mounts()]
        if self.workdir.exists():
            left.append(f"folder {self.workdir}")
        if self.pid1 and Path(f"/proc/{self.pid1}").exists():
            left.append(f"container init pid {self.pid1}")
        if self.nspawn is not None and self.nspawn.poll() is None:
            left.append(f"systemd-nspawn pid {self.nspawn.pid}")
        return left

    # -- inside -----------------------------------------------------------------
    def run(self, command: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a shell command inside the container (all of its namespaces, its root)."""
        variables = [f"{k}={v}" for k, v in {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root",
                                             "DEBIAN_FRONTEND": "noninteractive", **(env or {})}.items()]
        argv = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-r", "-w",
                "env", "-i", *variables, "/bin/sh", "-c", command]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise CheckFailed(f"in the container, `{command}` exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def out(self, command: str, **kwargs: object) -> str:
        return self.run(command, **kwargs).stdout  # type: ignore[arg-type]

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file into the container's root (from the host side)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
