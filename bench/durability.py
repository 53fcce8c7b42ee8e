#!/usr/bin/env python3
"""Diagnostic: what otad's durability costs, in fsyncs and in time, on the normal file system.

A measurement, not a test: no targets, it always exits 0 (unless it cannot run
at all). Two workloads, each run with every daemon as shipped ("durable") and
under Debian's eatmydata, the reference without fsync (an LD_PRELOAD library
that turns fsync, fdatasync, sync, syncfs, msync and sync_file_range into no-ops
and drops O_SYNC/O_DSYNC from open):

* a robot install: a real otad-robot with fresh STATE_DIR and APP_DIR installs
  one release from a real gateway, end to end to the commit (`installed app`
  line); the site is bench/robot_install.py's (start_site, start_robot, run_otad);
* 1,000 telemetry records through the real telemetry-agent -> otad-gateway ->
  otad-dashboard, each with a fresh state folder. The agent's own Spool and
  Collector (otad.agent) first spool --records metrics in a child process, one
  transaction per record as the agent's collector does every INTERVAL; then
  the agent starts (INTERVAL=3600: it samples nothing more) and sends them,
  once with BATCH=100 (its default: a backlog, as after an outage) and once
  with BATCH=1 (one record per POST: how a live agent sends, one record each
  INTERVAL); the run ends when the dashboard holds all of them, each once, and
  the agent's spool and the gateway's buffer are empty.

fsyncs are counted by wrapping each daemon (and the spooling child) in
`strace -f --seccomp-bpf -ttt -T -y -e trace=fsync,fdatasync,sync_file_range,syncfs,sync`:
every call is logged with its thread, start time, duration and file; the calls
starting between the workload's start and end are counted per daemon and per
file or directory, and their durations summed (wall time inside the calls,
over all threads). Times come from runs without strace, durable and eatmydata
alternately, --repeat times each, median reported; the eatmydata runs are
counted under strace too, to show that no fsync reaches the kernel. Loopback
only, in a temporary folder under /tmp. Run it as

    .venv/bin/python bench/durability.py [--size-mb 64] [--records 1000] [--repeat 2]

It needs strace and eatmydata (Debian: apt-get install strace eatmydata; `make
bench-durability` installs them as root). See docs/benchmarks.md for the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_serving import _need, children, free_port, wait_until  # noqa: E402 - shared helpers of the benchmarks
from robot_install import Daemon, Site, _bin, fresh, run_otad, spawn, start_site, sync_all, write_config  # noqa: E402
from telemetry import (  # noqa: E402
    buffer_count, dashboard_check, dashboard_config, gateway_config, max_id, wait_quiet, write_tokens)

CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync")
LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((?:\d+<([^>]*)>)?")
RESUMED = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+<\.\.\. (\w+) resumed>")
SPENT = re.compile(r"<(\d+\.\d+)>$")  # strace -T: the time the call took
MODES = ("durable", "eatmydata")
DRAIN_TIMEOUT = 120
# The agent's BATCH in the two telemetry runs: its default, on a backlog; and one record per POST,
# which is how a live agent sends when it keeps up with its collector (one record each INTERVAL).
BATCHES = ((100, "the default, a backlog as after an outage"), (1, "one record per POST, as live"))

# The agent's collector spooling records with the agent's own classes, timed over the loop alone.
SPOOL_FILL = """
import json, sys, time
from pathlib import Path
from otad.agent.collect import Collector, boot_id
from otad.agent.spool import Spool

spool = Spool(Path(sys.argv[1]), 16 << 20)
collector, boot = Collector(), boot_id()
t0, start = time.time(), time.perf_counter()
for _ in range(int(sys.argv[2])):
    spool.add(collector.sample(sys.argv[3], boot, Path(sys.argv[4]), "", 10))
print(json.dumps({"seconds": time.perf_counter() - start, "t0": t0, "t1": time.time(), "pending": spool.pending}))
spool.close()
"""


# --------------------------------------------------------------------------- counting


@dataclass
class Calls:
    """fsync-family calls of one process tree in a time window: by call, and by file."""
    by_call: Counter = field(default_factory=Counter)
    by_file: Counter = field(default_factory=Counter)  # (label, call) -> n
    dirs: int = 0  # calls on a directory
    seconds: float = 0.0  # wall time spent inside the calls (strace -T), summed over threads

    @property
    def total(self) -> int:
        return sum(self.by_call.values())


def tracer(out: Path) -> tuple[str, ...]:
    strace = _need("strace", "strace")
    return (strace, "-f", "--seccomp-bpf", "-qq", "-ttt", "-T", "-y", "-e", "signal=none",
            "-e", "trace=" + ",".join(CALLS), "-o", str(out))


def wrapper(mode: str, trace: Path | None) -> tuple[str, ...]:
    """The command prefix of a run: strace when counting, eatmydata for the reference."""
    wrap = tracer(trace) if trace is not None else ()
    return wrap + ((_need("eatmydata", "eatmydata"),) if mode == "eatmydata" else ())


def label(path: str, names: dict[str, str]) -> str:
    """A file's name without the run's folders, the release tree and temp-file names folded."""
    for prefix, name in names.items():
        if path.startswith(prefix):
            path = name + path[len(prefix):]
            break
    path = re.sub(r"/releases/([^/.]+\.[^/]+\.[^/]+)/.+", r"/releases/\1/...", path)
    return re.sub(r"/\.([^/]+)\.[^/.]+\.tmp$", r"/.\1.*.tmp", path)


def count(trace: Path, t0: float, t1: float, names: dict[str, str]) -> Calls:
    """The calls strace logged starting between t0 and t1 (wall clock, as strace -ttt)."""
    calls = Calls()
    counted: set[str] = set()  # threads whose call is unfinished and counted (its time comes when it resumes)
    for line in trace.read_text(errors="replace").splitlines():
        spent = SPENT.search(line)
        resumed = RESUMED.match(line)
        if resumed:
            if resumed[1] in counted and spent:
                calls.seconds += float(spent[1])
            counted.discard(resumed[1])
            continue
        match = LINE.match(line)
        if not match or match[3] not in CALLS or not t0 <= float(match[2]) <= t1:
            continue
        if spent:
            calls.seconds += float(spent[1])
        elif line.endswith("<unfinished ...>"):
            counted.add(match[1])
        path = match[4] or ""
        is_dir = bool(path) and os.path.isdir(path)
        calls.by_call[match[3]] += 1
        calls.dirs += is_dir
        calls.by_file[(label(path, names) + (" [dir]" if is_dir else ""), match[3])] += 1
    return calls


def stop(daemon: Daemon, traced: bool) -> None:
    """strace does not pass SIGTERM on (-o FILE PROG blocks it): stop the daemon it runs, then reap."""
    if traced and daemon.alive():
        for pid in children(daemon.pid):
            os.kill(pid, signal.SIGTERM)
    daemon.stop()


def wall(stamp: float) -> float:
    """A Daemon line stamp (perf_counter) as wall-clock time, strace's -ttt clock."""
    return stamp + time.time() - time.perf_counter()


# --------------------------------------------------------------------------- the workloads


@dataclass
class Result:
    seconds: float  # the figure timed
    total: float  # with start-up (install: process start -> installed)
    calls: dict[str, Calls] = field(default_factory=dict)  # per daemon, when traced
    extra: dict[str, float] = field(default_factory=dict)


def install(site: Site, work: Path, name: str, mode: str, traced: bool, env: dict[str, str]) -> Result:
    """One otad-robot install, fresh STATE_DIR and APP_DIR, from start to `installed app` (after the commit)."""
    trace = work / f"{name}.strace" if traced else None
    fresh(work / f"{name}-state", work / f"{name}-app")
    sync_all()
    run, robot = run_otad(_bin("otad-robot"), work, name, site.gateway_url, site.key.with_suffix(".pub"), 30, env,
                          site.version, lambda *a: (0.0, 0.0), wrapper(mode, trace))
    installed = robot.stamp_of(r"^installed app ")
    stop(robot, traced)
    result = Result(run.seconds, run.steps["start->installed"],
                    extra={"before download": run.steps["start-up"] + run.steps["to download"]})
    if trace is not None:
        names = {str(work / f"{name}-state"): "STATE_DIR", str(work / f"{name}-app"): "APP_DIR", str(work): "work"}
        result.calls["otad-robot"] = count(trace, wall(robot.started), wall(installed), names)
    fresh(work / f"{name}-state", work / f"{name}-app")
    return result


def telemetry(site: Site, work: Path, name: str, mode: str, traced: bool, records: int, batch: int,
              env: dict[str, str]) -> Result:
    """records metrics spooled by the agent's code, then sent by telemetry-agent through a gateway to a dashboard."""
    tdir = work / name
    tdir.mkdir()
    robot, token = "bench-robot", "bench-token-" + secrets.token_hex(8)
    write_tokens(tdir, [(robot, token)])
    (tdir / "agent.token").write_text(token + "\n")
    (tdir / "agent.token").chmod(0o600)
    trace = {who: tdir / f"{who}.strace" for who in ("spool", "agent", "gateway", "dashboard")} if traced else {}
    daemons: list[Daemon] = []
    try:
        spool, fill_log = tdir / "agent-state" / "spool.db", tdir / "spool-fill.log"
        argv = [*wrapper(mode, trace.get("spool")), sys.executable, "-c", SPOOL_FILL, str(spool), str(records),
                robot, str(tdir / "app")]
        if spawn(argv, fill_log, env)[2] != 0:
            sys.exit(f"spooling the records failed:\n{fill_log.read_text(errors='replace')[-3000:]}")
        fill = json.loads(fill_log.read_text().strip().splitlines()[-1])
        if fill["pending"] != records:
            sys.exit(f"the spool holds {fill['pending']} records, not {records}")
        sync_all()

        port = free_port()
        dashboard = Daemon([*wrapper(mode, trace.get("dashboard")), _bin("otad-dashboard"), "--config",
                            str(dashboard_config(tdir, "dashboard", port))], tdir / "dashboard.log", env)
        daemons.append(dashboard)
        dashboard.url()
        gateway = Daemon([*wrapper(mode, trace.get("gateway")), _bin("otad-gateway"), "--config",
                          str(gateway_config(tdir, "gateway", port, site.key, 64, 500))], tdir / "gateway.log", env)
        daemons.append(gateway)
        gateway_db = tdir / "gateway" / "telemetry.db"
        agent_conf = write_config(tdir / "agent.conf", {
            "GATEWAY_URL": gateway.url(), "ROBOT_ID": robot, "INTERVAL": 3600, "TOKEN_FILE": tdir / "agent.token",
            "STATE_DIR": spool.parent, "APP_DIR": tdir / "app", "ROBOT_STATE_DIR": tdir / "robot-state",
            "BATCH": batch, "BACKOFF_MAX": 1, "CONNECT_TIMEOUT": 2, "READ_TIMEOUT": 30})
        wait_until(gateway_db.exists, 10, "the gateway's telemetry buffer")
        dashboard_db = tdir / "dashboard-state" / "telemetry.db"

        agent = Daemon([*wrapper(mode, trace.get("agent")), _bin("telemetry-agent"), "--config", str(agent_conf)],
                       tdir / "agent.log", env)
        daemons.append(agent)
        ready, _ = agent.wait_for(r" sending to ", 60)

        def delivered() -> bool:
            return (max_id(dashboard_db) >= records and buffer_count(gateway_db)[0] == 0
                    and spool_rows(spool) == 0)
        wait_until(delivered, DRAIN_TIMEOUT, f"{records} records at the dashboard", interval=0.01)
        done = time.perf_counter()
        rows, gaps, disorder = dashboard_check(dashboard_db)
        if (rows, gaps, disorder) != (records, 0, 0):
            sys.exit(f"the dashboard holds {rows} rows, {gaps} gaps, {disorder} out of order; expected {records}")
        for daemon in reversed(daemons):
            stop(daemon, traced)
        result = Result(done - ready, done - agent.started, extra={"spool": fill["seconds"]})
        if traced:
            names = {str(tdir / "agent-state"): "agent STATE_DIR", str(tdir / "gateway"): "gateway STATE_DIR",
                     str(tdir / "dashboard-state"): "dashboard STATE_DIR", str(tdir): "work"}
            result.calls["telemetry-agent (spooling)"] = count(trace["spool"], fill["t0"], fill["t1"], names)
            for who, key in (("telemetry-agent (sending)", "agent"), ("otad-gateway", "gateway"),
                             ("otad-dashboard", "dashboard")):
                result.calls[who] = count(trace[key], wall(agent.started), wall(done), names)
        return result
    finally:
        for daemon in reversed(daemons):
            stop(daemon, traced)
        shutil.rmtree(tdir, ignore_errors=True)


def spool_rows(spool: Path) -> int:
    """Rows in the agent's spool, read-only (what it has not yet had acknowledged)."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM records").fetchone()[0]
    finally:
        conn.close()


# --------------------------------------------------------------------------- report


def print_calls(title: str, calls: dict[str, Calls], per: float, unit: str, top: int) -> None:
    print(f"\n{title}")
    print(f"| daemon | fsync | fdatasync | sync_file_range | syncfs | sync | total | of which on directories | {unit} "
          f"| s inside the calls |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for who, c in calls.items():
        print(f"| {who} | " + " | ".join(str(c.by_call[k]) for k in CALLS) +
              f" | {c.total} | {c.dirs} | {c.total * per:,.0f} | {c.seconds:.2f} |")
    everything = sum(c.total for c in calls.values())
    print(f"| all | | | | | | {everything} | {sum(c.dirs for c in calls.values())} | {everything * per:,.0f} "
          f"| {sum(c.seconds for c in calls.values()):.2f} |")
    for who, c in calls.items():
        if c.total:
            files = ", ".join(f"{n} {call} {path}" for (path, call), n in c.by_file.most_common(top))
            print(f"    {who}: {files}" + (", ..." if len(c.by_file) > top else ""))


def measure(run, repeat: int) -> tuple[dict[str, Result], dict[str, list[Result]]]:
    """run(mode, traced, tag): once per mode under strace (the counts), then `repeat` times per mode
    without it (the times), the modes alternating so that neither always gets the warmer machine."""
    counted = {mode: run(mode, True, "strace") for mode in MODES}
    timed: dict[str, list[Result]] = {mode: [] for mode in MODES}
    for i in range(repeat):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            timed[mode].append(run(mode, False, str(i)))
    return counted, timed


def median(timed: dict[str, list[Result]], attr: str) -> dict[str, float]:
    return {mode: statistics.median(getattr(r, attr) for r in runs) for mode, runs in timed.items()}


def row(what: str, seconds: dict[str, float], records: int = 0) -> None:
    durable, reference = seconds["durable"], seconds["eatmydata"]
    rates = f"{records / durable:,.0f} | {records / reference:,.0f}" if records else "- | -"
    print(f"| {what} | {durable:.2f} | {reference:.2f} | {durable / reference:.2f} | {rates} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=64, help="release artifact (.tar.gz) size in MiB, about (default 64)")
    parser.add_argument("--records", type=int, default=1000, help="telemetry records per run (default 1000)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per mode; the median is reported (default 2)")
    parser.add_argument("--seed", type=int, default=20250101, help="seed for the generated app folder")
    parser.add_argument("--quiet-wait", type=int, default=0,
                        help="seconds to wait at start for other benchmarks and test runs to finish (default 0)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or not 1 <= args.records <= 100_000 or not 1 <= args.repeat <= 20:
        parser.error("--size-mb must be positive, --records 1 to 100,000, --repeat 1 to 20")
    for tool, package in (("strace", "strace"), ("eatmydata", "eatmydata")):
        _need(tool, package)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otad-bench-durability-", dir="/tmp"))
    env = dict(os.environ, COSIGN_PASSWORD="", PYTHONUNBUFFERED="1")
    for var in ("SOURCE_DATE_EPOCH", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID", "LD_PRELOAD"):
        env.pop(var, None)
    daemons: list[Daemon] = []
    try:
        fs = next((line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1] == "/tmp"), None) or next(
            line.split()[2] for line in Path("/proc/mounts").read_text().splitlines() if line.split()[1] == "/")
        print(f"otad durability benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, {fs} under /tmp, "
              f"repeat {args.repeat}, median reported, work dir {work}")
        machine = wait_quiet(args.quiet_wait)
        print(f"load average at start: {Path('/proc/loadavg').read_text().split(' ', 3)[:3]}")
        site = start_site(work, args.size_mb, args.seed, env, daemons)

        counted, timed = measure(lambda mode, traced, tag: install(
            site, work, f"robot-{mode}-{tag}", mode, traced, env), args.repeat)
        for mode in MODES:
            print(f"installs, {mode}: downloading -> installed " + " ".join(f"{r.seconds:.2f}" for r in timed[mode])
                  + " s; process start -> downloading " + " ".join(f"{r.extra['before download']:.2f}" for r in timed[mode])
                  + " s")
        tele = {}
        for batch, _ in BATCHES:
            tele[batch] = measure(lambda mode, traced, tag: telemetry(
                site, work, f"tele{batch}-{mode}-{tag}", mode, traced, args.records, batch, env), args.repeat)
            for mode in MODES:
                runs = tele[batch][1][mode]
                print(f"telemetry BATCH={batch}, {mode}: agent -> dashboard " + " ".join(f"{r.seconds:.2f}" for r in runs)
                      + " s; spooling " + " ".join(f"{r.extra['spool']:.2f}" for r in runs) + " s")

        # ----------------------------------------------------------------- report
        manifest = site.manifest
        print_calls(f"fsyncs per robot install ({manifest['artifact']}, {manifest['size'] / (1 << 20):.1f} MiB, "
                    f"{site.stats.files} files in {site.stats.dirs} folders), process start -> installed, durable:",
                    counted["durable"].calls, 1, "per install", 20)
        print_calls("  the same under eatmydata (what reaches the kernel):", counted["eatmydata"].calls, 1,
                    "per install", 10)
        per = 1000 / args.records
        for batch, what in BATCHES:
            print_calls(f"fsyncs for {args.records:,} telemetry records, agent BATCH={batch} ({what}), durable:",
                        tele[batch][0]["durable"].calls, per, "per 1,000 records", 6)
            print_calls("  the same under eatmydata:", tele[batch][0]["eatmydata"].calls, per, "per 1,000 records", 6)

        print("\n| workload | durable s | eatmydata (no fsync) s | ratio durable / no fsync | records/s durable | "
              "records/s no fsync |")
        print("|---|--:|--:|--:|--:|--:|")
        row("robot install, downloading -> installed", median(timed, "seconds"))
        row("robot install, process start -> installed", median(timed, "total"))
        spool = {m: statistics.median(r.extra["spool"] for b, _ in BATCHES for r in tele[b][1][m]) for m in MODES}
        row(f"{args.records:,} records, agent spooling (1 transaction each)", spool, args.records)
        for batch, _ in BATCHES:
            send = median(tele[batch][1], "seconds")
            row(f"{args.records:,} records, agent -> gateway -> dashboard, BATCH={batch}", send, args.records)
            row(f"{args.records:,} records, spooling + sending, BATCH={batch}",
                {m: spool[m] + send[m] for m in MODES}, args.records)
        print(f"\nmachine at start: {machine[:300]}; load average at the end: "
              f"{Path('/proc/loadavg').read_text().split(' ', 3)[:3]}")
        print(f"total benchmark time {time.monotonic() - started:.0f} s")
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
