#!/usr/bin/env python3
"""Benchmark `otad-robot` installing a release against curl + sha256sum + tar, and its idle cost.

A measurement, not a test: it always exits 0 (unless it cannot run at all) and
prints PASS/MISS against three targets, and reports the idle CPU:

* wall clock of one install: otad-robot, from its `downloading app` log line to
  its `installed app` line, <= 1.15 x (`curl -s -o F URL`, `sha256sum F`,
  `mkdir D && tar xzf F -C D`), the reference reported with and without a final
  `sync -f D`;
* peak RSS of otad-robot over the install (VmHWM right after `installed`) <= 40 MiB;
* RSS of otad-robot idle between polls (VmRSS --settle-seconds after the install) <= 30 MiB;
* CPU time of otad-robot while idle polling, over --idle-seconds (no target; reported).

It sets up, in a temporary folder under /tmp, a real dashboard and a real gateway
on 127.0.0.1, builds and publishes with `otad-release` one release of an app
generated like bench/release_build.py's (same mix of random, text-like and
binary-like files), sized so that the .tar.gz is about --size-mb MiB, waits
until the gateway has cached and verified it, then starts, --repeat times, a
robot with fresh STATE_DIR and APP_DIR and times its install. The robot of the
last run stays up for the idle measurements. As a diagnostic, it also times
otad.robot.unpack.unpack_release alone, with its CHUNK as shipped and at 64 KiB.
Run it as

    .venv/bin/python bench/robot_install.py [--size-mb 256] [--repeat 3] [--idle-seconds 300]

It needs curl, sha256sum, tar and sync. See docs/benchmarks.md for the figures
and how to read them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from release_build import make_app_in_child  # noqa: E402  the same app generator, in a forked child
from gateway_serving import (  # noqa: E402 - shared helpers of the benchmarks
    _verdict,
    busy_cpu_seconds,
    cpu_seconds,
    http_get,
    proc_status_kib,
    wait_until,
)

MIB = 1 << 20

RATIO_TARGET = 1.15
PEAK_RSS_TARGET_MIB = 40.0
IDLE_RSS_TARGET_MIB = 30.0
# gzip -6 brings release_build's mix to about 0.578 of its size (docs/benchmarks.md): the app
# folder is size-mb / COMPRESSED_SHARE so that the artifact is about size-mb.
COMPRESSED_SHARE = 0.578
# Warn when the CPU time spent outside the processes measured and this script exceeds this
# share of the machine's CPU time during the runs: other processes competed for the CPUs.
NOISE_SHARE = 0.10
INSTALL_TIMEOUT = 900  # seconds one robot may take from start to `installed`


# --------------------------------------------------------------------------- helpers


def _bin(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: run with the project's venv, e.g. .venv/bin/python bench/robot_install.py")
    return found


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all the process's threads: its wake-ups."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def own_and_children_cpu() -> float:
    """CPU of this script and its reaped children (reference commands, stopped robots)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _exec_child(argv: list[str], stdout_fd: int, env: dict[str, str] | None) -> None:
    """In a freshly forked child: redirect and exec, never return."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stdout_fd, 2)
        os.execvpe(argv[0], argv, env if env is not None else os.environ)
    finally:
        os._exit(127)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Run argv to its end; return (wall seconds, peak RSS KiB from wait4, exit status).

    fork + exec rather than subprocess (which uses vfork; see bench/release_build.py).
    """
    with open(log, "ab") as out:
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _exec_child(argv, out.fileno(), env)
        _, status, usage = os.wait4(pid, 0)
        elapsed = time.perf_counter() - start
    return elapsed, usage.ru_maxrss, os.waitstatus_to_exitcode(status)


def must(result: tuple[float, int, int], argv: list[str], log: Path) -> float:
    if result[2] != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        sys.exit(f"{' '.join(argv)} failed with exit status {result[2]}")
    return result[0]


class Daemon:
    """A daemon started with fork + exec; its stderr read line by line and stamped on arrival.

    otad logs carry no timestamps (journald adds them), so this script stamps
    each line with time.perf_counter() as it reads it from the pipe; with
    PYTHONUNBUFFERED=1 a line arrives within microseconds of being logged.
    """

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        read_fd, write_fd = os.pipe()
        self.started = time.perf_counter()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read_fd)
            _exec_child(argv, write_fd, env)
        os.close(write_fd)
        self.status: int | None = None
        self.max_rss_kib = 0
        self._reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe, open(self.log, "ab") as out:
            for raw in pipe:
                stamp = time.perf_counter()
                out.write(raw)
                out.flush()
                with self._cond:
                    self.lines.append((stamp, raw.decode(errors="replace").rstrip("\n")))
                    self._cond.notify_all()
        with self._cond:
            self.lines.append((time.perf_counter(), "<EOF>"))
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> tuple[float, re.Match]:
        """(arrival time, match) of the first line matching pattern; exits the script if it never comes."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for stamp, line in self.lines[seen:]:
                    match = compiled.search(line)
                    if match:
                        return stamp, match
                    if line == "<EOF>":
                        self.stop()
                        sys.exit(f"{self.log.stem} exited (status {self.status}) before logging {pattern!r}:\n"
                                 f"{self.log.read_text(errors='replace')[-3000:]}")
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop()
                    sys.exit(f"timed out after {timeout:.0f} s waiting for {self.log.stem} to log {pattern!r}")
                self._cond.wait(min(left, 1.0))

    def stamp_of(self, pattern: str) -> float | None:
        compiled = re.compile(pattern)
        with self._cond:
            return next((s for s, line in self.lines if compiled.search(line)), None)

    def _reap(self, flags: int) -> bool:
        pid, status, usage = os.wait4(self.pid, flags)
        if pid != self.pid:
            return False
        self.status, self.max_rss_kib = os.waitstatus_to_exitcode(status), usage.ru_maxrss
        return True

    def alive(self) -> bool:
        return self.status is None and not self._reap(os.WNOHANG)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL after timeout; reaps the process and records its ru_maxrss."""
        if self.status is not None:
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while not self._reap(os.WNOHANG):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                self._reap(0)
                break
            time.sleep(0.05)
        self._reader.join(5)

    def url(self, timeout: float = 30) -> str:
        return self.wait_for(r"listening on (http://\S+)", timeout)[1][1]


def write_config(path: Path, values: dict[str, object]) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def fresh(*paths: Path) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def sync_all() -> None:
    """Untimed: write back everything dirty, so no run pays for the previous one's writes."""
    os.sync()


# --------------------------------------------------------------------------- runs

@dataclass
class Site:
    """What start_site set up: a published release, cached and verified by a running gateway."""
    key: Path  # key prefix: .key signs, .pub verifies
    version: str
    manifest: dict
    stats: object  # release_build.AppStats of the generated app folder
    ota: Path  # the dashboard's OTA_DIR
    gateway_url: str
    url: str  # the artifact at the gateway


def build_and_publish(work: Path, key: Path, version: str, size_mb: float, seed: int, env: dict[str, str],
                      ota: Path) -> tuple[dict, object]:
    """Generate an app folder whose .tar.gz is about size_mb MiB, build it with `otad-release` (signed
    with key.key) and publish it to `ota`; returns (manifest, release_build.AppStats)."""
    release = _bin("otad-release")
    app, out = work / f"app-{version}", work / f"out-{version}"
    stats = make_app_in_child(app, int(size_mb * MIB / COMPRESSED_SHARE), seed)
    subprocess.run([release, "build", "--app-dir", str(app), "--version", version,
                    "--key", str(key.with_suffix(".key")), "--out", str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([release, "publish", "--from", str(out), "--to", str(ota)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(app)
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)
    return manifest, stats


def wait_cached(gateway_url: str, version: str, timeout: float = 600) -> None:
    """Until the gateway serves `version` (it has cached and verified it)."""
    def cached():
        status, body = http_get(f"{gateway_url}/manifest")
        return status == 200 and json.loads(body).get("version") == version
    wait_until(cached, timeout, f"the gateway to cache and verify release {version}", interval=0.2)


def start_site(work: Path, size_mb: int, seed: int, env: dict[str, str], daemons: list[Daemon],
               version: str = "1.0.0", gateway_extra: dict | None = None) -> Site:
    """Build and publish with `otad-release` a release whose .tar.gz is about size_mb MiB, start a
    real dashboard and gateway on 127.0.0.1 (appended to daemons; gateway_extra: more gateway.conf
    settings), wait until the gateway has cached and verified it, and read it once through the
    gateway (page cache warm for every run)."""
    release, dashboard_cmd, gateway_cmd = _bin("otad-release"), _bin("otad-dashboard"), _bin("otad-gateway")
    key = work / "bench"
    subprocess.run([release, "keygen", "--output-prefix", str(key)], env=env, check=True, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    ota = work / "ota"
    manifest, stats = build_and_publish(work, key, version, size_mb, seed, env, ota)
    print(f"generated {stats.files} files in {stats.dirs} folders ({stats.total_bytes / MIB:.0f} MiB), built and "
          f"published {manifest['artifact']} ({manifest['size'] / MIB:.1f} MiB) in {time.perf_counter() - t0:.1f} s")

    dashboard = Daemon([dashboard_cmd, "--config", str(write_config(work / "dashboard.conf", {
        "LISTEN": "127.0.0.1:0", "OTA_DIR": ota, "STATE_DIR": work / "dashboard-state"}))],
        work / "dashboard.log", env)
    daemons.append(dashboard)
    dashboard_url = dashboard.url()
    gateway = Daemon([gateway_cmd, "--config", str(write_config(work / "gateway.conf", {
        "DASHBOARD_URL": dashboard_url, "TRUSTED_KEYS": key.with_suffix(".pub"), "LISTEN": "127.0.0.1:0",
        "STATE_DIR": work / "gateway-state", "POLL_INTERVAL": 5, "CONNECT_TIMEOUT": 5, "READ_TIMEOUT": 30,
        "GATEWAY_ID": "bench", **(gateway_extra or {})}))], work / "gateway.log", env)
    daemons.append(gateway)
    gateway_url = gateway.url()
    t0 = time.perf_counter()
    wait_cached(gateway_url, version)
    url = f"{gateway_url}/ota/{manifest['artifact']}"
    # Warm-up, untimed: the gateway's cached file is in the page cache for every run that follows.
    with urllib.request.urlopen(url, timeout=120) as response:
        digest = hashlib.sha256()
        while chunk := response.read(MIB):
            digest.update(chunk)
    if digest.hexdigest() != manifest["sha256"]:
        sys.exit("the gateway serves an artifact that does not match the manifest")
    print(f"gateway cached and verified it in {time.perf_counter() - t0:.1f} s; serving {url}")
    return Site(key, version, manifest, stats, ota, gateway_url, url)



@dataclass
class Run:
    which: str
    seconds: float  # the figure compared: reference without sync, otad downloading -> installed
    steps: dict[str, float] = field(default_factory=dict)
    peak_rss_kib: int = 0
    other_cpu: float = 0.0  # machine CPU not spent by the measured processes or this script
    total_cpu: float = 0.0  # machine busy CPU during the run


def run_reference(url: str, sha256: str, work: Path, log: Path, account) -> Run:
    artifact, dest = work / "ref.tar.gz", work / "ref-app"
    fresh(artifact, dest)
    sync_all()
    mark = account()
    steps: dict[str, float] = {}
    start = time.perf_counter()
    argv = ["curl", "-s", "-o", str(artifact), url]
    steps["curl"] = must(spawn(argv, log), argv, log)
    with open(log, "ab") as out:
        out.write(b"sha256sum:\n")
    argv = ["sha256sum", str(artifact)]
    steps["sha256sum"] = must(spawn(argv, log), argv, log)
    os.mkdir(dest)
    argv = ["tar", "xzf", str(artifact), "-C", str(dest)]
    steps["tar xzf"] = must(spawn(argv, log), argv, log)
    no_sync = time.perf_counter() - start
    argv = ["sync", "-f", str(dest)]
    steps["sync -f"] = must(spawn(argv, log), argv, log)
    steps["with sync"] = time.perf_counter() - start
    other, total = account(mark)
    got = log.read_text(errors="replace").rsplit("sha256sum:\n", 1)[1].split()[0]
    if got != sha256:
        sys.exit(f"the reference downloaded a file whose sha256 {got} is not the manifest's {sha256}")
    return Run("ref", no_sync, steps, 0, other, total)


def start_robot(robot_cmd: str, work: Path, name: str, gateway_url: str, pub: Path, poll_interval: int,
                env: dict[str, str], wrap: tuple[str, ...] = (), extra: dict | None = None) -> Daemon:
    """A robot with fresh STATE_DIR and APP_DIR; wrap prefixes its command line (bench/durability.py:
    strace, eatmydata), so the Daemon's pid is then the wrapper's; extra: more robot.conf settings."""
    state, app = work / f"{name}-state", work / f"{name}-app"
    fresh(state, app)
    config = write_config(work / f"{name}.conf", {
        "GATEWAY_URL": gateway_url, "TRUSTED_KEYS": pub, "ROBOT_ID": name,
        "STATE_DIR": state, "APP_DIR": app, "POLL_INTERVAL": poll_interval,
        "PROBATION_S": 0, "SELFTEST_CMD": "true", **(extra or {}),
    })
    return Daemon([*wrap, robot_cmd, "--config", str(config)], work / f"{name}.log", env)


PHASES = (
    ("start-up", "start", r" ready: "),
    ("to download", r" ready: ", r"^downloading app "),
    ("download+verify", r"^downloading app ", r"^verified app "),
    ("unpack+activate", r"^verified app ", r"^activated app "),
    ("selftest+commit", r"^activated app ", r"^installed app "),
)


def run_otad(robot_cmd: str, work: Path, name: str, gateway_url: str, pub: Path, poll_interval: int,
             env: dict[str, str], version: str, account, wrap: tuple[str, ...] = ()) -> tuple[Run, Daemon]:
    fresh(work / f"{name}-state", work / f"{name}-app")
    sync_all()
    mark = account()
    robot = start_robot(robot_cmd, work, name, gateway_url, pub, poll_interval, env, wrap)
    installed, _ = robot.wait_for(rf"^installed app {re.escape(version)}\b", INSTALL_TIMEOUT)
    peak = proc_status_kib(robot.pid, "VmHWM")
    other, total = account(mark, [robot.pid])
    stamps = {"start": robot.started}
    steps: dict[str, float] = {}
    for label, begin, end in PHASES:
        b = stamps.get(begin) or robot.stamp_of(begin)
        e = robot.stamp_of(end)
        stamps[end] = e
        steps[label] = e - b
    downloading = robot.stamp_of(r"^downloading app ")
    steps["start->installed"] = installed - robot.started
    return Run("otad", installed - downloading, steps, peak, other, total), robot


UNPACK_ALONE = """
import json, sys, time
from pathlib import Path
import otad.robot.main  # all of the robot's imports, so that the RSS figures compare with the daemon's
from otad.robot import unpack

def kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

if int(sys.argv[3]):
    unpack.CHUNK = int(sys.argv[3])
before = kib("VmRSS")
start = time.perf_counter()
unpack.unpack_release(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4], 1 << 62, 1 << 30)
print(json.dumps({"chunk": unpack.CHUNK, "seconds": time.perf_counter() - start, "before": before,
                  "hwm": kib("VmHWM"), "after": kib("VmRSS")}))
"""


def run_unpack_alone(artifact: Path, work: Path, chunk: int, version: str, env: dict[str, str]) -> dict:
    """Diagnostic: otad.robot.unpack.unpack_release alone in a fresh interpreter, optionally with another CHUNK."""
    dest, out = work / "unpack-alone", work / "unpack-alone.json"
    fresh(dest, out)
    sync_all()
    argv = [sys.executable, "-c", UNPACK_ALONE, str(artifact), str(dest), str(chunk), version]
    must(spawn(argv, out, env), argv, out)
    result = json.loads(out.read_text().strip().splitlines()[-1])
    fresh(dest, out)
    return result


# --------------------------------------------------------------------------- report


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = [header] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for n, r in enumerate(table):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=256, help="artifact (.tar.gz) size in MiB, about (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="installs and reference runs; the median is reported (default 3)")
    parser.add_argument("--poll-interval", type=int, default=30, help="the robot's POLL_INTERVAL in seconds (default 30)")
    parser.add_argument("--settle-seconds", type=int, default=20,
                        help="idle time after the last install before reading the idle RSS (default 20)")
    parser.add_argument("--idle-seconds", type=int, default=300,
                        help="window over which idle CPU is measured, after --settle-seconds (default 300; 0 skips it)")
    parser.add_argument("--seed", type=int, default=20250101, help="seed for the generated app folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.repeat <= 0 or args.poll_interval <= 0 or args.settle_seconds < 0 or args.idle_seconds < 0:
        parser.error("--size-mb, --repeat and --poll-interval must be positive, --settle/--idle-seconds not negative")

    robot_cmd = _bin("otad-robot")
    for tool in ("curl", "sha256sum", "tar", "sync"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: install it (Debian: curl, coreutils, tar)")
    # SIGTERM, and SIGINT even when started in the background (where it is ignored), end the
    # script through its `finally`, which stops the daemons it started and removes its folder.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otad-bench-robot-", dir="/tmp"))
    env = dict(os.environ, COSIGN_PASSWORD="", PYTHONUNBUFFERED="1")
    for var in ("SOURCE_DATE_EPOCH", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(var, None)
    daemons: list[Daemon] = []
    measured: list[int] = []  # pids whose CPU counts as the system under test (gateway, dashboard)
    log = work / "run.log"

    def account(mark=None, extra: list[int] | None = None):
        """mark = account(); ...; (other CPU, machine busy CPU) = account(mark, [robot pid])."""
        now = (busy_cpu_seconds(), own_and_children_cpu(), cpu_seconds(measured))
        if mark is None:
            return now, cpu_seconds(extra or [])
        (busy0, own0, sut0), extra0 = mark
        busy = busy_cpu_seconds() - busy0
        ours = (own_and_children_cpu() - own0) + (cpu_seconds(measured) - sut0) + cpu_seconds(extra or [])
        return max(0.0, busy - ours), busy

    try:
        print(f"otad robot install benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"repeat {args.repeat}, median reported, work dir {work}")
        print(f"load average at start: {Path('/proc/loadavg').read_text().split(' ', 3)[:3]}")
        floor = spawn(["true"], log)[1] / 1024
        imports = spawn([sys.executable, "-c", "import otad.robot.main"], log, env)[1] / 1024
        print(f"peak RSS of `true` (spawn floor): {floor:.1f} MiB; of python importing otad.robot.main: {imports:.1f} MiB")

        site = start_site(work, args.size_mb, args.seed, env, daemons)
        measured.extend([d.pid for d in daemons])
        key, version, manifest, stats, gateway_url, url = (
            site.key, site.version, site.manifest, site.stats, site.gateway_url, site.url)
        size, ota = manifest["size"], site.ota
        print(f"robot: POLL_INTERVAL={args.poll_interval}, PROBATION_S=0, SELFTEST_CMD=true, no RESTART_CMD")

        refs: list[Run] = []
        otads: list[Run] = []
        robot: Daemon | None = None
        for i in range(args.repeat):
            # Alternate which goes first, so neither always gets the warmer machine.
            for which in (("ref", "otad") if i % 2 == 0 else ("otad", "ref")):
                if which == "ref":
                    run = run_reference(url, manifest["sha256"], work, log, account)
                    refs.append(run)
                    s = run.steps
                    print(f"  reference {i + 1}: {run.seconds:6.2f} s without sync, {s['with sync']:6.2f} s with "
                          f"(curl {s['curl']:.2f}, sha256sum {s['sha256sum']:.2f}, tar xzf {s['tar xzf']:.2f}, "
                          f"sync -f {s['sync -f']:.2f}); other CPU {run.other_cpu:.1f} s")
                    fresh(work / "ref.tar.gz", work / "ref-app")
                else:
                    if robot is not None:
                        robot.stop()
                        daemons.remove(robot)
                        fresh(work / f"robot{len(otads)}-state", work / f"robot{len(otads)}-app")
                    run, robot = run_otad(robot_cmd, work, f"robot{len(otads) + 1}", gateway_url,
                                          key.with_suffix(".pub"), args.poll_interval, env, version, account)
                    daemons.append(robot)
                    otads.append(run)
                    s = run.steps
                    print(f"  otad      {i + 1}: {run.seconds:6.2f} s downloading->installed "
                          f"(download+verify {s['download+verify']:.2f}, unpack+activate {s['unpack+activate']:.2f}, "
                          f"selftest+commit {s['selftest+commit']:.2f}); start-up {s['start-up']:.2f}, "
                          f"to download {s['to download']:.2f}, start->installed {s['start->installed']:.2f}; "
                          f"VmHWM {run.peak_rss_kib / 1024:.1f} MiB; other CPU {run.other_cpu:.1f} s")
        assert robot is not None

        # Idle: the last robot stays up, polling a gateway whose manifest it already has.
        print(f"\nidle: robot {robot.pid} after its install, POLL_INTERVAL={args.poll_interval}")
        last_poll = work / f"robot{len(otads)}-state" / "last_poll"
        installed_at = robot.stamp_of(r"^installed app ")
        time.sleep(max(0.0, installed_at + args.settle_seconds - time.perf_counter()))
        idle_rss = proc_status_kib(robot.pid, "VmRSS")
        threads = proc_status_kib(robot.pid, "Threads")
        print(f"  VmRSS {args.settle_seconds} s after `installed`: {idle_rss / 1024:.1f} MiB ({threads} threads)")
        idle = None
        if args.idle_seconds:
            polls: set[str] = set()
            rss_max = idle_rss
            cpu0, switches0, t0 = cpu_seconds([robot.pid]), context_switches(robot.pid), time.perf_counter()
            first = last_poll.read_text() if last_poll.exists() else ""
            end = t0 + args.idle_seconds
            while (left := end - time.perf_counter()) > 0:
                time.sleep(min(1.0, left))
                if not robot.alive():
                    sys.exit(f"otad-robot exited while idle:\n{robot.log.read_text(errors='replace')[-3000:]}")
                try:
                    polls.add(last_poll.read_text())
                except OSError:
                    pass
                rss_max = max(rss_max, proc_status_kib(robot.pid, "VmRSS"))
            window = time.perf_counter() - t0
            cpu = cpu_seconds([robot.pid]) - cpu0
            switches = context_switches(robot.pid) - switches0
            polls.discard(first)
            idle_end_rss = proc_status_kib(robot.pid, "VmRSS")
            idle = (window, cpu, len(polls), switches, idle_end_rss, rss_max)
            print(f"  over {window:.0f} s: CPU {cpu:.2f} s ({100 * cpu / window:.3f}% of one CPU), {len(polls)} polls, "
                  f"{switches} context switches ({switches / window:.1f}/s); VmRSS at the end "
                  f"{idle_end_rss / 1024:.1f} MiB, highest sampled {rss_max / 1024:.1f} MiB")
        rss_split = {f: proc_status_kib(robot.pid, f) / 1024 for f in ("VmRSS", "RssAnon", "RssFile")}
        print(f"  now: VmRSS {rss_split['VmRSS']:.1f} MiB = anonymous {rss_split['RssAnon']:.1f} "
              f"+ file-backed (shared libraries) {rss_split['RssFile']:.1f}")
        new_lines = [line for _, line in robot.lines if not line.startswith(("installed", "verified", "activated",
                                                                             "downloading", "otad-robot", "recovered"))]
        if new_lines:
            print("  robot log lines besides the install's: " + " | ".join(new_lines[-5:]))

        # Diagnostic: the unpack step alone, with unpack.CHUNK as shipped and at 64 KiB.
        print(f"\ndiagnostic, unpack_release alone on {manifest['artifact']} (fresh interpreter, fsyncs included):")
        alone: dict[int, list[dict]] = {0: [], 64 * 1024: []}
        for i in range(args.repeat):
            for chunk in ((0, 64 * 1024) if i % 2 == 0 else (64 * 1024, 0)):
                alone[chunk].append(run_unpack_alone(ota / manifest["artifact"], work, chunk, version, env))
        for chunk, results in alone.items():
            label = f"CHUNK {results[0]['chunk'] // 1024} KiB" + (" (as shipped)" if not chunk else "")
            runs_s = " ".join(f"{r['seconds']:.2f}" for r in results)
            print(f"  {label:22s}: {statistics.median(r['seconds'] for r in results):.2f} s (runs {runs_s}), "
                  f"VmRSS before {max(r['before'] for r in results) / 1024:.1f} MiB, "
                  f"VmHWM {max(r['hwm'] for r in results) / 1024:.1f}, after {max(r['after'] for r in results) / 1024:.1f}")

        # ----------------------------------------------------------------- report
        print()
        ref_s = statistics.median(r.seconds for r in refs)
        ref_sync_s = statistics.median(r.steps["with sync"] for r in refs)
        otad_s = statistics.median(r.seconds for r in otads)
        otad_total = statistics.median(r.steps["start->installed"] for r in otads)
        startup = statistics.median(r.steps["start-up"] + r.steps["to download"] for r in otads)
        peak = max(r.peak_rss_kib for r in otads) / 1024
        med = {k: statistics.median(r.steps[k] for r in otads) for k in ("download+verify", "unpack+activate", "selftest+commit")}
        rmed = {k: statistics.median(r.steps[k] for r in refs) for k in ("curl", "sha256sum", "tar xzf", "sync -f")}
        _table(("artifact MiB", "app MiB", "files", "curl+sha256sum+tar s", "+ sync -f s", "otad install s",
                "ratio", "ratio vs sync", "otad peak RSS MiB", "otad idle RSS MiB"),
               [(f"{size / MIB:.1f}", f"{stats.total_bytes / MIB:.0f}", f"{stats.files}", f"{ref_s:.2f}",
                 f"{ref_sync_s:.2f}", f"{otad_s:.2f}", f"{otad_s / ref_s:.2f}", f"{otad_s / ref_sync_s:.2f}",
                 f"{peak:.1f}", f"{idle_rss / 1024:.1f}")])
        print(f"\n  otad install phases (median s): download+verify {med['download+verify']:.2f}, "
              f"unpack+activate {med['unpack+activate']:.2f}, selftest+commit {med['selftest+commit']:.2f}; "
              f"before `downloading`: {startup:.2f} (start-up, manifest, bundle); process start->installed {otad_total:.2f}")
        print(f"  reference steps (median s): curl {rmed['curl']:.2f}, sha256sum {rmed['sha256sum']:.2f}, "
              f"tar xzf {rmed['tar xzf']:.2f}, sync -f {rmed['sync -f']:.2f}")
        print()
        print(f"{_verdict(otad_s / ref_s <= RATIO_TARGET)}  time ratio otad/reference: {otad_s / ref_s:.2f} "
              f"(target <= {RATIO_TARGET}); against the reference with `sync -f D`: {otad_s / ref_sync_s:.2f}; "
              f"process start->installed against the reference: {otad_total / ref_s:.2f}")
        with_sync = " ".join(f"{r.steps['with sync']:.2f}" for r in refs)
        print(f"      runs: reference {' '.join(f'{r.seconds:.2f}' for r in refs)} s "
              f"(with sync {with_sync}), "
              f"otad {' '.join(f'{r.seconds:.2f}' for r in otads)} s")
        print(f"{_verdict(peak <= PEAK_RSS_TARGET_MIB)}  otad-robot peak RSS over the install (VmHWM): {peak:.1f} MiB "
              f"(target <= {PEAK_RSS_TARGET_MIB:.0f} MiB); runs: {' '.join(f'{r.peak_rss_kib / 1024:.1f}' for r in otads)}")
        print(f"{_verdict(idle_rss / 1024 <= IDLE_RSS_TARGET_MIB)}  otad-robot idle RSS (VmRSS {args.settle_seconds} s "
              f"after the install): {idle_rss / 1024:.1f} MiB (target <= {IDLE_RSS_TARGET_MIB:.0f} MiB)")
        if idle is not None:
            window, cpu, polls_n, switches, idle_end_rss, rss_max = idle
            print(f"      idle CPU over {window:.0f} s at POLL_INTERVAL={args.poll_interval}: {cpu:.2f} s, "
                  f"{100 * cpu / window:.3f}% of one CPU, {polls_n} polls, {switches / window:.1f} wake-ups/s; "
                  f"VmRSS at the end {idle_end_rss / 1024:.1f} MiB")
        runs = refs + otads
        other = sum(r.other_cpu for r in runs)
        total = sum(r.total_cpu for r in runs)
        busy = total and other > NOISE_SHARE * total
        print(f"      (CPU outside the measured processes during the runs: {other:.1f} of {total:.1f} busy CPU s"
              f"{', the machine was busy: re-run when it is quiet' if busy else ''}); "
              f"load average at the end: {Path('/proc/loadavg').read_text().split(' ', 3)[:3]}")
        print(f"\ntotal benchmark time {time.monotonic() - started:.0f} s")
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
