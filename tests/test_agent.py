"""The telemetry agent as a real `telemetry-agent` process against a fake gateway.

`FakeGateway` stands in for the real gateway: it implements exactly the
POST /metrics contract (bearer token, one record or {"records": [...]},
200 {"accepted", "duplicates"} after storing, dedup by (robot_id, boot_id,
seq), 400/413 from the shared validator, 401, 403) and records what it
receives; it can be told to refuse (close the socket), answer 500, or stall
(store, then never answer). The end-to-end tests through the real gateway and
dashboard are in test_telemetry.py.
"""
from __future__ import annotations

import json
import logging
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from notify import NotifySocket
from harness import Daemon, run_command, wait_until, write_config
from otad.agent.spool import Spool, boot_clock_us
from otad.robot.outbox import Outbox
from otad.telemetry.records import RecordError, parse_batch, validate_record
from otad.telemetry.tokens import bearer

TOKEN = "agent-token-0123456789abcdef"
ROBOT = "r1"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


class FakeGateway:
    """The gateway's POST /metrics contract, in memory; `mode` is ok | refuse | error500 | stall."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay = 0.0  # seconds between storing and answering: the window in which an ack gets lost
        self.reject_details: set[str] = set()  # events answered 400, as if the validator disliked them
        self.stored: dict[tuple, dict] = {}
        self.arrivals: list[dict] = []  # stored records in the order they were stored
        self.duplicates = 0
        self.answers: Counter = Counter()  # outcome -> count
        self.lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                gateway.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, req: BaseHTTPRequestHandler, status: int, doc: dict, outcome: str) -> None:
        body = json.dumps(doc).encode()
        try:
            req.send_response(status)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
        except OSError:
            return  # the agent was killed while we answered
        with self.lock:
            self.answers[outcome] += 1

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        if mode == "refuse":
            with self.lock:
                self.answers["refused"] += 1
            req.close_connection = True
            return  # the socket closes with no answer
        body = req.rfile.read(int(req.headers.get("Content-Length", 0)))
        if mode == "error500":
            return self._answer(req, 500, {"error": "database is locked"}, "500")
        if req.path != "/metrics":
            return self._answer(req, 404, {"error": "not found"}, "404")
        if bearer(req.headers.get("Authorization")) != TOKEN:
            return self._answer(req, 401, {"error": "missing or wrong token"}, "401")
        try:
            records = parse_batch(body)
        except RecordError as exc:
            return self._answer(req, exc.status, {"error": str(exc)}, str(exc.status))
        if any(r["robot_id"] != ROBOT for r in records):
            return self._answer(req, 403, {"error": "robot_id is not the token's robot"}, "403")
        bad = [i for i, r in enumerate(records) if r.get("detail") in self.reject_details]
        if bad:
            return self._answer(req, 400, {"error": f"record {bad[0]}: field 'cpu' is invalid"}, "400")
        accepted = duplicates = 0
        with self.lock:
            for record in records:
                key = (record["robot_id"], record["boot_id"], record["seq"])
                if key in self.stored:
                    duplicates += 1
                else:
                    self.stored[key] = record
                    self.arrivals.append(record)
                    accepted += 1
            self.duplicates += duplicates
        time.sleep(self.delay)
        if mode == "stall":  # stored, but the 200 never comes: the agent must retry, we must dedup
            with self.lock:
                self.answers["stalled"] += 1
            time.sleep(3)
            req.close_connection = True
            return
        self._answer(req, 200, {"accepted": accepted, "duplicates": duplicates}, "200")

    # -- views for the tests -------------------------------------------------------
    def records(self, kind: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.arrivals if kind is None or r["type"] == kind]

    def seqs(self) -> list[int]:
        return [r["seq"] for r in self.records()]


@pytest.fixture
def gateway():
    fake = FakeGateway()
    yield fake
    fake.close()


@pytest.fixture
def agents():
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill9()


def make_agent(tmp_path: Path, gateway: FakeGateway, agents: list, env: dict | None = None, **overrides) -> Daemon:
    token_file = tmp_path / "agent.token"
    if not token_file.exists():
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
    values = {
        "GATEWAY_URL": gateway.url,
        "ROBOT_ID": ROBOT,
        "INTERVAL": 1,
        "APP_DIR": tmp_path / "app",
        "TOKEN_FILE": token_file,
        "STATE_DIR": tmp_path / "agent-state",
        "ROBOT_STATE_DIR": tmp_path / "robot-state",
        "BACKOFF_MAX": 1,
        "CONNECT_TIMEOUT": 1,
        "READ_TIMEOUT": 1,
        **overrides,
    }
    config = write_config(tmp_path / "telemetry-agent.conf", values)
    daemon = Daemon("telemetry-agent", config, tmp_path / "agent.log", env=env)
    agents.append(daemon)
    return daemon


def start(daemon: Daemon) -> Daemon:
    daemon.start(wait_listening=False)
    daemon.wait_for_log(r"telemetry-agent \S+ ready")
    return daemon


def spool_records(path: Path) -> list[dict]:
    """What waits in the agent's spool, read beside the running agent (WAL allows it)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return [json.loads(body) for (body,) in db.execute("SELECT body FROM records ORDER BY id")]
    except sqlite3.OperationalError:
        return []  # the schema is not there yet
    finally:
        db.close()


def spool_check(path: Path) -> tuple[str, int]:
    """(PRAGMA integrity_check, how many seq numbers were handed out) of a spool no agent is using."""
    db = sqlite3.connect(path, timeout=10)
    try:
        result = db.execute("PRAGMA integrity_check").fetchone()[0]
        # A kill before the agent created its tables leaves an empty database: nothing handed out.
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'counters'").fetchone():
            return result, 0
        issued = db.execute("SELECT sum(issued) FROM counters").fetchone()[0] or 0
        return result, issued
    finally:
        db.close()


def issued(path: Path) -> int:
    """How many seq numbers the spool has handed out, read beside the running agent."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT sum(issued) FROM counters").fetchone()[0] or 0
    finally:
        db.close()


def strictly_increasing(seqs: list[int]) -> bool:
    """seq only grows (it starts above the boot clock, so it does not start at 1)."""
    return all(a < b for a, b in zip(seqs, seqs[1:]))


def config_values(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def make_current(app: Path, version: str) -> None:
    (app / "releases" / version).mkdir(parents=True, exist_ok=True)
    link = app / "CURRENT.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(f"releases/{version}")
    link.replace(app / "CURRENT")


def test_metrics_carry_every_field_and_readiness_follows_the_spool(tmp_path, gateway, agents):
    make_current(tmp_path / "app", "1.2.3")
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        agent = start(make_agent(tmp_path, gateway, agents, env={"NOTIFY_SOCKET": notify.path}, HEALTH_CMD="exit 1"))
        assert any("READY=1" in m for m in notify.drain())
        assert (tmp_path / "agent-state" / "spool.db").exists()
        wait_until(lambda: len(gateway.records("metric")) >= 3, 15, "three metrics at the gateway")
        make_current(tmp_path / "app", "1.2.4")
        wait_until(lambda: gateway.records("metric")[-1]["version"] == "1.2.4", 15, "a metric naming the new CURRENT")
        wait_until(lambda: any("STATUS=sent" in m and "0 waiting" in m for m in notify.drain()), 10, "STATUS=")
        assert agent.stop() == 0
    finally:
        notify.close()
    metrics = gateway.records("metric")
    for record in metrics:
        assert validate_record(record) == record
        assert (record["robot_id"], record["boot_id"], record["health"]) == (ROBOT, BOOT_ID, "degraded")
        assert 0 <= record["cpu"] <= 100 and 0 < record["mem"] < 100
    assert metrics[0]["version"] == "1.2.3"
    assert strictly_increasing(gateway.seqs())
    assert [r["ts"] for r in metrics] == sorted(r["ts"] for r in metrics)


def test_outage_refused_500_and_stall_then_everything_arrives_once_in_order(tmp_path, gateway, agents):
    spool = tmp_path / "agent-state" / "spool.db"
    gateway.mode = "refuse"
    agent = start(make_agent(tmp_path, gateway, agents))
    wait_until(lambda: len(spool_records(spool)) >= 3 and gateway.answers["refused"] >= 2, 15, "records spooled while refused")
    gateway.mode = "error500"
    wait_until(lambda: gateway.answers["500"] >= 2, 15, "500s retried")
    gateway.mode = "stall"
    wait_until(lambda: gateway.answers["stalled"] >= 2, 15, "a stalled gateway retried")
    assert gateway.answers["200"] == 0
    gateway.mode = "ok"
    wait_until(lambda: gateway.answers["200"] >= 1 and not spool_records(spool), 15, "the backlog to drain")
    seqs = gateway.seqs()
    assert len(seqs) >= 5
    # none missing, none stored twice, in seq order
    assert strictly_increasing(seqs) and len(seqs) == issued(spool)
    assert gateway.duplicates >= 1  # the stalled batch was sent again and acknowledged as a duplicate
    # One line per change of problem, however many retries each phase saw. The last is
    # written after the spool drained: wait for it, do not read the log at once.
    log = agent.wait_for_count("gateway accepts records again")
    for problem in ("unreachable (ConnectionError)", "gateway answers HTTP 500", "unreachable (ReadTimeout)"):
        assert log.count(problem) == 1, log
    assert log.count("gateway accepts records again") == 1, log


def test_outbox_events_are_delivered_exactly_once_and_the_files_removed(tmp_path, gateway, agents):
    outbox = Outbox(tmp_path / "robot-state")
    outbox.add("installed", "1.2.3")
    outbox.add("rolled_back", "1.2.4", "selftest: exit 1")
    outbox.add("rejected", None, "bad signature")
    start(make_agent(tmp_path, gateway, agents))
    wait_until(lambda: len(gateway.records("event")) == 3, 15, "three events")
    # The agent removes an outbox file after its spool commit, which may land just after the send.
    wait_until(lambda: not list(outbox.dir.glob("*.json")), 10, "the first outbox files removed")
    # The outbox is empty, so Outbox.add starts again at seq 1: still new events.
    outbox.add("installed", "1.2.5")
    outbox.add("blacklisted", "1.2.4", "3 failed attempts")
    wait_until(lambda: len(gateway.records("event")) == 5, 15, "two more events")
    wait_until(lambda: not list(outbox.dir.glob("*.json")), 10, "the outbox files removed")
    events = [(r["event"], r["version"], r["detail"]) for r in gateway.records("event")]
    assert events == [
        ("installed", "1.2.3", ""), ("rolled_back", "1.2.4", "selftest: exit 1"), ("rejected", "", "bad signature"),
        ("installed", "1.2.5", ""), ("blacklisted", "1.2.4", "3 failed attempts"),
    ]
    for record in gateway.records():
        assert validate_record(record) == record and record["boot_id"] == BOOT_ID
    # one counter for metrics and events
    assert strictly_increasing(gateway.seqs()) and len(gateway.seqs()) == issued(tmp_path / "agent-state" / "spool.db")


def test_outbox_drain_interrupted_before_the_file_removal_does_not_duplicate(tmp_path, monkeypatch):
    outbox = Outbox(tmp_path / "robot-state")
    outbox.add("installed", "1.0.0")
    outbox.add("rolled_back", "1.0.1", "boom")

    class Crash(Exception):
        pass

    def crash(seq: int) -> None:
        raise Crash  # the process dies after the spool committed, before any file went

    spool = Spool(tmp_path / "spool.db", 1 << 20)
    monkeypatch.setattr(outbox, "remove", crash)
    with pytest.raises(Crash):
        spool.drain_outbox(outbox, ROBOT, BOOT_ID)
    spool.close()
    monkeypatch.undo()
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    assert spool.drain_outbox(outbox, ROBOT, BOOT_ID) == 0
    assert outbox.pending() == []
    rows = spool.batch(100, 1 << 20)
    assert [json.loads(body)["event"] for _, body in rows] == ["installed", "rolled_back"]
    spool.close()


def test_outbox_drain_interrupted_after_the_file_removal_keeps_no_key_forever(tmp_path, monkeypatch):
    """A power cut after the removal of the drained event files was durable, before the keys' delete committed.

    The keys stayed in the spool's `drained` table for good: the next drain only forgets keys
    of files it sees, and these files were gone (found by tests/powercut_agent.py, which
    checks the table is empty once the outbox is). The cut is simulated by an exception
    right after the directory fsync that makes the removal durable: a process-level test,
    because the window is a few milliseconds wide for a real cut.
    """
    import otad.agent.spool as spool_module

    outbox = Outbox(tmp_path / "robot-state")
    outbox.add("installed", "1.0.0")
    outbox.add("rolled_back", "1.0.1", "boom")

    class Crash(Exception):
        pass

    def fsync_then_die(directory) -> None:
        real_fsync_dir(directory)
        raise Crash

    real_fsync_dir = spool_module.fsync_dir
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    monkeypatch.setattr(spool_module, "fsync_dir", fsync_then_die)
    with pytest.raises(Crash):
        spool.drain_outbox(outbox, ROBOT, BOOT_ID)
    spool.close()
    monkeypatch.undo()
    assert outbox.pending() == []
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    assert spool.drain_outbox(outbox, ROBOT, BOOT_ID) == 0  # an empty outbox: the keys go all the same
    assert spool._db.execute("SELECT count(*) FROM drained").fetchone()[0] == 0
    outbox.add("installed", "1.0.2")
    assert spool.drain_outbox(outbox, ROBOT, BOOT_ID) == 1
    spool.close()
    db = sqlite3.connect(tmp_path / "spool.db")
    try:
        assert db.execute("SELECT count(*) FROM drained").fetchone()[0] == 0
        events = [json.loads(body)["version"] for (body,) in db.execute("SELECT body FROM records ORDER BY id")]
    finally:
        db.close()
    assert events == ["1.0.0", "1.0.1", "1.0.2"]


def test_a_damaged_spool_is_set_aside_and_numbering_goes_on_above_it(tmp_path, caplog):
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not an SQLite database" * 200)
    floor = boot_clock_us()
    with caplog.at_level(logging.ERROR, logger="otad.agent"):
        spool = Spool(path, 1 << 20)
    assert any("damaged" in r.message for r in caplog.records)
    assert len(list(tmp_path.glob("spool.db.corrupt-*"))) == 1
    # seq numbers of this boot may have been handed out from the lost counter: go on above any of them
    seq = spool.add({"robot_id": ROBOT, "boot_id": BOOT_ID, "ts": "2026-05-09T10:00:00Z", "type": "metric",
                     "cpu": 1, "mem": 2, "version": "", "health": "ok"})
    assert seq >= floor
    spool.close()


def test_kill9_in_a_loop_loses_and_duplicates_nothing(tmp_path, gateway, agents):
    rng = random.Random(5)
    spool = tmp_path / "agent-state" / "spool.db"
    outbox = Outbox(tmp_path / "robot-state")
    details = [f"event {i}" for i in range(150)]
    for detail in details[:120]:
        outbox.add("installed", "1.0.0", detail)
    gateway.delay = 0.03
    agent = make_agent(tmp_path, gateway, agents, BATCH=7)
    cycles = 25
    mid_send = 0
    for cycle in range(cycles):
        answered = gateway.answers["200"]
        agent.start(wait_listening=False)
        # The kill lands at a random moment: in most cycles once the agent is sending (every
        # start samples, so a 200 always comes), in the others wherever start-up has got to.
        # Waiting for the 200 first, not guessing a time, keeps a loaded machine from turning
        # every kill into one before the first send.
        if rng.random() < 0.7:
            wait_until(lambda: gateway.answers["200"] > answered, 30, f"cycle {cycle}: the agent to send")
            mid_send += 1
            time.sleep(rng.uniform(0, 0.3))
        else:
            time.sleep(rng.uniform(0.05, 1.0))
        agent.kill9()
        if spool.exists():
            assert spool_check(spool)[0] == "ok", f"cycle {cycle}"
        if cycle % 5 == 0:
            for detail in details[120 + cycle // 5 * 6:][:6]:
                outbox.add("installed", "1.0.0", detail)
    # The last run samples once, at start: a sample taken after the spool drained
    # and before the stop would wait in the spool, not at the gateway.
    write_config(agent.config, {**config_values(agent.config), "INTERVAL": 3600})
    start(agent)
    wait_until(lambda: not spool_records(spool) and not outbox.pending(), 30, "spool and outbox to drain")
    assert agent.stop() == 0
    integrity, handed_out = spool_check(spool)
    assert integrity == "ok"
    seqs = gateway.seqs()
    extra = [s for s, n in Counter(seqs).items() if n > 1]
    assert strictly_increasing(seqs) and not extra and len(seqs) == handed_out, (len(seqs), handed_out, extra)
    assert Counter(r["detail"] for r in gateway.records("event")) == Counter(details)
    print(f"{cycles} kills ({mid_send} while sending), {len(seqs)} records, {gateway.duplicates} retried duplicates acknowledged")


def test_spool_bound_drops_oldest_metrics_never_events(tmp_path, caplog):
    # Driven directly, at the smallest bound SPOOL_MAX_MB allows (1 MiB): through the
    # process, filling it at INTERVAL=1 would take well over an hour of samples.
    bound = 1024 * 1024
    path = tmp_path / "spool.db"
    spool = Spool(path, bound)
    outbox = Outbox(tmp_path / "robot-state")
    metric = {"robot_id": ROBOT, "boot_id": BOOT_ID, "ts": "2026-05-09T10:00:00.000Z", "type": "metric",
              "cpu": 12.5, "mem": 40.0, "version": "1.2.3", "health": "ok"}
    largest = 0
    with caplog.at_level(logging.WARNING, logger="otad.agent"):
        for i in range(9000):
            spool.add(metric)
            if i % 300 == 0:
                outbox.add("rolled_back", "1.2.3", f"event {i // 300} " + "x" * 400)
                spool.drain_outbox(outbox, ROBOT, BOOT_ID)
            if i % 10 == 0:
                largest = max(largest, sum(p.stat().st_size for p in tmp_path.glob("spool.db*")))
    rows = [json.loads(body) for _, body in spool.batch(10_000, 1 << 30)]
    spool.close()
    assert largest <= bound * 1.1, largest  # the database and its WAL
    reports = [r for r in rows if r["type"] == "dropped"]
    assert spool.dropped > 0 and len(rows) - len(reports) == 9030 - spool.dropped
    assert sum(r["dropped"] for r in reports) == spool.dropped  # each loss is a record the dashboard counts
    assert [r["detail"].split(" x")[0] for r in rows if r["type"] == "event"] == [f"event {i}" for i in range(30)]
    assert strictly_increasing([r["seq"] for r in rows])
    drops = [r.message for r in caplog.records if "dropped the" in r.message]
    assert 0 < len(drops) <= 10, drops  # trimmed in chunks, not a line per record
    assert sum(int(m.split("dropped the ")[1].split()[0]) for m in drops) == spool.dropped


def test_the_spool_bound_never_drops_a_batch_being_sent(tmp_path):
    """Issue 13 item 7, counted exactly. Driven through the real module (the process would
    need an hour of samples to fill 1 MiB). Before: the bound dropped the oldest rows while
    the sender had them in a POST, so the gateway got them and the drop report counted them too."""
    spool = Spool(tmp_path / "spool.db", 1024 * 1024)
    metric = {"robot_id": ROBOT, "boot_id": BOOT_ID, "ts": "2026-05-09T10:00:00.000Z", "type": "metric",
              "cpu": 12.5, "mem": 40.0, "version": "1.2.3", "health": "ok"}
    for _ in range(50):
        spool.add(metric)
    in_flight = [row_id for row_id, _ in spool.batch(50, 1 << 20)]
    made = 50
    while spool.dropped == 0:
        spool.add(metric)
        made += 1
    rows = spool.batch(100_000, 1 << 30)
    spool.close()
    left = {row_id for row_id, _ in rows}
    assert set(in_flight) <= left, "rows of the batch being sent were dropped"
    metrics_left = sum(1 for _, body in rows if json.loads(body)["type"] == "metric")
    assert metrics_left + spool.dropped == made


def test_401_is_logged_once_then_a_fixed_token_file_is_picked_up(tmp_path, gateway, agents):
    token_file = tmp_path / "agent.token"
    token_file.write_text("wrong-token-0123456789abcdef\n")
    token_file.chmod(0o600)
    agent = start(make_agent(tmp_path, gateway, agents))
    began = time.monotonic()
    wait_until(lambda: gateway.answers["401"] >= 4, 20, "four attempts answered 401")
    attempts, elapsed = gateway.answers["401"], time.monotonic() - began
    assert attempts <= elapsed / 0.5 + 2, (attempts, elapsed)  # backed off, not a tight loop
    assert agent.wait_for_count("HTTP 401").count("HTTP 401") == 1, agent.new_log()  # logged after the answer
    token_file.write_text(TOKEN + "\n")
    wait_until(lambda: gateway.records(), 15, "records once the token is right")
    agent.wait_for_log("gateway accepts records again", 10)
    assert agent.new_log().count("HTTP 401") == 1


def test_403_then_a_reload_with_the_right_robot_id_drops_only_the_foreign_records(tmp_path, gateway, agents):
    agent = start(make_agent(tmp_path, gateway, agents, ROBOT_ID="r2"))
    wait_until(lambda: gateway.answers["403"] >= 2, 15, "records of r2 refused")
    write_config(agent.config, {**config_values(agent.config), "ROBOT_ID": ROBOT})
    agent.signal(signal.SIGHUP)
    wait_until(lambda: len(gateway.records()) >= 2, 15, "records of r1 after the reload")
    assert {r["robot_id"] for r in gateway.records()} == {ROBOT}
    assert strictly_increasing(gateway.seqs())
    log = agent.wait_for_count("reloaded config")  # written after the settings were applied, maybe after a send
    assert log.count("HTTP 403") == 1 and log.count("records of another robot id") == 1, log


def test_a_refused_record_is_dropped_alone_and_the_spool_goes_on(tmp_path, gateway, agents):
    outbox = Outbox(tmp_path / "robot-state")
    for i in range(5):
        outbox.add("installed", "1.0.0", f"event {i}")
    gateway.reject_details = {"event 2"}
    agent = start(make_agent(tmp_path, gateway, agents))
    wait_until(lambda: len(gateway.records("event")) >= 4, 15, "the records around the refused one")
    assert [r["detail"] for r in gateway.records("event")][:4] == ["event 0", "event 1", "event 3", "event 4"]
    # The loss is reported, not only logged: a `dropped` record the dashboard counts for the robot.
    wait_until(lambda: gateway.records("dropped"), 15, "the refused record reported as dropped")
    assert [(r["robot_id"], r["dropped"]) for r in gateway.records("dropped")] == [(ROBOT, 1)]
    log = agent.new_log()
    assert log.count("gateway refused a batch") == 1 and log.count("dropping it") == 1, log


@pytest.mark.parametrize("key,value", [("INTERVAL", "0"), ("GATEWAY_URL", "ftp://x"), ("TOKEN_FILE", "/nonexistent/token")])
def test_bad_config_exits_1_with_one_line_naming_the_problem(tmp_path, gateway, agents, key, value):
    agent = make_agent(tmp_path, gateway, agents, **{key: value})
    result = run_command("telemetry-agent", "--config", str(agent.config), timeout=30)
    assert_one_line_error(result, key if key != "TOKEN_FILE" else value)
