"""What every power-cut loop shares (tests/powercut_*.py, on the layer of tests/lazyfs.py).

A loop runs one daemon with its state on a `LazyMount`, cuts the power at random moments
(`cut()`: the layer's crash(), SIGKILL of every process using the mount, unmount), mounts
afresh over the same backing folder, restarts the daemon, and checks its invariants. The
seed decides everything random, so `POWER_SEED` replays a run. `soak_main` is the command
line of each loop: POWER_CUTS, POWER_SEED, POWER_SECONDS (a time bound; the summary says
how many cuts ran); exit 1 on any violation, the logs kept.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lazyfs import LazyMount  # noqa: E402


@dataclass
class Report:
    what: str
    seed: int
    cuts: int = 0
    phases: Counter = field(default_factory=Counter)
    steps: Counter = field(default_factory=Counter)  # cuts aimed at a named step (a frozen daemon)
    torn: int = 0
    violations: list[str] = field(default_factory=list)
    fsyncs: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        phases = ", ".join(f"{phase} {count}" for phase, count in sorted(self.phases.items()))
        steps = ", ".join(f"{step} {count}" for step, count in sorted(self.steps.items()))
        return (f"{self.what} power cuts: seed {self.seed}, {self.cuts} cuts ({self.torn} with torn writes); "
                f"phases at the cut: {phases}; " + (f"steps: {steps}; " if steps else "") +
                f"violations: {len(self.violations)}; "
                f"layer calls: {dict(self.fsyncs)}")


def kill_users(mountpoint: Path) -> None:
    """SIGKILL every process with its cwd, root or an open file on the mount (the power is off)."""
    prefix = str(mountpoint.resolve())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        links = [f"/proc/{pid}/cwd", f"/proc/{pid}/root"]
        try:
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == prefix or target.startswith(prefix + "/"):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break


def stopped(pid: int) -> bool:
    """True once every thread of the process is stopped by a signal (state T), e.g. frozen at a
    named step: a process-wide stop reaches its threads one by one."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
        states = []
        for tid in threads:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                states.append(stat.read().rpartition(")")[2].split()[0])
    except (OSError, IndexError):
        return False
    return bool(states) and all(state == "T" for state in states)


def tree(root: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


class PowerLayer:
    """A LazyMount whose every mount draws, from the loop's seed, whether writes tear."""

    def __init__(self, disk: Path, mnt: Path, rng: random.Random, report: Report) -> None:
        self.lazy = LazyMount(disk, mnt)
        self.mnt = mnt
        self.rng = rng
        self.report = report

    def mount(self) -> None:
        self.lazy.torn = self.rng.random() < 0.5
        self.lazy.seed = self.rng.randrange(1 << 30)
        self.lazy.mount()

    def cut(self, *daemons) -> None:
        """The power cut: unsynced writes lost, every process on the mount killed, unmounted."""
        self.report.fsyncs.update(self.lazy.crash())
        self.report.torn += self.lazy.torn
        for daemon in daemons:
            daemon.kill9()
        kill_users(self.mnt)
        self.lazy.unmount()

    def close(self) -> None:
        kill_users(self.mnt)
        self.lazy.unmount()


class Loop(Protocol):
    verbose: bool

    def run(self, cuts: int, seconds: float | None = None) -> Report: ...


def soak_main(what: str, make_loop: Callable[[object, int], Loop]) -> int:
    """Run one loop from the command line: a fresh Site with its keys, `make_loop(site, seed)`."""
    from conftest import otad_release
    from fleet import Site

    why = LazyMount.available()
    if why:
        print(f"{what} power-cut soak skipped: {why}")
        return 0
    cuts = int(os.environ.get("POWER_CUTS", "200"))
    seed = int(os.environ.get("POWER_SEED", str(random.SystemRandom().randrange(1 << 31))))
    print(f"{what} power-cut soak: seed {seed} (POWER_SEED={seed} replays it), {cuts} cuts", flush=True)
    root = Path(tempfile.mkdtemp(prefix=f"otad-power-{what}-"))
    print(f"{what} power-cut soak: logs in {root} (removed if every invariant held)", flush=True)
    (root / "keys").mkdir()
    result = otad_release("keygen", "--output-prefix", str(root / "keys" / "release"))
    assert result.returncode == 0, result.stderr
    site = Site(root, root / "keys" / "release.key", root / "keys" / "release.pub")
    started = time.monotonic()
    try:
        loop = make_loop(site, seed)
        loop.verbose = True
        seconds = float(os.environ["POWER_SECONDS"]) if os.environ.get("POWER_SECONDS") else None
        report = loop.run(cuts, seconds)
    finally:
        site.stop_all()
    print(report.summary() + f"; {time.monotonic() - started:.0f}s")
    for violation in report.violations:
        print("VIOLATION " + violation)
    if report.violations:
        return 1
    shutil.rmtree(root)
    return 0
