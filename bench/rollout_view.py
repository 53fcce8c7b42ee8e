#!/usr/bin/env python3
"""Benchmark the dashboard's rollout view at fleet scale: 10,000 robots in 200 sites, one rollout.

A measurement, not a test: it always exits 0 (unless it cannot run at all). It
prints p50/p99 ms of the rollout views of a real otad-dashboard (loopback, real
HTTP, its default 8 threads) holding generated data, and the ratio of each p99
to two references measured in the same run:

- the same dashboard's `GET /healthz` (the server's floor: routing, waitress,
  one small JSON answer);
- the sqlite3 CLI running the equivalent aggregation (robots per site, phase and
  outcome) directly on the dashboard's database file (`.timer on`, query time only).

The data gets in the way real data does: each site's gateway forwards its robots'
records (a metric and the rollout's update events, Wire 3) in POST /metrics
batches with its own gateway token, and sends its site report (Wire 4, POST
/rollouts/site-report); the plan is created and approved through the admin API
with an operator token. Then, one request at a time over a kept connection, it
times `/rollouts/<id>` (the console page), `GET /api/rollouts/<id>` (its JSON
status, operator token), `/rollouts` (the list) and `/status` (which lists the
rollouts in progress), each bounded by --requests and --seconds. Run it as

    .venv/bin/python bench/rollout_view.py [--sites 200] [--robots-per-site 50] [--requests 200] [--seconds 60]

It needs the sqlite3 CLI (Debian: apt-get install sqlite3). See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_serving import Proc, _bin, _need, cpu_seconds, proc_status_kib  # noqa: E402 - shared bench helpers

from otad.rollout.cohort import phase_of  # noqa: E402 - the same cohorts the dashboard computes
from otad.rollout.plan import plan_from_doc  # noqa: E402

ROLLOUT = "fleet-2"
TARGET_P99_MS = 500.0  # the view must stay usable: an operator reloads it during an incident
OPEN_PHASES = 3  # phases 0..2 have started; phase 3 (100 %) has not
OUTCOMES = (("committed", 0.90), ("rolled_back", 0.03), ("installing", 0.07))
HALTED_SITES = 4  # sites whose report says they halted phase 2 on their own criteria
# Robots per site, phase and outcome, as progress.tally counts them, in SQL on the same file.
REFERENCE_SQL = """SELECT gateway_id, phase, outcome, COUNT(*) FROM (
  SELECT gateway_id, phase, robot_id, CASE WHEN MAX(event IN ('rolled_back','blacklisted')) THEN 2
    WHEN MAX(event = 'committed') THEN 1 WHEN {now} - MIN(at) > 3600 THEN 2 ELSE 0 END AS outcome
  FROM rollout_events WHERE rollout_id = '{rollout}' GROUP BY gateway_id, robot_id, phase)
GROUP BY gateway_id, phase, outcome;
SELECT gateway_id, version, COUNT(*) FROM robots GROUP BY gateway_id, version;
"""


def plan_fields(expires: float) -> dict:
    return {"rollout_id": ROLLOUT, "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)),
            "version": "2.0.0", "from": ["1.0.0"], "install_timeout_s": 3600, "on_halt": "pause",
            "phases": [{"robots": ["s000-r00", "s001-r00"], "advance": "approve", "halt": {"fleet": {"max_failures": 1}}},
                       {"percent": 10, "min_soak_s": 600, "halt": {"fleet": {"max_failure_rate": 0.2, "min_attempts": 20}}},
                       {"percent": 50, "min_soak_s": 1800, "advance": "approve",
                        "halt": {"fleet": {"max_failure_rate": 0.2, "min_attempts": 100}, "site": {"max_failures": 3}}},
                       {"percent": 100}]}


class Client:
    """One kept HTTP/1.1 connection to the dashboard (reopened if the server closes it)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def request(self, method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                payload = response.read()
                if response.will_close:
                    self.conn.close()
                return response.status, payload
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def ok(self, method: str, path: str, body: object = None, token: str | None = None, expect: int = 200) -> bytes:
        status, payload = self.request(method, path, body, token)
        if status != expect:
            sys.exit(f"{method} {path}: {status}, expected {expect}: {payload[:500]!r}")
        return payload


def _ts(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def site_records(site: str, robots: int, plan, rng: random.Random, now: float) -> tuple[list[dict], dict]:
    """A site's records as its gateway buffer holds them, and what they add up to (per phase and outcome)."""
    rows: list[dict] = []
    counts: dict[int, dict[str, int]] = {}

    def add(record: dict, at: float) -> None:
        rows.append({"id": len(rows) + 1, "received": min(at, now), "record": record})

    for i in range(robots):
        robot = f"{site}-r{i:02d}"
        base = {"robot_id": robot, "boot_id": "boot-1"}
        phase = phase_of(plan, robot)
        seq, version = 1, "1.0.0"
        if phase is not None and phase < OPEN_PHASES:
            outcome = rng.choices([o for o, _ in OUTCOMES], [w for _, w in OUTCOMES])[0]
            started = now - rng.uniform(60, 3000) if outcome == "installing" else now - rng.uniform(3600, 7200)
            events = [("installed", started)]
            if outcome != "installing":
                events.append((outcome, started + rng.uniform(30, 600)))
            for name, at in events:
                add({**base, "seq": seq, "ts": _ts(at), "type": "event", "event": name, "version": "2.0.0",
                     "detail": "", "rollout_id": ROLLOUT, "phase": phase}, at)
                seq += 1
            version = "2.0.0" if outcome == "committed" else "1.0.0"
            table = counts.setdefault(phase, {})
            table[outcome] = table.get(outcome, 0) + 1
        add({**base, "seq": seq, "ts": _ts(now - rng.uniform(0, 20)), "type": "metric", "cpu": rng.uniform(1, 90),
             "mem": rng.uniform(10, 80), "version": version, "health": "ok"}, now)
    return rows, counts


def site_report(site: str, counts: dict, revision: int, halted: bool, now: float) -> dict:
    phases = []
    for n in range(OPEN_PHASES):
        table = counts.get(n, {})
        failed, committed = table.get("rolled_back", 0), table.get("committed", 0)
        halt = halted and n == OPEN_PHASES - 1
        phases.append({"index": n, "started_at": now - 7200 + 1200 * n, "halted_at": now - 600 if halt else None,
                       "reason": f"phase {n} at site {site}: 4 failed, more than max_failures 3" if halt else "",
                       "counts": {"attempts": committed + failed, "committed": committed, "failed": failed}})
    return {"site": site, "rollout_id": ROLLOUT, "revision": revision, "phases": phases,
            "halted": {"at": now - 600, "reason": phases[-1]["reason"]} if halted else None}


def setup(work: Path, args, env: dict) -> tuple[Proc, dict[str, str], str]:
    release = _bin("otad-release")
    for role in ("release", "rollout"):
        subprocess.run([release, "keygen", "--output-prefix", str(work / role)], env=env, check=True, stdout=subprocess.DEVNULL)
    app = work / "app"
    (app / "bin").mkdir(parents=True)
    (app / "VERSION").write_text("2.0.0\n")
    (app / "bin" / "app").write_text("#!/bin/sh\necho app\n")
    (app / "bin" / "app").chmod(0o755)
    subprocess.run([release, "build", "--app-dir", str(app), "--version", "2.0.0", "--key", str(work / "release.key"),
                    "--out", str(work / "out")], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([release, "publish", "--from", str(work / "out"), "--to", str(work / "ota")],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    gateways = {f"s{n:03d}": secrets.token_hex(16) for n in range(args.sites)}
    operator = secrets.token_hex(16)
    for name, lines in (("gateway-tokens", [f"{g} {t}" for g, t in gateways.items()]), ("operator-tokens", [f"bench {operator}"])):
        (work / name).write_text("\n".join(lines) + "\n")
        (work / name).chmod(0o600)
    (work / "dashboard.conf").write_text(
        f"LISTEN=127.0.0.1:0\nOTA_DIR={work / 'ota'}\nSTATE_DIR={work / 'state'}\nTOKENS_FILE={work / 'gateway-tokens'}\n"
        f"OPERATOR_TOKENS_FILE={work / 'operator-tokens'}\nROLLOUT_KEY={work / 'rollout.key'}\n")
    dashboard = Proc([_bin("otad-dashboard"), "--config", str(work / "dashboard.conf")], work / "dashboard.log",
                     dict(env, OTAD_ROLLOUT_KEY_PASSWORD=""))
    return dashboard, gateways, operator


def load_fleet(client: Client, args, gateways: dict[str, str], operator: str) -> dict:
    """The rollout created and approved up to phase 2, every site's records forwarded and its report sent."""
    now = time.time()
    client.ok("POST", "/api/rollouts", plan_fields(now + 30 * 86400), operator, expect=201)
    for _ in range(2):
        revision = json.loads(client.ok("POST", f"/api/rollouts/{ROLLOUT}/approve", {"reason": "bench"}, operator))["revision"]
    plan = plan_from_doc({"schema": 1, **plan_fields(now + 30 * 86400), "revision": 1})
    rng = random.Random(args.seed)
    totals: dict[str, int] = {"records": 0, "events": 0}
    halted = set(rng.sample(sorted(gateways), min(HALTED_SITES, len(gateways))))
    started = time.monotonic()
    for site, token in gateways.items():
        rows, counts = site_records(site, args.robots_per_site, plan, rng, now)
        for start in range(0, len(rows), 1000):  # MAX_RECORDS per POST, as the forwarder batches
            body = {"gateway_id": site, "buffer_id": "b0" + site[1:], "backlog": 0, "records": rows[start:start + 1000]}
            client.ok("POST", "/metrics", body, token)
        client.ok("POST", "/rollouts/site-report", site_report(site, counts, revision, site in halted, now), token)
        totals["records"] += len(rows)
        totals["events"] += sum(1 for r in rows if r["record"]["type"] == "event")
        for table in counts.values():
            for outcome, n in table.items():
                totals[outcome] = totals.get(outcome, 0) + n
    totals["load_s"] = time.monotonic() - started
    return totals


def check_view(client: Client, operator: str, totals: dict, args) -> str | None:
    """Why the status document does not show the generated data, or None."""
    doc = json.loads(client.ok("GET", f"/api/rollouts/{ROLLOUT}", token=operator))
    sums = {key: sum(p[key] for p in doc["phases"]) for key in ("committed", "failed", "installing")}
    want = {"committed": totals.get("committed", 0), "failed": totals.get("rolled_back", 0),
            "installing": totals.get("installing", 0)}
    sites = len(doc["phases"][0]["sites"])
    site_halts = sum(1 for h in doc["halts"] if h["scope"] == "site")
    if sums != want or sites != args.sites or site_halts != min(HALTED_SITES, args.sites) or doc["state"] != "active":
        return f"view {sums}, {sites} sites, {site_halts} site halts, {doc['state']}; generated {want}, {args.sites} sites"
    return None


def time_route(client: Client, path: str, token: str | None, args, pid: int) -> dict:
    for _ in range(3):  # warm-up: first-request imports and caches are not the steady state
        client.ok("GET", path, token=token)
    times, size = [], 0
    cpu0, deadline = cpu_seconds([pid]), time.monotonic() + args.seconds
    while len(times) < args.requests and time.monotonic() < deadline:
        start = time.perf_counter()
        size = len(client.ok("GET", path, token=token))
        times.append((time.perf_counter() - start) * 1000)
    return {"n": len(times), "times": times, "bytes": size, "cpu_ms": (cpu_seconds([pid]) - cpu0) * 1000 / len(times)}


def time_sqlite(sqlite: str, db: Path, args) -> dict:
    """The reference aggregation in the sqlite3 CLI, --requests times in one process; SQLite's own timer."""
    query = REFERENCE_SQL.format(now=time.time(), rollout=ROLLOUT)
    script = ".timer on\n" + query * (args.requests + 3)
    result = subprocess.run([sqlite, str(db)], input=script, capture_output=True, text=True, timeout=args.seconds + 60)
    if result.returncode != 0:
        sys.exit(f"sqlite3 failed: {result.stderr[-1000:]}")
    reals = [float(m) * 1000 for m in re.findall(r"Run Time: real ([\d.]+)", result.stdout)]
    pairs = [a + b for a, b in zip(reals[0::2], reals[1::2])][3:]  # both statements, warm-up dropped
    return {"n": len(pairs), "times": pairs, "bytes": 0, "cpu_ms": None}


def p(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def report(results: dict[str, dict]) -> None:
    floor, sql = p(results["/healthz"]["times"], 0.99), p(results["sqlite3 CLI"]["times"], 0.99)
    header = ("route", "requests", "p50 ms", "p99 ms", "max ms", "CPU ms/req", "KiB", "p99 / healthz", "p99 / sqlite3")
    table = [header]
    for name, r in results.items():
        p99 = p(r["times"], 0.99)
        cpu = f"{r['cpu_ms']:.1f}" if r["cpu_ms"] is not None else "-"
        table.append((name, str(r["n"]), f"{statistics.median(r['times']):.2f}", f"{p99:.2f}", f"{max(r['times']):.2f}",
                      cpu, f"{r['bytes'] / 1024:.0f}", f"{p99 / floor:.0f}", f"{p99 / sql:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=200, help="sites, one gateway each (default 200)")
    parser.add_argument("--robots-per-site", type=int, default=50, help="robots per site (default 50)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per route at most (default 200)")
    parser.add_argument("--seconds", type=float, default=60, help="time limit per route in seconds (default 60)")
    parser.add_argument("--seed", type=int, default=15, help="seed of the generated fleet (default 15)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if not 1 <= args.sites <= 1000 or not 1 <= args.robots_per_site <= 100 or not 1 <= args.requests <= 100000 \
            or args.seconds <= 0:
        parser.error("--sites 1 to 1000, --robots-per-site 1 to 100, --requests 1 to 100000, --seconds positive")
    sqlite = _need("sqlite3", "sqlite3")
    work = Path(tempfile.mkdtemp(prefix="otad-bench-rview-", dir="/tmp"))
    env = dict(os.environ, COSIGN_PASSWORD="", PYTHONUNBUFFERED="1")
    env.pop("NOTIFY_SOCKET", None)
    dashboard = None
    started = time.monotonic()
    try:
        print(f"otad rollout view benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{args.sites} sites x {args.robots_per_site} robots, at most {args.requests} requests or "
              f"{args.seconds:g} s per route, one at a time, work dir {work}")
        dashboard, gateways, operator = setup(work, args, env)
        client = Client(dashboard.wait_listening())
        totals = load_fleet(client, args, gateways, operator)
        db = work / "state" / "telemetry.db"
        print(f"loaded {totals['records']} records ({totals['events']} rollout events) from {args.sites} sites in "
              f"{totals['load_s']:.1f} s through POST /metrics, and {args.sites} site reports; outcomes: "
              f"{ {k: v for k, v in totals.items() if k in ('committed', 'rolled_back', 'installing')} }; "
              f"database {sum(f.stat().st_size for f in db.parent.glob(db.name + '*')) / 2**20:.1f} MiB (with its WAL)")
        wrong = check_view(client, operator, totals, args)
        print(f"{'MISS' if wrong else 'PASS'}  the status document shows the generated counts, sites and site halts"
              f"{': ' + wrong if wrong else ''}")
        routes = {f"/rollouts/{ROLLOUT}": None, f"/api/rollouts/{ROLLOUT}": operator, "/rollouts": None, "/status": None,
                  "/healthz": None}
        results = {}
        for path, token in routes.items():
            results[path] = time_route(client, path, token, args, dashboard.pid)
            r = results[path]
            print(f"  {path:24s} {r['n']:4d} requests, p50 {statistics.median(r['times']):8.2f} ms, "
                  f"p99 {p(r['times'], 0.99):8.2f} ms, {r['cpu_ms']:.1f} ms dashboard CPU per request")
        results["sqlite3 CLI"] = time_sqlite(sqlite, db, args)
        print(f"dashboard RSS after the runs: {proc_status_kib(dashboard.pid, 'VmRSS') / 1024:.1f} MiB "
              f"(peak {proc_status_kib(dashboard.pid, 'VmHWM') / 1024:.1f} MiB)\n")
        report(results)
        print()
        for path in list(routes)[:4]:
            p99 = p(results[path]["times"], 0.99)
            print(f"{'PASS' if p99 <= TARGET_P99_MS else 'MISS'}  {path}: p99 {p99:.1f} ms (target <= {TARGET_P99_MS:g} ms), "
                  f"{p99 / p(results['/healthz']['times'], 0.99):.0f} x /healthz, "
                  f"{p99 / p(results['sqlite3 CLI']['times'], 0.99):.1f} x the sqlite3 CLI's aggregation")
        print(f"\ntotal benchmark time {time.monotonic() - started:.0f} s")
    finally:
        if dashboard is not None:
            dashboard.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
