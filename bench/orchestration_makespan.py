#!/usr/bin/env python3
"""Benchmark the makespan of a whole-site update with SITE_MAX_CONCURRENT 1, 2 and all, for 6 robots.

A measurement, not a test: it always exits 0 (unless it cannot run at all). Issue 16's
"Makespan of a whole-site update": from the moment the gateway has verified a new release
(its `verified app V` line) to the last of the site's robots logging `installed app V`.
Every robot downloads and verifies with no lease (download-ahead), so the budget serialises
only the time out of service: unpack + swap + the app's restart and self-test. The app's
restart is played by RESTART_CMD=`sleep --restart-seconds` (default 2: an app that takes 2 s
to come up), so the figures show what the budget costs a site whose apps take that long.

The reference is the same site with no limit (`all`: SITE_MAX_CONCURRENT empty), in the same
run: each limit's makespan is printed as a ratio to it. Also printed: the median time out of
service per robot (`installing V (lease N)` -> `installed app V`) and the lower bound
ceil(6 / N) x that median for N slots, so the budget's overhead (lease retries every
LEASE_RETRY_S=1, polls) is plain. Limits run in a rotated order each round (1, 2, all; 2, all,
1; ...), --repeat rounds, median reported. Real processes on 127.0.0.1: otad-dashboard,
otad-gateway with ROBOT_TOKENS_FILE (bench/orchestration_outage.py, on bench/robot_install.py's
start_site; the limit changes by SIGHUP), six otad-robots with tokens and LEASES=yes; releases of
about --size-mb MiB built by `otad-release`. Run it as

    .venv/bin/python bench/orchestration_makespan.py [--size-mb 16] [--repeat 3] [--restart-seconds 2]

See docs/benchmarks.md for the figures and how to read them.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orchestration_outage import leased_robot, orchestrated_site  # noqa: E402 - shared helpers of the benchmarks
from robot_install import INSTALL_TIMEOUT, MIB, Daemon, build_and_publish, wait_cached  # noqa: E402
from rollout_halt import line_after  # noqa: E402

ROBOTS = [f"r{n}" for n in range(1, 7)]
LIMITS = ("1", "2", "")  # "": no SITE_MAX_CONCURRENT, every robot at once
LABEL = {"1": "1", "2": "2", "": "all"}


def site_update(gateway: Daemon, robots: dict[str, Daemon], budget, work: Path, site, version: str, size_mb: float,
                seed: int, env: dict[str, str], limit: str) -> dict:
    """One whole-site update under `limit`: makespan and each robot's time out of service."""
    budget.set(limit)
    since = time.perf_counter()
    build_and_publish(work, site.key, version, size_mb, seed, env, site.ota)
    v = re.escape(version)
    verified = line_after(gateway, rf"verified app {v}\b", since, INSTALL_TIMEOUT)
    wait_cached(site.gateway_url, version)
    out, done = {}, {}
    for name, robot in robots.items():
        done[name] = line_after(robot, rf"^installed app {v}\b", since, INSTALL_TIMEOUT)
        granted = line_after(robot, rf"^update of app {v} on robot \S+: installing {v} \(lease \d+\)", since, 5)
        out[name] = done[name] - granted
    order = sorted(done, key=done.get)
    return {"makespan": max(done.values()) - verified, "out": statistics.median(out.values()), "order": order}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=16, help="each release's .tar.gz, about (default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the three limits; medians (default 3)")
    parser.add_argument("--restart-seconds", type=float, default=2, help="the app's restart: RESTART_CMD=sleep S (default 2)")
    parser.add_argument("--seed", type=int, default=1617)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or not 1 <= args.repeat <= 10 or not 0 <= args.restart_seconds <= 60:
        parser.error("--size-mb must be positive, --repeat 1 to 10, --restart-seconds 0 to 60")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otad-bench-makespan-", dir="/tmp"))
    env = dict(os.environ, COSIGN_PASSWORD="", PYTHONUNBUFFERED="1")
    for var in ("SOURCE_DATE_EPOCH", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(var, None)
    daemons: list[Daemon] = []
    results: dict[str, list[dict]] = {limit: [] for limit in LIMITS}
    try:
        print(f"otad site makespan benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{len(ROBOTS)} robots, {args.size_mb:g} MiB releases, RESTART_CMD=sleep {args.restart_seconds:g}, "
              f"{args.repeat} rounds, work dir {work}")
        print(f"load average at start: {Path('/proc/loadavg').read_text().split(' ', 3)[:3]}")
        site, budget = orchestrated_site(work, args.size_mb, args.seed, env, daemons, ROBOTS, "")
        gateway = daemons[-1]
        robots = {}
        for name in ROBOTS:
            robots[name] = leased_robot(work, name, site, env, {"RESTART_CMD": f"sleep {args.restart_seconds:g}"})
            daemons.append(robots[name])
        for robot in robots.values():  # the first release, untimed
            robot.wait_for(rf"^installed app {re.escape(site.version)}\b", INSTALL_TIMEOUT)
        major = 1
        for n in range(args.repeat):
            for limit in LIMITS[n % 3:] + LIMITS[:n % 3]:
                major += 1
                run = site_update(gateway, robots, budget, work, site, f"{major}.0.0", args.size_mb,
                                  args.seed + major, env, limit)
                results[limit].append(run)
                print(f"  round {n + 1}, SITE_MAX_CONCURRENT={LABEL[limit]:>3}: makespan {run['makespan']:6.2f} s, "
                      f"median out of service {run['out']:.2f} s, finished in the order {' '.join(run['order'])}")
        print()
        base = statistics.median(r["makespan"] for r in results[""])
        print("| SITE_MAX_CONCURRENT | makespan s | ratio to all | out of service per robot s | ceil(6/N) x that s |")
        print("|--------------------:|-----------:|-------------:|---------------------------:|-------------------:|")
        for limit in LIMITS:
            makespan = statistics.median(r["makespan"] for r in results[limit])
            per_robot = statistics.median(r["out"] for r in results[limit])
            slots = int(limit) if limit else len(ROBOTS)
            print(f"| {LABEL[limit]} | {makespan:.2f} | {makespan / base:.2f} | {per_robot:.2f} | "
                  f"{math.ceil(len(ROBOTS) / slots) * per_robot:.2f} |")
        every = " ".join(f"{r['makespan']:.2f}" for r in results[""])
        for limit in LIMITS[:2]:
            runs = " ".join(f"{r['makespan']:.2f}" for r in results[limit])
            ratio = statistics.median(r["makespan"] for r in results[limit]) / base
            print(f"ratio SITE_MAX_CONCURRENT={limit} / all: {ratio:.2f} (runs {runs} s; all: {every} s)")
        print(f"release {site.manifest['size'] / MIB:.1f} MiB; load average at the end: "
              f"{Path('/proc/loadavg').read_text().split(' ', 3)[:3]}; total benchmark time {time.monotonic() - started:.0f} s")
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
