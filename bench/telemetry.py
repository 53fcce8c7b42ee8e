#!/usr/bin/env python3
"""Benchmark telemetry ingest at the gateway and the drain of its buffer to the dashboard.

A measurement, not a test: it always exits 0 (unless it cannot run at all) and
prints PASS/MISS against the targets of issue 5, section 6:

* (a) gateway ingest of single-record POST /metrics from --clients (100)
  concurrent robots: >= 3,000 records/s, p99 latency of the 200s <= 50 ms;
* (b) the same with 100-record batches: >= 30,000 records/s;
* (c) drain of 1,000,000 buffered records to the dashboard after an outage:
  >= 20,000 records/s, and the dashboard ends with exactly 1,000,000;
* (d) beside them, as the ceiling: raw SQLite inserts on the same disk with the
  same durability (WAL, synchronous=FULL), 1 and 100 rows per transaction;

and the gateway's peak RSS (VmHWM) over the whole run.

Everything runs on 127.0.0.1 in a temporary folder under /tmp: a real
otad-gateway and a real otad-dashboard with token files, as an operator would
set them up. The dashboard is down (WAN outage) from the start: (a) and (b)
load the gateway with wrk, one wrk thread and one connection per robot, so each
robot posts its records in seq order, one request at a time, like a telemetry
agent; every record is unique. For (c) it starts a second gateway with an
empty buffer, fills it with exactly --drain-records records through the
gateway's own POST /metrics (1,000-record batches), starts the dashboard, and
times until the dashboard's database holds them all. Before each measurement it
waits (bounded by --quiet-wait) for other benchmarks and test runs to finish.
Run it as

    .venv/bin/python bench/telemetry.py [--duration 20] [--clients 100] [--drain-records 1000000]

It needs wrk (Debian: apt-get install wrk). See docs/benchmarks.md for the
figures and how to read them.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_serving import (  # noqa: E402 - shared helpers of the serving benchmarks
    NOISE_SHARE,
    Proc,
    _bin,
    _need,
    busy_cpu_seconds,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    proc_status_kib,
    self_cpu_seconds,
    wait_until,
)

MIB = 1 << 20
SINGLE_TARGET = 3000.0  # records/s
P99_TARGET_MS = 50.0
BATCH_TARGET = 30000.0  # records/s
DRAIN_TARGET = 20000.0  # records/s
BATCH = 100
FILL_BATCH = 1000  # the gateway's MAX_RECORDS
FILL_THREADS = 4
# The same metric a telemetry agent sends (about 170 bytes); cpu varies with seq.
RECORD = ('{{"robot_id":"{robot}","boot_id":"{boot}","seq":{seq},"ts":"2026-11-26T10:00:00Z","type":"metric",'
          '"cpu":{cpu}.5,"mem":40.0,"version":"1.0.0","health":"ok"}}')
# Another benchmark (or a load tool) running on the machine: wait for it before measuring.
OTHER_BENCH = re.compile(r"(bench/[\w.-]+\.py|\bwrk\b|\bab\b -|pytest|otad-release build)")

# wrk: one thread = one connection = one robot with its own token and seq counter, so a
# robot never has two requests in flight and its records arrive in seq order, as from a
# telemetry agent. request() builds each body: every (robot, boot, seq) is new.
WRK_LUA = r"""
local robots = {ROBOTS}
local batch = {BATCH}
local boot = "{BOOT}"
local template = '{TEMPLATE}'
local started = 0

function setup(thread)
  started = started + 1
  local r = robots[started]
  thread:set("robot", r[1])
  thread:set("token", r[2])
end

function init(args)
  seq = 0
  headers = {{["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}}
end

function request()
  local parts = {{}}
  for k = 1, batch do
    seq = seq + 1
    parts[k] = string.format(template, robot, boot, seq, seq % 100)
  end
  local body
  if batch == 1 then body = parts[1] else body = '{{"records":[' .. table.concat(parts, ",") .. ']}}' end
  return wrk.format("POST", "/metrics", headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d "
    .. "p50=%d p90=%d p99=%d max=%d\n", summary.requests, summary.duration, summary.bytes, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def record(robot: str, boot: str, seq: int) -> str:
    return RECORD.format(robot=robot, boot=boot, seq=seq, cpu=seq % 100)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def other_benchmarks() -> list[str]:
    """Command lines of other benchmarks, load tools or test runs running now.

    Not this script, its children (wrk, py-spy), nor its ancestors (the shell or make that started it)."""
    mine, pid = set(), os.getpid()
    while pid > 1:
        mine.add(pid)
        pid = _parent(pid)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmd and _parent(int(entry.name)) != os.getpid() and OTHER_BENCH.search(cmd):
            found.append(cmd[:120])
    return found


def wait_quiet(limit: float) -> str:
    """Wait (bounded) until no other benchmark runs; return a note for the report."""
    deadline = time.monotonic() + limit
    others = other_benchmarks()
    if not others:
        return "quiet"
    print(f"waiting up to {limit:.0f} s for other benchmarks to finish: {others[:3]}")
    while others and time.monotonic() < deadline:
        time.sleep(5)
        others = other_benchmarks()
    if others:
        print(f"WARNING: still running after {limit:.0f} s, measuring anyway: {others[:3]}")
        return "busy: " + "; ".join(others[:3])
    return "quiet (after waiting for another benchmark)"


# --------------------------------------------------------------------------- site layout


def write_tokens(work: Path, robots: list[tuple[str, str]]) -> None:
    """Token files as an operator lays them out (mode 0600): work/robot-tokens, one line per robot, for the
    gateway's ROBOT_TOKENS_FILE; the gateway's own token in work/gateway.token and in work/gateway-tokens
    (the dashboard's TOKENS_FILE)."""
    gateway_token = "bench-gateway-" + secrets.token_hex(12)
    files = {"robot-tokens": "".join(f"{r} {t}\n" for r, t in robots), "gateway.token": gateway_token + "\n",
             "gateway-tokens": f"bench {gateway_token}\n"}
    for name, text in files.items():
        (work / name).write_text(text)
        (work / name).chmod(0o600)


def dashboard_config(work: Path, name: str, port: int) -> Path:
    """work/NAME.conf for a dashboard on 127.0.0.1:port, STATE_DIR work/NAME-state, gateway tokens from write_tokens."""
    (work / "ota").mkdir(exist_ok=True)
    config = work / f"{name}.conf"
    config.write_text(f"LISTEN=127.0.0.1:{port}\nOTA_DIR={work / 'ota'}\nSTATE_DIR={work / (name + '-state')}\n"
                      f"TOKENS_FILE={work / 'gateway-tokens'}\n")
    return config


def gateway_config(work: Path, name: str, dashboard_port: int, key: Path, max_mb: int, forward_batch: int) -> Path:
    """work/NAME.conf for a gateway on 127.0.0.1:0 with STATE_DIR work/NAME, forwarding to the dashboard's port."""
    config = work / f"{name}.conf"
    config.write_text(
        f"DASHBOARD_URL=http://127.0.0.1:{dashboard_port}\nTRUSTED_KEYS={key.with_suffix('.pub')}\n"
        f"LISTEN=127.0.0.1:0\nSTATE_DIR={work / name}\nGATEWAY_ID=bench\nTOKEN_FILE={work / 'gateway.token'}\n"
        f"ROBOT_TOKENS_FILE={work / 'robot-tokens'}\nTELEMETRY_MAX_MB={max_mb}\n"
        f"FORWARD_BATCH={forward_batch}\nBACKOFF_MAX=1\nCONNECT_TIMEOUT=2\nREAD_TIMEOUT=30\n")
    return config


# --------------------------------------------------------------------------- (d) raw SQLite


def raw_sqlite(path: Path, rows_per_tx: int, seconds: float, max_bytes: int) -> tuple[float, float]:
    """Insert metric rows into the gateway's schema with the gateway's connection settings
    (WAL, synchronous=FULL, its WAL limits) for `seconds`; return (rows/s, commits/s)."""
    from otad.gateway.buffer import SCHEMA, connect

    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    db = connect(path, max_bytes)
    db.executescript(SCHEMA)
    seq = rows = commits = 0
    now = time.time()
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        db.execute("BEGIN IMMEDIATE")
        for _ in range(rows_per_tx):
            seq += 1
            db.execute("INSERT INTO records (robot_id, boot_id, seq, kind, received, body) VALUES (?,?,?,?,?,?)",
                       ("bench-r000", "raw", seq, "metric", now, record("bench-r000", "raw", seq)))
        db.execute("COMMIT")
        rows += rows_per_tx
        commits += 1
    elapsed = time.perf_counter() - start
    db.close()
    return rows / elapsed, commits / elapsed


# --------------------------------------------------------------------------- (a), (b) wrk


@dataclass(frozen=True)
class WrkRun:
    name: str
    batch: int
    seconds: float
    requests: int
    stored: int  # rows the gateway's buffer gained
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    gateway_cpu: float
    gateway_user: float
    gateway_system: float
    wrk_cpu: float
    other_cpu: float

    @property
    def records_s(self) -> float:
        return self.requests * self.batch / self.seconds


def buffer_count(db: Path) -> tuple[int, int]:
    """(rows, gap rows) in the gateway's buffer, read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT count(*), count(*) FILTER (WHERE kind = 'gap') FROM records").fetchone()
    finally:
        conn.close()


def user_system_seconds(pid: int) -> tuple[float, float]:
    """A process's user and system CPU seconds, all its threads (also those that have ended)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def py_spy(pid: int, seconds: int, out: Path) -> subprocess.Popen:
    """py-spy record of a process's threads, in collapsed-stack form (--profile)."""
    return subprocess.Popen([_bin("py-spy"), "record", "--nonblocking", "--threads", "--idle", "--format", "raw",
                             "-r", "200", "-d", str(seconds), "-p", str(pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_wrk(wrk: str, work: Path, name: str, url: str, robots: list[tuple[str, str]], batch: int, boot: str,
            duration: int, gateway: Proc, db: Path, profile: bool = False) -> WrkRun:
    lua = work / f"{name}.lua"
    robots_lua = "{" + ", ".join(f'{{"{r}", "{t}"}}' for r, t in robots) + "}"
    template = RECORD.format(robot="%s", boot="%s", seq="%d", cpu="%d")  # for Lua's string.format
    lua.write_text(WRK_LUA.format(ROBOTS=robots_lua, BATCH=batch, BOOT=boot, TEMPLATE=template))
    n = len(robots)
    before = buffer_count(db)[0]
    spy = py_spy(gateway.pid, duration, work / f"{name}.gateway.stacks") if profile else None
    user0, sys0 = user_system_seconds(gateway.pid)
    cpu0, child0, self0, busy0 = cpu_seconds([gateway.pid]), children_cpu_seconds(), self_cpu_seconds(), busy_cpu_seconds()
    done = subprocess.run([wrk, "-t", str(n), "-c", str(n), "-d", f"{duration}s", "--timeout", "10s", "-s", str(lua),
                           f"{url}/metrics"], capture_output=True, text=True, timeout=duration + 60)
    gateway_cpu, wrk_cpu = cpu_seconds([gateway.pid]) - cpu0, children_cpu_seconds() - child0
    user1, sys1 = user_system_seconds(gateway.pid)
    other = max(0.0, busy_cpu_seconds() - busy0 - gateway_cpu - wrk_cpu - (self_cpu_seconds() - self0))
    if spy is not None:
        spy.wait(30)
    (work / f"{name}.wrk.txt").write_text(done.stdout + done.stderr)
    match = re.search(r"^BENCH (.*)$", done.stdout, re.M)
    if done.returncode != 0 or not match:
        sys.exit(f"wrk failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    fields = {k: int(v) for k, v in (kv.split("=") for kv in match[1].split())}
    # Requests still in flight when wrk stopped may commit after it: let them land.
    time.sleep(0.5)
    stored = buffer_count(db)[0] - before
    errors = {k: fields[k] for k in ("connect", "read", "write", "status", "timeout")}
    return WrkRun(name, batch, fields["duration_us"] / 1e6, fields["requests"], stored, errors,
                  fields["p50"] / 1000, fields["p90"] / 1000, fields["p99"] / 1000, fields["max"] / 1000,
                  gateway_cpu, user1 - user0, sys1 - sys0, wrk_cpu, other)


def describe(run: WrkRun) -> str:
    bad = {k: v for k, v in run.errors.items() if v}
    return (f"{run.records_s:9,.0f} records/s ({run.requests:,} requests of {run.batch} in {run.seconds:.1f} s), "
            f"latency p50 {run.p50_ms:.1f} / p90 {run.p90_ms:.1f} / p99 {run.p99_ms:.1f} / max {run.max_ms:.0f} ms; "
            f"stored {run.stored:,}; CPU s: gateway {run.gateway_cpu:.1f} (user {run.gateway_user:.1f}, "
            f"system {run.gateway_system:.1f}), wrk {run.wrk_cpu:.1f}, "
            f"other {run.other_cpu:.1f}" + (f"; ERRORS {bad}" if bad else ""))


# --------------------------------------------------------------------------- (c) fill and drain


def fill(url: str, robots: list[tuple[str, str]], boot: str, total: int, threads: int) -> tuple[int, int, float]:
    """POST `total` new records in FILL_BATCH batches; return (accepted, duplicates, seconds).

    Each robot's batches go through one thread, in seq order."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    plan: dict[int, list[tuple[str, str, int, int]]] = {i: [] for i in range(threads)}
    seqs = {robot: 0 for robot, _ in robots}
    left, turn = total, 0
    while left:
        robot, token = robots[turn % len(robots)]
        n = min(FILL_BATCH, left)
        plan[(turn % len(robots)) % threads].append((robot, token, seqs[robot] + 1, n))
        seqs[robot] += n
        left -= n
        turn += 1
    totals = {"accepted": 0, "duplicates": 0}
    failures: list[str] = []
    lock = threading.Lock()

    def worker(jobs: list[tuple[str, str, int, int]]) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            for robot, token, first, n in jobs:
                body = ('{"records":[' + ",".join(record(robot, boot, s) for s in range(first, first + n)) + "]}").encode()
                conn.request("POST", "/metrics", body, {"Authorization": f"Bearer {token}",
                                                        "Content-Type": "application/json"})
                response = conn.getresponse()
                reply = response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {reply[:200]!r}")
                doc = json.loads(reply)
                with lock:
                    totals["accepted"] += doc["accepted"]
                    totals["duplicates"] += doc["duplicates"]
        except Exception as exc:  # reported by the caller
            failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    start = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(plan[i],), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
    if failures or any(w.is_alive() for w in workers):
        sys.exit(f"filling the gateway's buffer failed: {failures[:3] or 'a client hung'}")
    return totals["accepted"], totals["duplicates"], time.perf_counter() - start


IDENTITY = ("SELECT robot_id, boot_id, count(*), min(seq), max(seq), sum(seq) FROM records"
            " WHERE {where} GROUP BY robot_id, boot_id ORDER BY robot_id, boot_id")


def identities(db: Path, where: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(IDENTITY.format(where=where)).fetchall()
    finally:
        conn.close()


def dashboard_check(db: Path) -> tuple[int, int, int]:
    """(rows, gap rows, rows arriving out of seq order per robot and boot) at the dashboard."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows, gaps = conn.execute("SELECT count(*), count(*) FILTER (WHERE type = 'gap') FROM records").fetchone()
        disorder = conn.execute(
            "SELECT count(*) FROM (SELECT seq - lag(seq) OVER (PARTITION BY robot_id, boot_id ORDER BY id) AS step"
            " FROM records WHERE type != 'gap') WHERE step <= 0").fetchone()[0]
        return rows, gaps, disorder
    finally:
        conn.close()


def max_id(db: Path) -> int:
    """The dashboard's highest row id: O(log n), cheap enough to poll (count(*) scans)."""
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet
        return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds of each wrk load (default 20)")
    parser.add_argument("--clients", type=int, default=100, help="concurrent robots, one connection each (default 100)")
    parser.add_argument("--drain-records", type=int, default=1_000_000, help="records buffered, then drained (default 1,000,000)")
    parser.add_argument("--drain-timeout", type=int, default=600, help="seconds the drain may take at most (default 600)")
    parser.add_argument("--forward-batch", type=int, default=500, help="the gateway's FORWARD_BATCH (default 500, its default)")
    parser.add_argument("--telemetry-max-mb", type=int, default=1024,
                        help="the gateway's TELEMETRY_MAX_MB: must hold the drain backlog (default 1024)")
    parser.add_argument("--sqlite-seconds", type=float, default=5, help="seconds of each raw SQLite run (default 5)")
    parser.add_argument("--quiet-wait", type=int, default=600,
                        help="seconds to wait for other benchmarks to finish before each measurement (default 600)")
    parser.add_argument("--profile", action="store_true",
                        help="diagnostic: sample the gateway with py-spy during (a) and (b), the forwarder and dashboard "
                             "during (c) (pip install py-spy; slows them a little); collapsed stacks in the work dir")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or not 1 <= args.clients <= 500 or args.drain_records <= 0 or args.drain_timeout <= 0:
        parser.error("--duration, --drain-records, --drain-timeout must be positive, --clients 1 to 500")

    release, dashboard_cmd, gateway_cmd = _bin("otad-release"), _bin("otad-dashboard"), _bin("otad-gateway")
    wrk = _need("wrk", "wrk")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otad-bench-telemetry-", dir="/tmp"))
    env = dict(os.environ, COSIGN_PASSWORD="", PYTHONUNBUFFERED="1")
    env.pop("NOTIFY_SOCKET", None)
    daemons: list[Proc] = []
    machine: list[str] = []
    try:
        print(f"otad telemetry benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{args.clients} robots, {args.duration} s per load, work dir {work}")

        # (d) first, with no daemon running: the ceiling on this disk.
        machine.append(wait_quiet(args.quiet_wait))
        max_bytes = args.telemetry_max_mb * MIB
        raw1 = raw_sqlite(work / "raw.db", 1, args.sqlite_seconds, max_bytes)
        raw100 = raw_sqlite(work / "raw.db", BATCH, args.sqlite_seconds, max_bytes)
        for suffix in ("", "-wal", "-shm"):
            Path(str(work / "raw.db") + suffix).unlink(missing_ok=True)
        print(f"(d) raw SQLite, gateway schema, WAL + synchronous=FULL, {work}:\n"
              f"    1 row per transaction:    {raw1[0]:9,.0f} rows/s ({raw1[1]:,.0f} commits/s)\n"
              f"    {BATCH} rows per transaction: {raw100[0]:9,.0f} rows/s ({raw100[1]:,.0f} commits/s)")

        # Tokens, as an operator lays them out: one per robot, one for the gateway.
        robots = [(f"bench-r{i:03d}", f"bench-token-{i:03d}-{secrets.token_hex(8)}") for i in range(args.clients)]
        write_tokens(work, robots)
        key = work / "bench"
        subprocess.run([release, "keygen", "--output-prefix", str(key)], env=env, check=True, stdout=subprocess.DEVNULL)

        # The dashboard's address is fixed now, but it stays down: the WAN outage.
        dashboard_port = free_port()
        dashboard_db = work / "dashboard-state" / "telemetry.db"
        dashboard_config(work, "dashboard", dashboard_port)
        def start_gateway(tag: str) -> tuple[Proc, str, Path]:
            state = work / f"gateway-{tag}"
            config = gateway_config(work, f"gateway-{tag}", dashboard_port, key, args.telemetry_max_mb, args.forward_batch)
            proc = Proc([gateway_cmd, "--config", str(config)], work / f"gateway-{tag}.log", env)
            daemons.append(proc)
            url = proc.wait_listening()
            wait_until((state / "telemetry.db").exists, 10, "the gateway's telemetry buffer")
            rss = proc_status_kib(proc.pid, "VmRSS") / 1024
            print(f"gateway {url} (pid {proc.pid}, STATE_DIR {state.name}), RSS at start {rss:.1f} MiB; "
                  f"dashboard 127.0.0.1:{dashboard_port} down (WAN outage)")
            return proc, url, state / "telemetry.db"

        gateway, gateway_url, gateway_db = start_gateway("ingest")
        rss_start = proc_status_kib(gateway.pid, "VmRSS") / 1024
        runs: list[WrkRun] = []
        for name, batch, boot in (("a-single", 1, "bench-a"), ("b-batch", BATCH, "bench-b")):
            machine.append(wait_quiet(args.quiet_wait))
            print(f"\n({name[0]}) {args.clients} robots, {batch} record{'s' if batch > 1 else ''} per POST, "
                  f"{args.duration} s:")
            run = run_wrk(wrk, work, name, gateway_url, robots, batch, boot, args.duration, gateway, gateway_db, args.profile)
            runs.append(run)
            print("    " + describe(run))
            print(f"    gateway peak RSS so far {proc_status_kib(gateway.pid, 'VmHWM') / 1024:.1f} MiB")
            if run.other_cpu > NOISE_SHARE * (run.gateway_cpu + run.wrk_cpu + run.other_cpu):
                print(f"    WARNING: {run.other_cpu:.1f} CPU s went to other work during this load")
        held, gaps = buffer_count(gateway_db)
        hwm_ingest = proc_status_kib(gateway.pid, "VmHWM") / 1024
        print(f"buffer after (a) and (b): {held:,} rows, {gaps} gap rows, files "
              f"{sum(p.stat().st_size for p in gateway_db.parent.glob('telemetry.db*')) / MIB:.0f} MiB; stopping this gateway")
        gateway.stop()
        if gaps:
            print(f"WARNING: the gateway dropped records (gap rows: {gaps}): raise --telemetry-max-mb")
        shutil.rmtree(gateway_db.parent)

        # (c) a gateway with an empty buffer; fill it with exactly --drain-records through its own ingest.
        print()
        gateway, gateway_url, gateway_db = start_gateway("drain")
        print(f"(c) filling the buffer with {args.drain_records:,} records in {FILL_BATCH}-record POSTs "
              f"from {FILL_THREADS} client threads ...")
        accepted, duplicates, fill_s = fill(gateway_url, robots, "bench-c", args.drain_records, FILL_THREADS)
        held, gaps = buffer_count(gateway_db)
        print(f"    {accepted:,} accepted, {duplicates} duplicates in {fill_s:.1f} s ({accepted / fill_s:,.0f} records/s); "
              f"buffer now {held:,} rows, {gaps} gap rows; "
              f"files {sum(p.stat().st_size for p in gateway_db.parent.glob('telemetry.db*')) / MIB:.0f} MiB")
        if held != args.drain_records or gaps or duplicates:
            sys.exit("the buffer does not hold exactly the records sent")
        expected = identities(gateway_db, "kind != 'gap'")

        machine.append(wait_quiet(args.quiet_wait))
        dashboard = Proc([dashboard_cmd, "--config", str(work / "dashboard.conf")], work / "dashboard.log", env)
        t0 = time.perf_counter()
        daemons.append(dashboard)
        gw_cpu0, busy0 = cpu_seconds([gateway.pid]), busy_cpu_seconds()
        dashboard.wait_listening()
        spies = [py_spy(pid, args.drain_timeout, work / f"c-drain.{who}.stacks")
                 for who, pid in (("gateway", gateway.pid), ("dashboard", dashboard.pid))] if args.profile else []
        t_listen = time.perf_counter() - t0
        first = None
        deadline = time.monotonic() + args.drain_timeout
        while True:  # poll the dashboard's database, read-only, against the deadline
            top = max_id(dashboard_db)
            now = time.perf_counter() - t0
            if top and first is None:
                first = now
            if top >= args.drain_records:
                break
            if time.monotonic() > deadline or dashboard.popen.poll() is not None:
                break
            time.sleep(0.1)
        drain_s = time.perf_counter() - t0
        for spy in spies:  # py-spy writes its samples on SIGINT
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        gw_cpu, dash_cpu = cpu_seconds([gateway.pid]) - gw_cpu0, cpu_seconds([dashboard.pid])
        busy = busy_cpu_seconds() - busy0
        rows, dash_gaps, disorder = dashboard_check(dashboard_db)
        got = identities(dashboard_db, "type != 'gap'")
        wait_until(lambda: buffer_count(gateway_db)[0] == 0, 30, "the gateway to delete the acknowledged rows")
        exact = rows == args.drain_records and dash_gaps == 0 and got == expected and disorder == 0
        drain_rate = args.drain_records / drain_s
        since_first = args.drain_records / (drain_s - first) if first is not None and drain_s > first else 0.0
        print(f"    dashboard listening {t_listen:.2f} s after start, first record at {first or 0:.2f} s, "
              f"{rows:,} records at {drain_s:.1f} s")
        print(f"    drain: {drain_rate:,.0f} records/s from dashboard start ({since_first:,.0f} records/s from the first "
              f"record); CPU s: gateway {gw_cpu:.1f}, dashboard {dash_cpu:.1f}, machine {busy:.1f} of {2 * drain_s:.1f}")
        print(f"    dashboard holds {rows:,} rows, {dash_gaps} gap rows, {disorder} out of seq order; per robot and boot "
              f"(count, min, max, sum of seq) {'equal to' if got == expected else 'DIFFERENT from'} the gateway's buffer; "
              f"gateway buffer now empty")
        hwm_drain = proc_status_kib(gateway.pid, "VmHWM") / 1024
        hwm = max(hwm_ingest, hwm_drain)
        dash_hwm = proc_status_kib(dashboard.pid, "VmHWM") / 1024

        single, batched = runs
        print("\n| measurement | records/s | p99 ms | target | result |")
        print("|---|--:|--:|---|---|")
        print(f"| (a) 1 record per POST, {args.clients} robots | {single.records_s:,.0f} | {single.p99_ms:.1f} | "
              f">= 3,000/s, p99 <= 50 ms | {_verdict(single.records_s >= SINGLE_TARGET and single.p99_ms <= P99_TARGET_MS)} |")
        print(f"| (b) {BATCH} records per POST, {args.clients} robots | {batched.records_s:,.0f} | {batched.p99_ms:.1f} | "
              f">= 30,000/s | {_verdict(batched.records_s >= BATCH_TARGET)} |")
        print(f"| (c) drain of {args.drain_records:,} to the dashboard | {drain_rate:,.0f} | - | >= 20,000/s, exactly "
              f"{args.drain_records:,} | {_verdict(drain_rate >= DRAIN_TARGET and exact)} |")
        print(f"| (d) raw SQLite, 1 row per transaction | {raw1[0]:,.0f} | - | ceiling | - |")
        print(f"| (d) raw SQLite, {BATCH} rows per transaction | {raw100[0]:,.0f} | - | ceiling | - |")
        print()
        n = args.clients  # requests in flight when wrk stopped are stored but not counted by wrk
        clean = all(not any(r.errors.values()) and r.requests * r.batch <= r.stored <= (r.requests + n) * r.batch
                    for r in runs)
        print(f"{_verdict(single.records_s >= SINGLE_TARGET)}  (a) single-record ingest: {single.records_s:,.0f} records/s "
              f"(target >= {SINGLE_TARGET:,.0f})")
        print(f"{_verdict(single.p99_ms <= P99_TARGET_MS)}  (a) p99 latency: {single.p99_ms:.1f} ms "
              f"(target <= {P99_TARGET_MS:.0f} ms)")
        print(f"{_verdict(batched.records_s >= BATCH_TARGET)}  (b) {BATCH}-record batches: {batched.records_s:,.0f} records/s "
              f"(target >= {BATCH_TARGET:,.0f})")
        print(f"{_verdict(drain_rate >= DRAIN_TARGET)}  (c) drain: {drain_rate:,.0f} records/s (target >= {DRAIN_TARGET:,.0f})")
        print(f"{_verdict(exact)}  (c) the dashboard holds exactly {args.drain_records:,}, each once, in seq order per robot: "
              f"{rows:,}")
        print(f"{_verdict(clean)}  every request answered 200 and every record stored: "
              + "; ".join(f"{r.name}: {r.requests * r.batch:,} sent in 200s, {r.stored:,} stored, errors {r.errors}" for r in runs))
        print(f"      gateway peak RSS over the run (VmHWM): {hwm:.1f} MiB (at start {rss_start:.1f} MiB; "
              f"(a)+(b) {hwm_ingest:.1f}, fill + drain {hwm_drain:.1f}); dashboard {dash_hwm:.1f} MiB")
        print(f"      machine before each measurement: {', '.join(machine)}")
        print(f"\ntotal benchmark time {time.monotonic() - started:.0f} s")
    finally:
        for proc in reversed(daemons):
            proc.stop(signal.SIGTERM)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
