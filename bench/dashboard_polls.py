#!/usr/bin/env python3
"""Benchmark the dashboard's answer to gateways' manifest polls (conditional GET /manifest -> 304).

A measurement, not a test: it always exits 0 (unless it cannot run at all). The
spec has no target ratio here ("a site of many gateways must be cheap to
serve"), so it prints requests/s, p50/p99 latency and the dashboard's CPU time
per poll, and the ratio to nginx serving the same manifest.json as a static
file (ETag on, so If-None-Match gets a 304 too), measured in the same run with
the same load. The only PASS/MISS is that every request got a 304.

It starts a real dashboard on 127.0.0.1 (in a temporary folder under /tmp) with
one release published by `otad-release`, and loads it with ApacheBench: --requests
conditional GETs (default 10,000), --concurrency at a time (default 16), once
opening a new connection per request and once with keep-alive (`ab -k`). Run it as

    .venv/bin/python bench/dashboard_polls.py [--requests 10000] [--concurrency 16] [--repeat 3]

It needs ab and nginx (Debian: apt-get install apache2-utils nginx-light). See
docs/benchmarks.md for the figures and how to read them.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_serving import (  # noqa: E402 - shared helpers of the serving benchmarks
    NOISE_SHARE,
    Proc,
    _bin,
    _need,
    busy_cpu_seconds,
    children,
    children_cpu_seconds,
    cpu_seconds,
    proc_status_kib,
    reset_hwm,
    self_cpu_seconds,
    start_nginx,
)

KIB = 1 << 10
# nginx serves the OTA folder's manifest.json at the dashboard's URL. keepalive_requests is
# raised from nginx's default (1000) so that, like waitress, it never closes a busy
# keep-alive connection during a run.
MANIFEST_LOCATION = """\
        location = /manifest {{
            alias {ota}/manifest.json;
            default_type application/json;
            etag on;
        }}
"""
NGINX_HTTP_EXTRA = "    keepalive_requests 1000000;\n"
MODES = (("new connection", False), ("keep-alive", True))


@dataclass(frozen=True)
class AbRun:
    server: str
    keepalive: bool
    seconds: float
    complete: int
    failed: int
    non_2xx: int
    keepalive_requests: int
    body_bytes: int
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu: float
    client_cpu: float
    other_cpu: float
    peak_rss_kib: int  # dashboard only: VmHWM after the run, reset before it


def conditional_get(url: str, etag: str | None = None) -> tuple[int, str, bytes]:
    """(status, ETag header, body) of GET url, with If-None-Match: etag if given."""
    request = urllib.request.Request(url, headers={"If-None-Match": etag} if etag else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers.get("ETag", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("ETag", ""), exc.read()


def _field(text: str, label: str, default: str | None = None) -> str:
    match = re.search(rf"^{re.escape(label)}:\s+([\d.]+)", text, re.M)
    if match:
        return match[1]
    if default is None:
        raise RuntimeError(f"ab printed no {label!r}:\n{text[-2000:]}")
    return default


def run_ab(ab: str, server: str, url: str, etag: str, args, keepalive: bool, csv: Path,
           pids: list[int], rss_pid: int | None) -> AbRun:
    # -t before -n: a time limit (ab's -t alone would imply -n 50000), then the count.
    argv = [ab, "-q", "-t", str(args.timeout), "-n", str(args.requests), "-c", str(args.concurrency),
            "-s", "10", "-H", f"If-None-Match: {etag}", "-e", str(csv)]
    if keepalive:
        argv.append("-k")
    argv.append(url)
    if rss_pid is not None:
        reset_hwm(rss_pid)
    cpu0, clients0, self0, busy0 = cpu_seconds(pids), children_cpu_seconds(), self_cpu_seconds(), busy_cpu_seconds()
    start = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=args.timeout + 60)
    seconds = time.perf_counter() - start
    cpu, client_cpu = cpu_seconds(pids) - cpu0, children_cpu_seconds() - clients0
    other = max(0.0, busy_cpu_seconds() - busy0 - cpu - client_cpu - (self_cpu_seconds() - self0))
    if result.returncode != 0:
        sys.exit(f"ab failed ({result.returncode}) against {server}:\n{result.stderr[-2000:]}{result.stdout[-2000:]}")
    out = result.stdout
    percentiles = dict(line.split(",") for line in csv.read_text().splitlines()[1:])
    return AbRun(
        server=server,
        keepalive=keepalive,
        seconds=seconds,
        complete=int(_field(out, "Complete requests")),
        failed=int(_field(out, "Failed requests")),
        non_2xx=int(_field(out, "Non-2xx responses", "0")),
        keepalive_requests=int(_field(out, "Keep-Alive requests", "0")),
        body_bytes=int(_field(out, "HTML transferred")),
        rps=float(_field(out, "Requests per second")),
        p50_ms=float(percentiles["50"]),
        p99_ms=float(percentiles["99"]),
        server_cpu=cpu,
        client_cpu=client_cpu,
        other_cpu=other,
        peak_rss_kib=proc_status_kib(rss_pid, "VmHWM") if rss_pid is not None else 0,
    )


def all_304(run: AbRun, requests: int) -> bool:
    """ab counts a 304 as a non-2xx response. Every non-304 answer either server could give
    here (200, 404, 412, 500...) has a body; a 304 never has one. So: all N complete, all N
    non-2xx, no failures, zero body bytes in total means all N were 304s."""
    return run.complete == requests and run.non_2xx == requests and run.failed == 0 and run.body_bytes == 0


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10000, help="conditional GETs per run (default 10000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (ab -c, default 16)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per server and mode; the median is reported (default 3)")
    parser.add_argument("--timeout", type=int, default=120, help="time limit of one ab run in seconds (default 120)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.concurrency <= 256 or args.repeat <= 0 or args.timeout <= 0:
        parser.error("--requests 1 to 1000000, --concurrency 1 to 256, --repeat and --timeout positive")
    if args.concurrency > args.requests:
        parser.error("--concurrency cannot exceed --requests")

    release, dashboard_cmd = _bin("otad-release"), _bin("otad-dashboard")
    ab = _need("ab", "apache2-utils")
    nginx = _need("nginx", "nginx-light")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otad-bench-polls-", dir="/tmp"))
    work.chmod(0o755)  # nginx runs as nobody when we are root: it must reach manifest.json
    env = dict(os.environ, COSIGN_PASSWORD="", PYTHONUNBUFFERED="1")
    env.pop("SOURCE_DATE_EPOCH", None)
    env.pop("NOTIFY_SOCKET", None)
    daemons: list[Proc] = []
    try:
        print(f"otad dashboard manifest poll benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{args.requests} requests at concurrency {args.concurrency}, repeat {args.repeat}, median reported, "
              f"work dir {work}")
        key = work / "bench"
        subprocess.run([release, "keygen", "--output-prefix", str(key)], env=env, check=True, stdout=subprocess.DEVNULL)
        app = work / "app"
        (app / "bin").mkdir(parents=True)
        (app / "VERSION").write_text("1.0.0\n")
        (app / "bin" / "app").write_text("#!/bin/sh\necho app\n")
        (app / "bin" / "app").chmod(0o755)
        (app / "data.bin").write_bytes(os.urandom(64 * KIB))
        subprocess.run([release, "build", "--app-dir", str(app), "--version", "1.0.0", "--key", str(key.with_suffix(".key")),
                        "--out", str(work / "out")], env=env, check=True, stdout=subprocess.DEVNULL)
        ota = work / "ota"
        subprocess.run([release, "publish", "--from", str(work / "out"), "--to", str(ota)],
                       env=env, check=True, stdout=subprocess.DEVNULL)

        (work / "dashboard.conf").write_text(
            f"LISTEN=127.0.0.1:0\nOTA_DIR={ota}\nSTATE_DIR={work / 'dashboard-state'}\n")
        dashboard = Proc([dashboard_cmd, "--config", str(work / "dashboard.conf")], work / "dashboard.log", env)
        daemons.append(dashboard)
        dashboard_url = dashboard.wait_listening()
        nginx_proc, nginx_url = start_nginx(nginx, work, MANIFEST_LOCATION.format(ota=ota), NGINX_HTTP_EXTRA)
        daemons.append(nginx_proc)
        urls = {"dashboard": f"{dashboard_url}/manifest", "nginx": f"{nginx_url}/manifest"}
        pids = {"dashboard": [dashboard.pid], "nginx": [nginx_proc.pid, *children(nginx_proc.pid)]}

        # Each server's own ETag (the dashboard's is a content hash, nginx's mtime-size), and a check
        # that both serve the same bytes and answer If-None-Match with a 304.
        etags: dict[str, str] = {}
        bodies = {}
        for server, url in urls.items():
            status, etag, body = conditional_get(url)
            again, _, empty = conditional_get(url, etag)
            if status != 200 or not etag or again != 304 or empty:
                sys.exit(f"{server} {url}: GET -> {status} (ETag {etag!r}), conditional GET -> {again}; expected 200 then 304")
            etags[server], bodies[server] = etag, body
        if bodies["dashboard"] != bodies["nginx"]:
            sys.exit("the dashboard and nginx serve different manifests")
        print(f"manifest {len(bodies['dashboard'])} bytes; ETag dashboard {etags['dashboard']}, nginx {etags['nginx']}; "
              f"nginx {nginx_url} ({len(pids['nginx']) - 1} workers{', as nobody' if os.geteuid() == 0 else ''})")
        print(f"dashboard RSS before the load: {proc_status_kib(dashboard.pid, 'VmRSS') / 1024:.1f} MiB, "
              f"{proc_status_kib(dashboard.pid, 'Threads')} threads")

        runs: list[AbRun] = []
        for mode, keepalive in MODES:
            print(f"\n{mode} (ab{' -k' if keepalive else ''}):")
            for i in range(args.repeat):
                # Alternate which goes first, so neither always gets the warmer machine.
                for server in (("dashboard", "nginx") if i % 2 == 0 else ("nginx", "dashboard")):
                    run = run_ab(ab, server, urls[server], etags[server], args, keepalive, work / "percentiles.csv",
                                 pids[server], dashboard.pid if server == "dashboard" else None)
                    runs.append(run)
                    rss = f", peak RSS {run.peak_rss_kib / 1024:.1f} MiB" if run.peak_rss_kib else ""
                    print(f"  {server:9s} {run.rps:8.0f} req/s, p50 {run.p50_ms:6.3f} ms, p99 {run.p99_ms:6.3f} ms, "
                          f"304s {run.non_2xx}/{run.complete}, keep-alive {run.keepalive_requests}, "
                          f"CPU s: server {run.server_cpu:4.2f}, ab {run.client_cpu:4.2f}, other {run.other_cpu:4.2f}{rss}")

        print()
        header = ("mode", "server", "req/s", "p50 ms", "p99 ms", "server CPU µs/req", "keep-alive reqs", "ratio req/s")
        table = [header]
        summary = {}
        for mode, keepalive in MODES:
            for server in ("dashboard", "nginx"):
                mine = [r for r in runs if r.server == server and r.keepalive == keepalive]
                summary[mode, server] = (
                    statistics.median(r.rps for r in mine),
                    statistics.median(r.p50_ms for r in mine),
                    statistics.median(r.p99_ms for r in mine),
                    statistics.median(r.server_cpu for r in mine) / args.requests * 1e6,
                    min(r.keepalive_requests for r in mine),
                )
            for server in ("dashboard", "nginx"):
                rps, p50, p99, cpu_us, kept = summary[mode, server]
                ratio = rps / summary[mode, "nginx"][0]
                table.append((mode, server, f"{rps:.0f}", f"{p50:.2f}", f"{p99:.2f}", f"{cpu_us:.0f}", f"{kept}",
                              f"{ratio:.2f}" if server == "dashboard" else "-"))
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for n, r in enumerate(table):
            print("| " + " | ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
            if n == 0:
                print("|" + "|".join("-" * (w + 2) if i <= 1 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")

        print()
        ok = sum(all_304(r, args.requests) for r in runs)
        print(f"{_verdict(ok == len(runs))}  every request answered 304 Not Modified: {ok} of {len(runs)} runs "
              f"of {args.requests} (ab: complete = non-2xx = {args.requests}, 0 failed, 0 body bytes)")
        for mode, _ in MODES:
            rps, p50, p99, cpu_us, _ = summary[mode, "dashboard"]
            print(f"      {mode}: dashboard {rps:.0f} req/s, p99 {p99:.2f} ms, "
                  f"{rps / summary[mode, 'nginx'][0]:.2f} x nginx ({summary[mode, 'nginx'][0]:.0f} req/s); "
                  f"{cpu_us:.0f} µs of dashboard CPU per poll")
        worst = min(summary[mode, "dashboard"][0] for mode, _ in MODES)
        cpu_us = max(summary[mode, "dashboard"][3] for mode, _ in MODES)
        print(f"      fleet: N gateways polling every 30 s send N/30 req/s; {worst:.0f} req/s is {worst * 30:,.0f} "
              f"gateways on this box with ab beside it, {30e6 / cpu_us:,.0f} per dashboard CPU core")
        dash_rss = max(r.peak_rss_kib for r in runs if r.server == "dashboard") / 1024
        print(f"      dashboard peak RSS during the runs: {dash_rss:.1f} MiB")
        available = sum(r.seconds for r in runs) * (os.cpu_count() or 1)
        other = sum(r.other_cpu for r in runs)
        busy = other > NOISE_SHARE * available
        print(f"      (CPU outside the server, ab and this script: {other:.1f} of the {available:.1f} CPU s of the runs, "
              f"{100 * other / available:.0f}%{': the machine was busy, re-run when it is quiet' if busy else ''})")
        print(f"\ntotal benchmark time {time.monotonic() - started:.0f} s")
    finally:
        for proc in reversed(daemons):
            proc.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
