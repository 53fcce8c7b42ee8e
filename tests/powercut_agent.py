"""Power cuts under telemetry-agent: its STATE_DIR (the SQLite spool) and the robot's outbox on the layer.

The agent's STATE_DIR and the ROBOT_STATE_DIR whose outbox/*.json it drains are on the
power-loss layer (tests/lazyfs.py); the site's real gateway and dashboard run on the
normal file system. Update events are written into the outbox by a small process that
calls otad-robot's own module (otad.robot.outbox.Outbox.add), as otad-robot does; it
runs with its cwd on the mount, so the cut kills it like every other process there.
The gateway is stopped for stretches (the spool fills) and started again (it drains).

Each cut lands either a few milliseconds after the gateway stored a batch of the agent
(the 200 is on its way, or the spool's delete is not yet durable) or at a random moment
(sampling, spooling, draining the outbox, sending, backing off); in some boots it lands
while the agent starts (opening the spool, SQLite recovering its WAL). After every cut, on the
spool as the cut left it (a copy, opened the way the restarted agent opens it) and again
on the live spool after the agent's restart:

- the spool is a sound database (a damaged one would be set aside: its records lost);
- every record it holds that the gateway or dashboard also hold is the very same record
  (a resend that dedupes), never a different record under the same (robot, boot, seq);
  no (robot, boot, seq) is ever seen with two contents, in any spool or upstream;
- its counter (`last_seq`, `issued`) never moves backwards, and `last_seq` is never
  below a seq the gateway acknowledged: a commit the agent sent was durable
  (synchronous=FULL), so a seq can never be handed out again;
- the dashboard never answered 409 record_differs, the gateway quarantined nothing and
  refused no seq as gone backwards;
- at the end, without cuts: every event the writer finished adding is at the dashboard
  exactly once (none twice, whether or not its add finished), every record the agent
  numbered (`issued`, summed over the boots) is at the dashboard exactly once, and with
  the outbox empty the spool keeps no key of a drained event.

A power cut reboots the robot, so each restart after a cut is the first of a new boot:
the agent runs in its own time namespace, whose CLOCK_BOOTTIME (the floor of every seq,
otad/agent/spool.py) starts a few seconds before, with a new boot id bind-mounted over
/proc/sys/kernel/random/boot_id (`unshare`, root). Each boot's records are keyed apart,
and within a boot its counter is what keeps seq from repeating: the loop checks it
against what the gateway acknowledged (the boot clock floor would hide a lost counter
only because the clock moved on). POWER_SAME_BOOT=1 keeps the machine's own boot id and
clock instead (what this test machine really does across a cut of the layer): one
(robot, boot) key space across all cuts, the counter tested as one long sequence.
A synchronous=NORMAL spool fails this loop within a few cuts (the counter on disk falls
below a seq the gateway acknowledged), so it does test the synchronous=FULL claim.

Run: `python tests/powercut_agent.py` (POWER_CUTS, POWER_SEED, POWER_SECONDS);
tests/test_powercut_agent.py runs a short one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fleet import dashboard_records, write_tokens  # noqa: E402
from harness import wait_until, write_config  # noqa: E402
from powerloop import PowerLayer, Report, soak_main  # noqa: E402
from otad.agent.spool import event_key  # noqa: E402
from otad.fsutil import fsync_dir  # noqa: E402

ROBOT = "robot"
WRITER = """
import random, sys, time
from pathlib import Path
from otad.robot.outbox import Outbox
robot_state, first, count, log, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rng, outbox = random.Random(seed), Outbox(Path(robot_state))
for n in range(first, first + count):
    outbox.add("installed", "1.0.0", f"event {n}")
    with open(log, "a") as done:  # written once add() returned: the event is durable
        done.write(f"{n}\\n")
    time.sleep(rng.uniform(0.05, 0.6))
"""


def read_spool(path: Path, live: bool = False) -> dict | None:
    """Records, counters and drained keys of a spool; None if it has no tables yet.

    `live`: beside the running agent, read-only (WAL lets it); else a copy the agent is not
    using, opened read-write as the agent opens it, so SQLite recovers its WAL first.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) if live else sqlite3.connect(path, timeout=30)
    try:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'counters'").fetchone():
            return None
        return {
            "integrity": integrity,
            "records": [json.loads(body) for (body,) in db.execute("SELECT body FROM records ORDER BY id")],
            "counters": {(r, b): (last, issued) for r, b, last, issued in
                         db.execute("SELECT robot_id, boot_id, last_seq, issued FROM counters")},
            "drained": {key for (key,) in db.execute("SELECT key FROM drained")},
        }
    finally:
        db.close()


def read_only(path: Path, query: str) -> list[tuple]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(query).fetchall()
    except sqlite3.OperationalError:
        return []  # no tables yet
    finally:
        db.close()


def key(record: dict) -> tuple[str, str, int]:
    return record["robot_id"], record["boot_id"], record["seq"]


class AgentPowerCuts:
    """One telemetry agent on the layer, sending to the site's real gateway and dashboard."""

    def __init__(self, site, seed: int, same_boot: bool = False) -> None:
        self.site = site
        self.same_boot = same_boot
        self.boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        self.boots = 0
        self.seed = seed
        self.rng = random.Random(seed)
        self.report = Report("agent", seed)
        self.disk = site.root / "agent-disk"
        self.mnt = site.root / "agent-fs"
        self.layer = PowerLayer(self.disk, self.mnt, self.rng, self.report)
        self.gw_db = site.root / "gw-state" / "telemetry.db"
        self.dash_db = site.root / "dashboard-state" / "telemetry.db"
        self.events_log = site.root / "events-added.log"
        self.seen: dict[tuple, dict] = {}  # every (robot, boot, seq) ever seen, with its record
        self.counter: dict[tuple, tuple[int, int]] = {}  # the highest (last_seq, issued) seen durable
        self.agent = None
        self.writer: subprocess.Popen | None = None
        self.next_event = 0
        self.gateway_up = True
        self.last_phase = ""
        self.verbose = False

    # -- what is where ------------------------------------------------------------------

    def upstream(self) -> dict[tuple, dict]:
        """Every record of the agent the gateway (buffer and quarantine) or the dashboard holds."""
        held = {}
        for table in ("records", "quarantine"):
            for body, in read_only(self.gw_db, f"SELECT body FROM {table} WHERE kind != 'gap'"):
                record = json.loads(body)
                held[key(record)] = record
        for robot, boot, seq, kind, body in dashboard_records(self.dash_db) if self.dash_db.exists() else []:
            if kind != "gap":
                held[(robot, boot, seq)] = json.loads(body)
        return held

    def acked_high(self) -> dict[tuple, int]:
        """The highest seq the gateway stored per (robot, boot): what it acknowledged, or is about to."""
        return {(r, b): seq for r, b, seq in read_only(self.gw_db, "SELECT robot_id, boot_id, seq FROM high_water")}

    def upstream_complaints(self) -> list[str]:
        problems = []
        quarantined = read_only(self.gw_db, "SELECT robot_id, boot_id, seq, reason FROM quarantine")
        if quarantined:
            problems.append(f"the gateway quarantined {quarantined[:3]}")
        for name, text in (("dashboard", "record_differs"), ("gw", "below its last seq")):
            log = self.site.root / f"{name}.log"
            if log.exists() and text in log.read_text(errors="replace"):
                line = next(l for l in log.read_text(errors="replace").splitlines() if text in l)
                problems.append(f"{name} log: {line[-300:]}")
        return problems

    def spool_problems(self, spool: dict | None, where: str, acked: dict[tuple, int]) -> list[str]:
        """`acked`: the gateway's high-water marks, read before `spool` (the agent may send on)."""
        if spool is None:
            return []
        problems = []
        if spool["integrity"] != "ok":
            problems.append(f"{where}: spool damaged: {spool['integrity']}")
        held = self.upstream()
        for record in spool["records"]:
            k = key(record)
            if k in held and held[k] != record:
                problems.append(f"{where}: spool record {k} differs from the one upstream: {record} vs {held[k]}")
            if k in self.seen and self.seen[k] != record:
                problems.append(f"{where}: {k} seen before with other content: {record} vs {self.seen[k]}")
            self.seen[k] = record
        for k, record in held.items():
            if k in self.seen and self.seen[k] != record:
                problems.append(f"{where}: upstream {k} differs from the spool's record: {record} vs {self.seen[k]}")
            self.seen.setdefault(k, record)
        for ident, (last, issued) in spool["counters"].items():
            before = self.counter.get(ident, (0, 0))
            if last < before[0] or issued < before[1]:
                problems.append(f"{where}: counter {ident} moved backwards: (last_seq, issued) {before} -> {(last, issued)}")
            if last < acked.get(ident, 0):
                problems.append(f"{where}: counter {ident} last_seq {last} is below seq {acked[ident]}, which the "
                                "gateway acknowledged: a commit the agent sent was lost")
            self.counter[ident] = max(before, (last, issued))
        # A boot's first record deletes the counters of earlier boots; the running boot's stays.
        if (ROBOT, self.boot) in self.counter and (ROBOT, self.boot) not in spool["counters"]:
            problems.append(f"{where}: the counter of the running boot {self.boot} is gone")
        return problems

    def disk_spool(self) -> dict | None:
        """The spool as the cut left it, opened on a copy (the disk itself stays as it was left)."""
        scratch = self.site.root / "spool-as-left"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        source = self.disk / "agent-state"
        for name in ("spool.db", "spool.db-wal", "spool.db-shm"):  # each as the disk has it
            if (source / name).exists():
                shutil.copyfile(source / name, scratch / name)
        return read_spool(scratch / "spool.db") if (scratch / "spool.db").exists() else None

    def phase(self, spool: dict | None) -> str:
        """Where the agent was, judged from the disk as the cut left it."""
        held = self.upstream()
        records = spool["records"] if spool else []
        outbox = self.disk / "robot-state" / "outbox"
        files = [json.loads(p.read_bytes()) for p in outbox.glob("*.json")] if outbox.is_dir() else []
        spooled_events = {r["detail"] for r in records if r["type"] == "event"}
        if any(key(r) in held for r in records):
            return "acknowledged, delete not durable"
        if spool and any(event_key(f) in spool["drained"] or f.get("detail") in spooled_events for f in files):
            return "outbox drain, files not yet removed"
        if not self.gateway_up:
            return "gateway down, spooling"
        return "sending" if records else "idle"

    # -- the processes ----------------------------------------------------------------

    def start_writer(self) -> None:
        first, self.next_event = self.next_event, self.next_event + 10_000
        self.writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(self.mnt / "robot-state"), str(first), "10000",
             str(self.events_log), str(self.rng.randrange(1 << 30))],
            cwd=self.mnt / "robot-state", stdin=subprocess.DEVNULL, stderr=open(self.site.root / "writer.log", "ab"))

    def stop_writer(self) -> None:
        if self.writer is not None and self.writer.poll() is None:
            self.writer.kill()
        if self.writer is not None:
            self.writer.wait(10)

    def reboot(self) -> None:
        """The next start is the first of a new boot: a new boot id, a boot clock a few seconds old."""
        if self.same_boot:
            return
        self.boots += 1
        self.boot = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        boot_file = self.site.root / f"boot-id-{self.boots}"
        boot_file.write_text(self.boot + "\n")
        uptime = time.clock_gettime(time.CLOCK_BOOTTIME) - self.rng.uniform(3, 40)
        self.agent.wrap = ["unshare", "--mount", "--time", "--kill-child", "--boottime", str(-int(uptime)),
                           "sh", "-c", 'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"', str(boot_file)]

    def start_agent(self) -> None:
        self.agent.start(wait_listening=False)
        self.agent.wait_for_log(r"telemetry-agent \S+ ready", timeout=60)

    def maybe_toggle_gateway(self) -> None:
        """The gateway goes down for stretches (the spool fills) and comes back (it drains)."""
        if self.rng.random() < (0.2 if self.gateway_up else 0.5):
            self.toggle_gateway()

    def toggle_gateway(self) -> None:
        if self.gateway_up:
            self.site.gw.stop()
        else:
            self.site.gw.start()
        self.gateway_up = not self.gateway_up

    def wait_for_cut(self) -> None:
        """Most cuts land just after the gateway stored a batch of ours; the others anywhere."""
        if self.gateway_up and self.rng.random() < 0.5:
            before = self.acked_high().get((ROBOT, self.boot), 0)
            try:
                wait_until(lambda: self.acked_high().get((ROBOT, self.boot), 0) > before, 10,
                           "the gateway to store a batch", interval=0.005)
            except AssertionError:
                pass
            time.sleep(self.rng.uniform(0.0, 0.03))
        else:
            try:
                self.agent.proc.wait(self.rng.uniform(0.0, 2.5))
            except subprocess.TimeoutExpired:
                pass

    # -- the run ------------------------------------------------------------------------

    def run(self, cuts: int, seconds: float | None = None) -> Report:
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            return self._run(cuts, deadline)
        finally:
            if self.agent is not None:
                self.agent.kill9()
            self.stop_writer()
            self.layer.close()

    def _run(self, cuts: int, deadline: float | None) -> Report:
        self.layer.mount()
        # STATE_DIR and otad-robot's STATE_DIR exist, durably, as the Debian packages lay them out.
        for name in ("agent-state", "robot-state"):
            (self.mnt / name).mkdir()
        fsync_dir(self.mnt)
        self.agent = self.site.agent(self.site.gw.url, name=ROBOT, STATE_DIR=self.mnt / "agent-state",
                                     ROBOT_STATE_DIR=self.mnt / "robot-state", BATCH=self.rng.choice([3, 5, 10]))
        self.reboot()
        self.start_writer()
        running = self.rng.random() >= 0.15  # else the first cut lands while the agent creates its spool
        if running:
            self.start_agent()
        for number in range(1, cuts + 1):
            if deadline is not None and time.monotonic() > deadline:
                print(f"time budget spent after {self.report.cuts} cuts", flush=True)
                break
            if running:
                self.maybe_toggle_gateway()
                self.wait_for_cut()
            else:  # this boot's cut lands while the agent opens (and SQLite recovers) the spool
                self.agent.start(wait_listening=False)
                try:
                    self.agent.proc.wait(self.rng.uniform(0.05, 1.0))
                except subprocess.TimeoutExpired:
                    pass
            problems = self.cut_and_check(None if running else "agent start-up (spool open, recovery)")
            self.layer.mount()
            self.reboot()
            self.start_writer()
            running = self.rng.random() >= 0.15
            if running:
                self.start_agent()
                acked = self.acked_high()
                live = read_spool(self.mnt / "agent-state" / "spool.db", live=True)
                problems += self.spool_problems(live, "after restart", acked)
            problems = [f"seed {self.seed}, cut {number}: {p}" for p in problems]
            if self.verbose:
                print(f"cut {number}: phase {self.last_phase}, next boot {self.boot[:8]}, gateway "
                      f"{'up' if self.gateway_up else 'down'}, {'torn' if self.layer.lazy.torn else 'whole'} writes lost, "
                      f"{'VIOLATION' if problems else 'invariants hold'}", flush=True)
            if problems:
                self.report.violations += problems
                break
        if not self.report.violations:
            self.report.violations += [f"seed {self.seed}, at the end: {p}" for p in self.converged()]
        return self.report

    def cut_and_check(self, phase: str | None) -> list[str]:
        """Cut the power, then check the spool as the cut left it (`phase`: None to judge it from the disk)."""
        self.layer.cut(self.agent)
        self.stop_writer()
        self.report.cuts += 1
        spool = self.disk_spool()
        self.last_phase = phase or self.phase(spool)
        self.report.phases[self.last_phase] += 1
        return self.spool_problems(spool, "as left", self.acked_high()) + self.upstream_complaints()

    def converged(self) -> list[str]:
        """Without cuts: every event added and every record numbered reaches the dashboard exactly once."""
        self.stop_writer()
        if not self.gateway_up:
            self.toggle_gateway()
        # One sample at start, then none: a sample taken after the spool drained would wait in it.
        self.agent.kill9()
        write_config(self.agent.config, {**dict(line.split("=", 1) for line in self.agent.config.read_text().splitlines()),
                                         "INTERVAL": 3600})
        self.start_agent()
        spool_db = self.mnt / "agent-state" / "spool.db"
        outbox = self.mnt / "robot-state" / "outbox"
        wait_until(lambda: not read_spool(spool_db, live=True)["records"] and not list(outbox.glob("*.json"))
                   and not read_only(self.gw_db, "SELECT 1 FROM records LIMIT 1"), 120,
                   "the spool, the outbox and the gateway's buffer to drain")
        acked = self.acked_high()
        spool = read_spool(spool_db, live=True)
        problems = self.spool_problems(spool, "at the end", acked) + self.upstream_complaints()
        try:  # a key outlives its event file only until the file's removal is durable (milliseconds)
            wait_until(lambda: not read_spool(spool_db, live=True)["drained"], 20, "the drained-event keys to go")
        except AssertionError:
            left = len(read_spool(spool_db, live=True)["drained"])
            problems.append(f"the spool keeps {left} drained-event keys with the outbox empty")
        rows = [r for r in dashboard_records(self.dash_db) if r[3] != "gap" and r[0] == ROBOT]
        keys = [(r[0], r[1], r[2]) for r in rows]
        if len(keys) != len(set(keys)):
            problems.append(f"the dashboard holds a record twice: {len(keys) - len(set(keys))} repeats")
        issued = sum(i for (robot, _), (_, i) in self.counter.items() if robot == ROBOT)
        if len(rows) != issued:
            problems.append(f"the agent numbered {issued} records, the dashboard holds {len(rows)}")
        details = [json.loads(r[4])["detail"] for r in rows if r[3] == "event"]
        twice = sorted({d for d in details if details.count(d) > 1})
        if twice:
            problems.append(f"events at the dashboard twice: {twice[:5]}")
        added = {f"event {n}" for n in self.events_log.read_text().split()} if self.events_log.exists() else set()
        missing = sorted(added - set(details))
        if missing:
            problems.append(f"{len(missing)} events added to the outbox never reached the dashboard: {missing[:5]}")
        if self.verbose:
            print(f"at the end: {len(rows)} records at the dashboard ({len(details)} events, {len(added)} added "
                  f"by the writer) from {len({r[1] for r in rows})} boots, {issued} numbered by the agent", flush=True)
        return problems


def start_agent_site(site) -> None:
    """The dashboard and gateway with telemetry tokens (a running dashboard is restarted with them)."""
    tokens = write_tokens(site.root, [ROBOT])
    if site.dashboard is not None:
        site.dashboard.stop()
    site.start_dashboard(TOKENS_FILE=tokens["dashboard"])
    site.gw = site.gateway(TOKEN_FILE=tokens["gateway_own"], ROBOT_TOKENS_FILE=tokens["robots"]).start()
    site.gw.pin_port()  # the agent keeps its GATEWAY_URL across the gateway's stops


def start_loop(site, seed: int) -> AgentPowerCuts:
    start_agent_site(site)
    return AgentPowerCuts(site, seed, same_boot=os.environ.get("POWER_SAME_BOOT") == "1")


if __name__ == "__main__":
    sys.exit(soak_main("agent", start_loop))
