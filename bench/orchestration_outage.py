#!/usr/bin/env python3
"""Benchmark a robot's time out of service per update with download-ahead, against the download it hides.

A measurement, not a test: it always exits 0 (unless it cannot run at all). Issue 16's
"Robot out of service per update": with install leases, a robot downloads and verifies a
release with no lease, keeps it staged, and only once the gateway grants its lease stops its
app: the time out of service is unpack + swap + self-test. Each update is timed from the
robot's stderr lines, stamped as they arrive (bench/robot_install.py Daemon):

- download: `downloading app V` -> `verified app V` (the bytes, their SHA-256, the fsync and
  the signature check), while the app runs and the robot holds no lease;
- waiting staged: `verified` -> the lease granted (the gateway's budget is 0 until the robot
  is seen waiting with the release on disk, then 1, by SIGHUP: a robot waiting for its turn);
- out of service: `installing V (lease N)` -> `installed app V`, split into the unpack
  (-> `activated app V`) and the restart + self-test + commit.

The reference is the download time of the same update, in the same run: the figure printed
is out-of-service / (download + out-of-service), the share of the update a robot that
stopped its app before downloading would be out of service for that this one is. Real
processes on 127.0.0.1: otad-dashboard and otad-gateway (ROBOT_TOKENS_FILE, SITE_MAX_CONCURRENT,
LEASE_RETRY_S=1) from bench/robot_install.py's start_site, one otad-robot with a token,
LEASES=yes, RESTART_CMD=true, SELFTEST_CMD=true; every release built by `otad-release` from
bench/release_build.py's generator (a fresh seed each), about --size-mb MiB as .tar.gz. The
robot's first release is installed untimed; then --repeat updates are timed. Run it as

    .venv/bin/python bench/orchestration_outage.py [--size-mb 256] [--repeat 3]

See docs/benchmarks.md for the figures and how to read them.
"""
from __future__ import annotations

import argparse
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
from robot_install import (  # noqa: E402 - shared helpers of the benchmarks
    INSTALL_TIMEOUT,
    MIB,
    Daemon,
    _bin,
    build_and_publish,
    start_robot,
    start_site,
    wait_cached,
    write_config,
)
from rollout_halt import line_after, secret, token  # noqa: E402

ROBOT = "robot1"


class Budget:
    """The gateway's SITE_MAX_CONCURRENT, changed by rewriting gateway.conf and SIGHUP."""

    def __init__(self, gateway: Daemon, config: Path) -> None:
        self.gateway, self.config = gateway, config

    def set(self, limit: str) -> None:
        lines = [line for line in self.config.read_text().splitlines() if not line.startswith("SITE_MAX_CONCURRENT=")]
        self.config.write_text("\n".join([*lines, f"SITE_MAX_CONCURRENT={limit}"]) + "\n")
        since = time.perf_counter()
        os.kill(self.gateway.pid, signal.SIGHUP)
        line_after(self.gateway, r"reloaded config from ", since, 30)


def orchestrated_site(work: Path, size_mb: float, seed: int, env: dict[str, str], daemons: list[Daemon],
                      robots: list[str], limit: str) -> tuple[object, Budget]:
    """start_site with the robots' tokens and leases on: the gateway grants install leases."""
    tokens = secret(work / "robot-tokens", "".join(f"{r} {token(r)}\n" for r in robots))
    site = start_site(work, size_mb, seed, env, daemons, gateway_extra={
        "ROBOT_TOKENS_FILE": tokens, "POLL_INTERVAL": 1, "SITE_MAX_CONCURRENT": limit, "LEASE_RETRY_S": 1})
    gateway = daemons[-1]
    return site, Budget(gateway, work / "gateway.conf")


def leased_robot(work: Path, name: str, site, env: dict[str, str], extra: dict | None = None) -> Daemon:
    """An otad-robot that installs only under a lease (LEASES=yes), polling every second."""
    return start_robot(_bin("otad-robot"), work, name, site.gateway_url, site.key.with_suffix(".pub"), 1, env, extra={
        "TOKEN_FILE": secret(work / f"{name}.token", token(name) + "\n"), "LEASES": "yes", "RESTART_CMD": "true",
        **(extra or {})})


def update(robot: Daemon, budget: Budget, work: Path, site, version: str, size_mb: float, seed: int,
           env: dict[str, str]) -> dict:
    """Publish `version`, let the robot stage it with no lease, then grant it one; the stamped steps."""
    budget.set("0")  # no lease for anyone: the robot downloads, verifies and waits
    since = time.perf_counter()
    build_and_publish(work, site.key, version, size_mb, seed, env, site.ota)
    wait_cached(site.gateway_url, version)
    v = re.escape(version)
    downloading = line_after(robot, rf"^downloading app {v} ", since, INSTALL_TIMEOUT)
    verified = line_after(robot, rf"^verified app {v} ", since, INSTALL_TIMEOUT)
    line_after(robot, rf"^update of app {v} on robot \S+: waiting for lease", since, 60)
    budget.set("1")
    granted = line_after(robot, rf"^update of app {v} on robot \S+: installing {v} \(lease \d+\)", since, 60)
    activated = line_after(robot, rf"^activated app {v} ", since, INSTALL_TIMEOUT)
    installed = line_after(robot, rf"^installed app {v}\b", since, INSTALL_TIMEOUT)
    return {"download": verified - downloading, "staged": granted - verified, "unpack": activated - granted,
            "restart": installed - activated, "out": installed - granted}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=256, help="each release's .tar.gz, about (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="timed updates; the median is reported (default 3)")
    parser.add_argument("--seed", type=int, default=1616)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or not 1 <= args.repeat <= 20:
        parser.error("--size-mb must be positive and --repeat between 1 and 20")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otad-bench-outage-", dir="/tmp"))
    env = dict(os.environ, COSIGN_PASSWORD="", PYTHONUNBUFFERED="1")
    for var in ("SOURCE_DATE_EPOCH", "NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(var, None)
    daemons: list[Daemon] = []
    runs: list[dict] = []
    try:
        print(f"otad out-of-service benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{args.size_mb:g} MiB releases, {args.repeat} timed updates, work dir {work}")
        print(f"load average at start: {Path('/proc/loadavg').read_text().split(' ', 3)[:3]}")
        site, budget = orchestrated_site(work, args.size_mb, args.seed, env, daemons, [ROBOT], "1")
        robot = leased_robot(work, ROBOT, site, env)
        daemons.append(robot)
        robot.wait_for(rf"^installed app {re.escape(site.version)}\b", INSTALL_TIMEOUT)  # its first release, untimed
        for n in range(args.repeat):
            version = f"{n + 2}.0.0"
            run = update(robot, budget, work, site, version, args.size_mb, args.seed + n + 1, env)
            runs.append(run)
            print(f"  update to {version}: download+verify {run['download']:6.2f} s (no lease), waited staged "
                  f"{run['staged']:5.2f} s, out of service {run['out']:6.2f} s (unpack+swap {run['unpack']:.2f}, "
                  f"restart+self-test+commit {run['restart']:.2f}); share {run['out'] / (run['download'] + run['out']):.2f}")
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        share = statistics.median(r["out"] / (r["download"] + r["out"]) for r in runs)
        print()
        print("| release MiB | download+verify s (hidden) | out of service s | of which unpack+swap s | "
              "restart+self-test s | out / (download + out) |")
        print("|------------:|---------------------------:|-----------------:|-----------------------:|"
              "--------------------:|-----------------------:|")
        print(f"| {site.manifest['size'] / MIB:.1f} | {med['download']:.2f} | {med['out']:.2f} | {med['unpack']:.2f} | "
              f"{med['restart']:.2f} | {share:.2f} |")
        shares = " ".join(f"{r['out'] / (r['download'] + r['out']):.2f}" for r in runs)
        print(f"\nratio out-of-service / (download + out-of-service): {share:.2f} (median of {len(runs)}); runs: {shares}")
        print(f"download-ahead keeps the robot in service for {med['download']:.2f} s of each update "
              f"(median), {100 * (1 - share):.0f}% of download + install")
        print(f"load average at the end: {Path('/proc/loadavg').read_text().split(' ', 3)[:3]}; "
              f"total benchmark time {time.monotonic() - started:.0f} s")
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
