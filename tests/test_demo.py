"""`make demo` (python -m otad.demo): the whole story with the real daemons, and a clean stop.

The demo is run as a user runs it, as a subprocess in its own session (as a
terminal's foreground job). Every process it starts inherits a tag in its
environment; after the demo exits, /proc must hold no process with that tag.
With DEMO_KEEP=1 its folder stays (under tmp_path, via TMPDIR), and the test
checks the story against the state the daemons themselves left there.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from harness import wait_until

ROBOTS = ("robot-1", "robot-2", "robot-3")
TAG = "OTAD_DEMO_TEST_TAG"


def demo_env(tmp_path: Path, tag: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    return {**env, TAG: tag, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1", **extra}


def tagged_processes(tag: str) -> list[str]:
    """Command lines of every live process whose environment carries the tag."""
    marker = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie is already dead, waiting for its parent to reap it
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def start_demo(tmp_path: Path, tag: str, **extra: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "demo.out"
    with open(out, "wb") as stream:
        proc = subprocess.Popen([sys.executable, "-m", "otad.demo"], stdin=subprocess.DEVNULL, stdout=stream,
                                stderr=subprocess.STDOUT, env=demo_env(tmp_path, tag, **extra), start_new_session=True)
    return proc, out


def wait_for_line(proc: subprocess.Popen, out: Path, text: str, timeout: float) -> str:
    def seen():
        output = out.read_text(errors="replace")
        if text in output:
            return output
        assert proc.poll() is None, f"demo exited with {proc.returncode} before printing {text!r}:\n{output[-3000:]}"
        return None

    return wait_until(seen, timeout, f"the demo to print {text!r}", interval=0.2)


def records_at(url: str) -> int:
    """How many telemetry records the dashboard holds, from its /status.json."""
    doc = requests.get(f"{url}/status.json", timeout=10).json()
    return sum(robot["records"] for robot in doc["robots"])


def count_rows(db: Path, query: str, *args: object) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(query, args).fetchone()[0] or 0
    finally:
        conn.close()


def dashboard_rows(work: Path) -> list[tuple[str, int, str, str]]:
    conn = sqlite3.connect(f"file:{work / 'dashboard' / 'telemetry.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT robot_id, seq, type, body FROM records WHERE type != 'gap' ORDER BY id").fetchall()
    finally:
        conn.close()


@pytest.mark.slow
def test_demo_once_tells_the_whole_story_and_exits_0(tmp_path):
    tag = uuid.uuid4().hex
    result = subprocess.run([sys.executable, "-m", "otad.demo"], capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env=demo_env(tmp_path, tag, DEMO_ONCE="1", DEMO_KEEP="1"))
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr
    assert re.search(r"fleet status page: http://127\.0\.0\.1:\d+/status", out)
    for version in ("1.0.0", "1.1.0"):
        assert f"dashboard: 3 robots on {version}" in out
        assert re.search(rf"downloading {re.escape(version)}\s+\d+%", out), f"no download progress for {version}"
    for robot in ROBOTS:
        assert f"{robot}: rolled back 1.2.0 -> 1.1.0: self-test failed (exit 1): arm calibration failed" in out
        assert f"{robot}: blacklisted 1.2.0; it stays on 1.1.0" in out
        assert f"{robot}: running 1.1.0, blacklist: 1.2.0" in out
    backlog = [int(n) for n in re.findall(r"WAN DOWN, telemetry backlog (\d+)", out)]
    assert len(backlog) >= 3 and backlog[-1] > backlog[0], f"the backlog did not grow while the WAN was down: {backlog}"
    buffered = int(re.search(r"buffering: the gateway holds (\d+) telemetry records", out)[1])
    arrived = int(re.search(r"flushed: \d+ buffered records reached the dashboard in [\d.]+s \((\d+) new records there", out)[1])
    assert buffered >= 5 and arrived >= buffered
    assert "demo: OK" in out and "FAILED" not in out
    assert re.search(r"demo: stopped 8 processes\n", out), out[-1000:]
    assert tagged_processes(tag) == []

    # What the daemons left on disk says the same.
    work = Path(re.search(r"demo: kept (\S+)", out)[1])
    assert work.parent == tmp_path
    for robot in ROBOTS:
        state = json.loads((work / robot / "state" / "state.json").read_text())
        assert (state["phase"], state["committed"], state["blacklist"]) == ("idle", "1.1.0", ["1.2.0"])
        assert os.readlink(work / robot / "app" / "CURRENT") == "releases/1.1.0"
    rows = dashboard_rows(work)
    events = {(r[0], json.loads(r[3])["event"], json.loads(r[3])["version"]) for r in rows if r[2] == "event"}
    for robot in ROBOTS:
        assert {(robot, "installed", "1.0.0"), (robot, "installed", "1.1.0"), (robot, "rolled_back", "1.2.0"),
                (robot, "blacklisted", "1.2.0")} <= events
        seqs = [r[1] for r in rows if r[0] == robot]
        # The outage lost, duplicated and reordered nothing: seqs rise (they start at the boot
        # clock, so they are not 1, 2, 3...), and every record the agent numbered is at the
        # dashboard, or still waiting in the agent's spool or the gateway's buffer at the stop.
        assert seqs == sorted(set(seqs)), f"{robot}: {seqs}"
        issued = count_rows(work / robot / "agent" / "spool.db", "SELECT sum(issued) FROM counters")
        waiting = count_rows(work / robot / "agent" / "spool.db", "SELECT count(*) FROM records") + count_rows(
            work / "site-gw" / "telemetry.db", "SELECT count(*) FROM records WHERE robot_id = ?", robot)
        assert len(seqs) + waiting == issued, (robot, len(seqs), waiting, issued)


@pytest.mark.slow
def test_ctrl_c_stops_the_running_fleet_and_leaves_no_process(tmp_path):
    tag = uuid.uuid4().hex
    proc, out = start_demo(tmp_path, tag)
    try:
        output = wait_for_line(proc, out, "fleet running until Ctrl-C:", 240)
        assert len(tagged_processes(tag)) >= 9  # the demo, 8 daemons, maybe a health check of theirs
        # Let the fleet run a while first, as a user exploring it would: long enough for a
        # daemon to block if the demo stopped reading its notify socket (10 datagrams queue).
        url = re.search(r"fleet status page: (http://\S+)/status", output)[1]
        start = records_at(url)
        wait_until(lambda: records_at(url) >= start + 45, 60, "15 s worth of telemetry from the running fleet", interval=0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = out.read_text()
    assert "demo: SIGINT received, stopping the fleet" in output
    assert "demo: stopped 8 processes\n" in output, output[-1000:]  # each stopped by SIGTERM, none needed SIGKILL
    assert tagged_processes(tag) == []
    assert not list(tmp_path.glob("otad-demo-*")), "the demo's temporary folder was left behind"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_the_demo_mid_story_leaves_no_process(tmp_path, sig):
    tag = uuid.uuid4().hex
    proc, out = start_demo(tmp_path, tag, DEMO_ONCE="1")
    try:
        wait_for_line(proc, out, "every robot runs 1.0.0", 120)
        proc.send_signal(sig)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if sig == signal.SIGTERM:
        assert code == 130, out.read_text()[-2000:]
        assert tagged_processes(tag) == []
    else:
        # The demo had no say: the kernel's parent-death signal takes its daemons down.
        wait_until(lambda: tagged_processes(tag) == [], 15, "the daemons of a kill -9'd demo to die")


def test_the_demo_keeps_reading_a_notify_socket_so_no_daemon_blocks(tmp_path):
    """Linux queues 10 datagrams on a unix socket (net.unix.max_dgram_qlen); a reader that
    stops reading makes the daemon's next sd_notify block its main loop, and it can no
    longer stop on SIGTERM. The demo's stand-in for systemd must read all the time."""
    import socket

    from otad.demo.procs import StatusSocket

    listener = StatusSocket("gateway")
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.settimeout(5)  # blocking, as sdnotify is; a timeout here is the daemon hanging
    try:
        for step in range(200):
            sender.sendto(f"STATUS=telemetry: {step} pending".encode(), listener.address)
        wait_until(lambda: listener.poll() == "telemetry: 199 pending", 10, "the last STATUS= to be read")
    finally:
        sender.close()
        listener.close()
