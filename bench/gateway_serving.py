#!/usr/bin/env python3
"""Benchmark the gateway's edge listener against nginx serving the same file.

A measurement, not a test: it always exits 0 (unless it cannot run at all) and
prints PASS/MISS against two targets:

* aggregate throughput: gateway >= 0.9 x nginx, both serving the same cached
  artifact to --clients concurrent `curl` downloads on loopback;
* peak RSS of the gateway process during that load < 60 MiB, and flat in the
  number of clients (measured at 1 client and at --clients).

It sets up, in a temporary folder under /tmp, a real dashboard and a real
gateway on 127.0.0.1, publishes one release whose artifact is about --size-mb
MiB of random data, waits until the gateway has cached and verified it, then
serves the gateway's cached file (STATE_DIR/cache/files/<artifact>) with nginx
as well. Run it as

    .venv/bin/python bench/gateway_serving.py [--size-mb 256] [--clients 32] [--repeat 3]

It needs curl and nginx (Debian: apt-get install curl nginx-light). See
docs/benchmarks.md for the figures and how to read them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
CHUNK = 1 << 20
FILE_MB = 16  # the app is split in files of this size (random data: gzip cannot shrink it)

RATIO_TARGET = 0.9
RSS_TARGET_MIB = 60.0
# "Flat": the peak at --clients may be at most this much above the peak at 1 client.
RSS_FLAT_SLACK_MIB = 4.0
# Warn when the CPU time spent outside the server, the clients and this script exceeds this
# share of the loads' CPU time. On a quiet machine it is 3-9% (softirq time not charged
# to any process); more means other processes competed for the CPUs.
NOISE_SHARE = 0.10
# --nginx-tuned: the two directives of the nginx config that cost CPU on loopback (see
# docs/benchmarks.md): TCP_CORK around each sendfile, and sendfile in chunks of 2 MiB.
TUNED = ("tcp_nopush on;", "tcp_nopush off;\n    sendfile_max_chunk 0;")
CURL_FORMAT = "%{http_code} %{size_download} %{time_total}\\n"


# --------------------------------------------------------------------------- helpers


def _bin(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: run with the project's venv, e.g. .venv/bin/python bench/gateway_serving.py")
    return found


def _need(tool: str, package: str) -> str:
    found = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if not found:
        sys.exit(f"{tool} not found: install it, on Debian with `apt-get install {package}`")
    return found


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            sys.exit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_hwm(pid: int) -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def busy_cpu_seconds() -> float:
    """CPU time all CPUs spent not idle since boot (from /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of this process's reaped children (the load clients)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return found


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


class Proc:
    """A daemon started with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, preexec=None) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                          env=env, preexec_fn=preexec)
        self.pid = self.popen.pid

    def wait_listening(self, timeout: float = 30) -> str:
        def found():
            if self.popen.poll() is not None:
                sys.exit(f"{self.log.stem} exited with {self.popen.returncode}:\n{self.log.read_text()[-3000:]}")
            match = re.search(r"listening on (http://\S+)", self.log.read_text(errors="replace"))
            return match and match[1]
        return wait_until(found, timeout, f"{self.log.stem} to listen")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


# --------------------------------------------------------------------------- setup


def make_app(root: Path, size_bytes: int, seed: int) -> None:
    """An app folder of size_bytes of random data, in FILE_MB MiB files: its .tar.gz is about as big."""
    rng = random.Random(seed)
    (root / "bin").mkdir(parents=True)
    (root / "VERSION").write_text("1.0.0\n")
    app = root / "bin" / "app"
    app.write_text("#!/bin/sh\necho app\n")
    app.chmod(0o755)
    index = 0
    while size_bytes > 0:
        n = min(size_bytes, FILE_MB * MIB)
        with open(root / f"data{index:03d}.bin", "wb") as out:
            left = n
            while left > 0:
                out.write(rng.randbytes(min(left, CHUNK)))
                left -= CHUNK
        size_bytes -= n
        index += 1


NGINX_CONF = """\
# Generated by bench/{script}: a minimal static file server.
daemon off;
master_process on;
worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
{http_extra}    server {{
        listen 127.0.0.1:{port};
{locations}    }}
}}
"""
# The gateway's URL layout: /ota/<file> from the cache's files folder.
FILES_LOCATION = """\
        location /ota/ {{
            alias {files}/;
        }}
"""


def _unprivileged():
    """If we are root, run nginx (master and workers) as nobody: no privilege is needed."""
    if os.geteuid() != 0:
        return None, None
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    return drop, nobody


def start_nginx(nginx: str, work: Path, locations: str, http_extra: str = "", tuned: bool = False) -> tuple[Proc, str]:
    """nginx in the foreground with its own config, prefix, pid and logs under work/nginx."""
    prefix = work / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    drop, nobody = _unprivileged()
    if nobody is not None:
        for path in (prefix, prefix / "tmp"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    for attempt in range(5):
        port = free_port()
        conf = prefix / "nginx.conf"
        text = NGINX_CONF.format(script=Path(sys.argv[0]).name, prefix=prefix, port=port,
                                 http_extra=http_extra, locations=locations)
        conf.write_text(text.replace(*TUNED) if tuned else text)
        proc = Proc([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                    work / "nginx.log", preexec=drop)
        url = f"http://127.0.0.1:{port}"

        def up():
            if proc.popen.poll() is not None:
                return "exited"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return "up"
            except OSError:
                return None
        state = wait_until(up, 20, "nginx to listen")
        if state == "up":
            return proc, url
        if "Address already in use" not in (prefix / "error.log").read_text(errors="replace"):
            break
    sys.exit(f"nginx did not start:\n{(prefix / 'error.log').read_text(errors='replace')[-3000:]}")


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Load:
    server: str
    clients: int
    seconds: float
    bytes_total: int
    complete: int  # clients that got 200 and the full size
    server_cpu: float
    client_cpu: float
    other_cpu: float  # CPU the machine spent on anything else meanwhile: softirq not charged to a process, other processes
    peak_rss_kib: int  # gateway only: VmHWM after the load, reset before it

    @property
    def mb_s(self) -> float:
        return self.bytes_total / MIB / self.seconds


def run_load(server: str, url: str, size: int, clients: int, timeout: int, pids: list[int],
             rss_pid: int | None) -> Load:
    """`clients` curl processes started together, each downloading url once; wall time to the last."""
    curl = ["curl", "-s", "-o", "/dev/null", "--max-time", str(timeout), "-w", CURL_FORMAT, url]
    # Each client is a shell that waits for a line on its stdin, then execs curl: spawning 32
    # processes from Python takes ~0.1 s, which stays out of the timed window this way.
    argv = ["sh", "-c", 'read _ && exec "$@"', "sh", *curl]
    if rss_pid is not None:
        reset_hwm(rss_pid)
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(clients):
            procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        cpu0, clients0, self0, busy0 = cpu_seconds(pids), children_cpu_seconds(), self_cpu_seconds(), busy_cpu_seconds()
        start = time.perf_counter()
        for p in procs:  # the start line: a few µs per client
            p.stdin.write(b"go\n")
            p.stdin.close()
        outputs = []
        for p in procs:  # each read ends when its curl exits: curl --max-time bounds it
            out = p.stdout.read()
            p.wait(timeout=30)
            outputs.append(out.decode(errors="replace").split())
        seconds = time.perf_counter() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    cpu, client_cpu = cpu_seconds(pids) - cpu0, children_cpu_seconds() - clients0
    other = max(0.0, busy_cpu_seconds() - busy0 - cpu - client_cpu - (self_cpu_seconds() - self0))
    peak = proc_status_kib(rss_pid, "VmHWM") if rss_pid is not None else 0
    total = complete = 0
    for fields in outputs:
        if len(fields) >= 2:
            got = int(float(fields[1]))
            total += got
            complete += fields[0] == "200" and got == size
    return Load(server, clients, seconds, total, complete, cpu, client_cpu, other, peak)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _describe(run: Load) -> str:
    extra = f", gateway peak RSS {run.peak_rss_kib / 1024:.1f} MiB" if run.peak_rss_kib else ""
    bad = "" if run.complete == run.clients else f"  INCOMPLETE: {run.clients - run.complete} of {run.clients}"
    return (f"{run.server:7s} {run.clients:3d} clients: {run.seconds:6.2f} s, {run.mb_s:7.0f} MiB/s, "
            f"CPU s: server {run.server_cpu:4.2f}, clients {run.client_cpu:4.2f}, other {run.other_cpu:4.2f}"
            f"{extra}{bad}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=256, help="artifact size in MiB (default 256)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent downloads (default 32)")
    parser.add_argument("--repeat", type=int, default=3, help="loads per server; the median is reported (default 3)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a single download may take (default 600)")
    parser.add_argument("--seed", type=int, default=20250101, help="seed for the generated app folder")
    parser.add_argument("--nginx-tuned", action="store_true",
                        help="diagnostic: nginx with tcp_nopush off and sendfile_max_chunk 0 instead of tcp_nopush on")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.repeat <= 0 or not 1 <= args.clients <= 256 or args.timeout <= 0:
        parser.error("--size-mb, --repeat and --timeout must be positive, --clients 1 to 256")

    release = _bin("otad-release")
    dashboard_cmd, gateway_cmd = _bin("otad-dashboard"), _bin("otad-gateway")
    _need("curl", "curl")
    nginx = _need("nginx", "nginx-light")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="otad-bench-gateway-", dir="/tmp"))
    work.chmod(0o755)  # nginx runs as nobody when we are root: it must reach the cached file
    env = dict(os.environ, COSIGN_PASSWORD="", PYTHONUNBUFFERED="1")
    env.pop("SOURCE_DATE_EPOCH", None)
    env.pop("NOTIFY_SOCKET", None)
    daemons: list[Proc] = []
    try:
        print(f"otad gateway serving benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{args.clients} clients, repeat {args.repeat}, median reported, work dir {work}")
        # A release of about --size-mb MiB, built and published with the real CLI.
        key = work / "bench"
        subprocess.run([release, "keygen", "--output-prefix", str(key)], env=env, check=True, stdout=subprocess.DEVNULL)
        t0 = time.perf_counter()
        make_app(work / "app", args.size_mb * MIB, args.seed)
        subprocess.run([release, "build", "--app-dir", str(work / "app"), "--version", "1.0.0",
                        "--key", str(key.with_suffix(".key")), "--out", str(work / "out")],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        ota = work / "ota"
        subprocess.run([release, "publish", "--from", str(work / "out"), "--to", str(ota)],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        shutil.rmtree(work / "app")
        manifest = json.loads((work / "out" / "manifest.json").read_text())
        shutil.rmtree(work / "out")
        size = manifest["size"]
        print(f"built and published {manifest['artifact']} ({size / MIB:.1f} MiB) in {time.perf_counter() - t0:.1f} s")

        (work / "dashboard.conf").write_text(
            f"LISTEN=127.0.0.1:0\nOTA_DIR={ota}\nSTATE_DIR={work / 'dashboard-state'}\n")
        dashboard = Proc([dashboard_cmd, "--config", str(work / "dashboard.conf")], work / "dashboard.log", env)
        daemons.append(dashboard)
        dashboard_url = dashboard.wait_listening()
        state = work / "gateway-state"
        (work / "gateway.conf").write_text(
            f"DASHBOARD_URL={dashboard_url}\nTRUSTED_KEYS={key.with_suffix('.pub')}\nLISTEN=127.0.0.1:0\n"
            f"STATE_DIR={state}\nPOLL_INTERVAL=1\nCONNECT_TIMEOUT=5\nREAD_TIMEOUT=30\nGATEWAY_ID=bench\n")
        gateway = Proc([gateway_cmd, "--config", str(work / "gateway.conf")], work / "gateway.log", env)
        daemons.append(gateway)
        gateway_url = gateway.wait_listening()
        t0 = time.perf_counter()

        def cached():
            if gateway.popen.poll() is not None:
                sys.exit(f"otad-gateway exited:\n{gateway.log.read_text()[-3000:]}")
            status, body = http_get(f"{gateway_url}/manifest")
            return status == 200 and json.loads(body).get("version") == manifest["version"]
        wait_until(cached, 300, "the gateway to cache and verify the release", interval=0.2)
        artifact = state / "cache" / "files" / manifest["artifact"]
        if not artifact.is_file() or artifact.stat().st_size != size:
            sys.exit(f"the gateway's cached artifact {artifact} is missing or has the wrong size")
        print(f"gateway cached and verified it in {time.perf_counter() - t0:.1f} s; "
              f"gateway RSS now {proc_status_kib(gateway.pid, 'VmRSS') / 1024:.1f} MiB, "
              f"peak since start (sync + verify) {proc_status_kib(gateway.pid, 'VmHWM') / 1024:.1f} MiB")

        nginx_proc, nginx_url = start_nginx(nginx, work, FILES_LOCATION.format(files=artifact.parent),
                                            tuned=args.nginx_tuned)
        daemons.append(nginx_proc)
        nginx_pids = [nginx_proc.pid, *children(nginx_proc.pid)]
        print(f"nginx {nginx_url} ({len(nginx_pids) - 1} workers{', as nobody' if os.geteuid() == 0 else ''}"
              f"{', tuned: tcp_nopush off, sendfile_max_chunk 0' if args.nginx_tuned else ''}) "
              f"serves the same file: {artifact}")
        urls = {"gateway": f"{gateway_url}/ota/{manifest['artifact']}", "nginx": f"{nginx_url}/ota/{manifest['artifact']}"}
        pids = {"gateway": [gateway.pid], "nginx": nginx_pids}

        def load(server: str, clients: int) -> Load:
            run = run_load(server, urls[server], size, clients, args.timeout, pids[server],
                           gateway.pid if server == "gateway" else None)
            print("  " + _describe(run))
            return run

        print("\nwarm-up and 1 client:")
        singles = {server: load(server, 1) for server in ("nginx", "gateway")}
        print(f"\n{args.clients} clients:")
        runs: dict[str, list[Load]] = {"gateway": [], "nginx": []}
        for i in range(args.repeat):
            # Alternate which goes first, so neither always gets the warmer machine.
            for server in (("gateway", "nginx") if i % 2 == 0 else ("nginx", "gateway")):
                runs[server].append(load(server, args.clients))
        gateway_rss_now = proc_status_kib(gateway.pid, "VmRSS") / 1024
        threads = proc_status_kib(gateway.pid, "Threads")

        print()
        med = {s: statistics.median(r.mb_s for r in runs[s]) for s in runs}
        med_s = {s: statistics.median(r.seconds for r in runs[s]) for s in runs}
        cpu = {s: statistics.median(r.server_cpu for r in runs[s]) for s in runs}
        gib = args.clients * size / (1 << 30)
        header = ("server", "clients", "GiB served", "wall s", "MiB/s", "server CPU s", "peak RSS MiB")
        rows = [header] + [
            (s, f"{args.clients}", f"{gib:.1f}", f"{med_s[s]:.2f}", f"{med[s]:.0f}", f"{cpu[s]:.2f}",
             f"{max(r.peak_rss_kib for r in runs[s]) / 1024:.1f}" if s == "gateway" else "-")
            for s in ("gateway", "nginx")
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for n, r in enumerate(rows):
            print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")
            if n == 0:
                print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")

        print()
        everything = [*singles.values(), *runs["gateway"], *runs["nginx"]]
        incomplete = sum(r.clients - r.complete for r in everything)
        print(f"{_verdict(incomplete == 0)}  every download complete (HTTP 200, {size} bytes): "
              f"{sum(r.complete for r in everything)} of {sum(r.clients for r in everything)}")
        ratio = med["gateway"] / med["nginx"]
        print(f"{_verdict(ratio >= RATIO_TARGET)}  throughput ratio gateway/nginx at {args.clients} clients: "
              f"{ratio:.2f} (target >= {RATIO_TARGET}); gateway {med['gateway']:.0f} MiB/s, nginx {med['nginx']:.0f} MiB/s")
        peak = max(r.peak_rss_kib for r in runs["gateway"]) / 1024
        single = singles["gateway"].peak_rss_kib / 1024
        print(f"{_verdict(peak < RSS_TARGET_MIB)}  gateway peak RSS during the load: {peak:.1f} MiB "
              f"(target < {RSS_TARGET_MIB:.0f} MiB); runs: "
              f"{' '.join(f'{r.peak_rss_kib / 1024:.1f}' for r in runs['gateway'])} MiB")
        print(f"{_verdict(peak - single <= RSS_FLAT_SLACK_MIB)}  gateway peak RSS flat in clients: "
              f"{single:.1f} MiB at 1, {peak:.1f} MiB at {args.clients} ({peak - single:+.1f} MiB, allowed "
              f"+{RSS_FLAT_SLACK_MIB:.0f}); after the load: RSS {gateway_rss_now:.1f} MiB, {threads} threads")
        print(f"      (server CPU per GiB: gateway {cpu['gateway'] / gib:.2f} s, nginx {cpu['nginx'] / gib:.2f} s; "
              f"the curl clients share the same {os.cpu_count()} CPUs)")
        available = sum(r.seconds for r in everything) * (os.cpu_count() or 1)
        other = sum(r.other_cpu for r in everything)
        busy = other > NOISE_SHARE * available
        print(f"      (CPU outside the server, the clients and this script: {other:.1f} of the {available:.1f} CPU s of the loads, "
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
