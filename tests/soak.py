"""Chaos soak on the namespace topology: releases and telemetry flow while a seeded schedule breaks things.

    make soak                      # 10 minutes
    SOAK_SECONDS=120 make soak     # any length; `make check` runs 120 s (soak-short)
    SOAK_SEED=1234 make soak       # replay a schedule

While good releases, one whose self-test fails and one tampered are published,
and the agents post telemetry every second, a seeded random schedule cuts and
restores the WAN and robots' edge links, flaps links after a number of
received bytes (a download cut mid-transfer), stops the dashboard and kill -9s
and restarts any daemon. A sampler checks every robot's CURRENT every 50 ms.
At the end everything is restored and, within a bound, the site must
converge. Invariants (exit 1 if any fails):

- no robot's CURRENT ever points at a missing, partial or unverified release;
- every robot ends on the newest good release, the self-test-failing release
  is blacklisted on every robot, the tampered one was never unpacked;
- the dashboard holds every record a gateway acknowledged, exactly once, in
  seq order per robot, and gap records account for every metric dropped.

The telemetry oracle: the agent counts every seq it hands out per robot and
boot in the same transaction as the spool insert (spool.counters.issued), and
deletes a row only after the gateway's 200 (or the bound's drop, which it
reports). So after the run, with the agents stopped, every record counted that
is neither in the spool nor dropped by it was acknowledged by a gateway, and
must be at the dashboard exactly once.
"""
from __future__ import annotations

import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import otad_release  # noqa: E402
from harness import wait_until  # noqa: E402
from topology import CurrentSampler, Topology, cleanup_stale, flip_byte, seqs_by_robot, skip_reason  # noqa: E402

CONVERGE_S = 240
KIB = 1024


class Schedule:
    """The seeded chaos: one fault at a time per target, each undone after a random while."""

    def __init__(self, topo: Topology, rng: random.Random) -> None:
        self.topo, self.rng = topo, rng
        self.undo: list[tuple[float, str, object]] = []  # (due, target, action)
        self.flaps: list[tuple[str, object]] = []
        self.recoveries = 0
        self.killed_mid_install: set[tuple[str, str | None]] = set()

    def busy(self) -> set[str]:
        self.flaps = [(t, f) for t, f in self.flaps if not f.restored.is_set()]
        return {t for _, t, _ in self.undo} | {t for t, _ in self.flaps}

    def inject(self, now: float) -> None:
        topo, rng = self.topo, self.rng
        busy = self.busy()
        kind = rng.choices(["wan", "edge", "dashboard", "kill", "flap"], weights=[2, 2, 1, 4, 2])[0]
        if kind == "wan" and "wan" not in busy and "link:gateway" not in busy:
            topo.cut_wan()
            self._later(now + rng.uniform(1, 20), "wan", topo.restore_wan)
        elif kind == "edge":
            robot = rng.choice(topo.robot_names)
            if f"edge:{robot}" not in busy and f"link:{robot}" not in busy:
                topo.cut_edge(robot)
                self._later(now + rng.uniform(1, 12), f"edge:{robot}", lambda: topo.restore_edge(robot))
        elif kind == "dashboard" and "daemon:dashboard" not in busy:
            topo.stop_dashboard()
            self._later(now + rng.uniform(1, 12), "daemon:dashboard", topo.start_dashboard)
        elif kind == "kill":
            name = rng.choice(list(topo.daemons))
            if f"daemon:{name}" not in busy:
                topo.kill9(name)
                self._later(now + rng.uniform(0, 4), f"daemon:{name}", lambda: topo.start_daemon(name))
        elif kind == "flap":
            host = rng.choice(["gateway", *topo.robot_names])
            if not {f"link:{host}", "wan" if host == "gateway" else f"edge:{host}"} & busy:
                flap = topo.cut_download_after(host, rng.randrange(16 * KIB, 512 * KIB), rng.uniform(1, 6), timeout=30)
                self.flaps.append((f"link:{host}", flap))

    def kill_mid_install(self, now: float, chance: float = 0.05) -> None:
        """Now and then, kill -9 a robot that is unpacking, activating or self-testing.

        At most once per robot and version: an install interrupted after activation counts
        as a failed attempt (a release that crashes the robot looks just like that), and
        MAX_ATTEMPTS of them rightly blacklist a release, which is not what this fault is about.
        """
        busy = self.busy()
        for robot in self.topo.robot_names:
            state = self.topo.state(robot)
            if f"daemon:{robot}" in busy or state.get("phase") not in ("unpacking", "activating", "selftest"):
                continue
            if (robot, state.get("target")) not in self.killed_mid_install and self.rng.random() < chance:
                self.killed_mid_install.add((robot, state.get("target")))
                self.topo.kill9(robot, " mid-install")
                self._later(now + self.rng.uniform(0, 2), f"daemon:{robot}", lambda r=robot: self.topo.start_daemon(r))

    def _later(self, due: float, target: str, action) -> None:
        self.undo.append((due, target, action))

    def undo_due(self, now: float, everything: bool = False) -> None:
        due = [u for u in self.undo if everything or u[0] <= now]
        self.undo = [u for u in self.undo if u not in due]
        for _, _, action in due:
            action()
            self.recoveries += 1
        if everything:
            for _, flap in self.flaps:
                flap.restored.wait(40)


def run(seconds: int, seed: int) -> int:
    reason = skip_reason()
    if reason:
        print(f"soak skipped: {reason}")
        return 0
    cleanup_stale()
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="otad-soak-"))
    for name in ("release",):
        assert otad_release("keygen", "--output-prefix", str(root / name)).returncode == 0
    topo = Topology(root, root / "release.key", root / "release.pub")
    sampler = CurrentSampler(topo)
    started = time.monotonic()
    try:
        topo.build().start()
        for host in ("gateway", *topo.robot_names):
            topo.rate_limit(host, "16mbit")  # downloads last long enough for cuts to land inside them
        plan, releases = build_releases(topo, sampler, seconds)
        sampler.verified.add(topo.release("1.0.0")["sha256"])
        wait_until(lambda: topo.settled_on("1.0.0"), 90, "the first release on every robot", interval=0.2)
        sampler.start()
        print(f"otad soak: {seconds} s of chaos, seed {seed}, 3 robots; building and starting took "
              f"{time.monotonic() - started:.0f} s", flush=True)
        schedule = Schedule(topo, rng)
        chaos_start = time.monotonic()
        next_fault = chaos_start + rng.uniform(0.5, 3)
        while (now := time.monotonic()) < chaos_start + seconds:
            schedule.undo_due(now)
            publish_due(plan, now - chaos_start)
            schedule.kill_mid_install(now)
            if now >= next_fault:
                schedule.inject(now)
                next_fault = now + rng.uniform(0.5, 4)
            time.sleep(0.05)
        chaos_s = time.monotonic() - chaos_start
        schedule.undo_due(time.monotonic(), everything=True)
        return converge_and_check(topo, sampler, schedule, plan, releases, seed, seconds, chaos_s)
    finally:
        sampler.stop()
        left = topo.teardown()
        if left:
            print(f"soak: left behind after teardown: {left}")
        import shutil

        if not left and not os.environ.get("SOAK_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


def build_releases(topo: Topology, sampler: CurrentSampler, seconds: int):
    """Build every release before the chaos (builds cost CPU); return the publishing plan.

    Plan entries are (not before second, condition, publish). The dashboard offers only
    its newest manifest and a gateway only its newest verified release, so a release
    superseded before the site saw it is never offered at all: like a careful CI, the
    tampered release waits until every robot runs the newest good one, and the failing
    one until the gateway has turned the tampered one down (or 30 s have passed).
    """
    n_good = max(3, seconds // 60)
    plan: list[tuple[float, object, object]] = []
    good = []
    for number in range(1, n_good + 1):
        version = f"1.{number}.0"
        size = 1024 * KIB if number % 3 == 0 else 256 * KIB
        out = topo.site.build(version, size=size, selftest="sleep 0.5")
        plan.append((seconds * (0.05 + 0.65 * (number - 1) / max(1, n_good - 1)), None, lambda o=out: _publish(topo, sampler, o)))
        good.append(version)
    tampered, failing = f"1.{n_good + 1}.0", f"1.{n_good + 2}.0"
    sampler.forbidden.add(tampered)
    tampered_out = topo.site.build(tampered, size=256 * KIB)
    failing_out = topo.site.build(failing, size=256 * KIB, selftest="sleep 0.2; echo 'gripper offline' >&2; exit 4")
    newest = good[-1]
    published_at: dict[str, float] = {}

    def tampered_rejected() -> bool:
        return bool(re.search(rf"rejected app {re.escape(tampered)}", topo.log("gateway"))) or \
            time.monotonic() - published_at["tampered"] > 30

    def publish_tampered() -> None:
        _publish_tampered(topo, tampered_out)
        published_at["tampered"] = time.monotonic()

    plan.append((seconds * 0.75, lambda: topo.settled_on(newest), publish_tampered))
    plan.append((seconds * 0.80, tampered_rejected, lambda: _publish(topo, sampler, failing_out)))
    return plan, {"good": good, "newest_good": good[-1], "tampered": tampered, "failing": failing}


def publish_due(plan: list, elapsed: float) -> None:
    """Publish the next releases whose time has come and whose condition holds (in order)."""
    while plan and plan[0][0] <= elapsed and (plan[0][1] is None or plan[0][1]()):
        plan.pop(0)[2]()


def _publish(topo: Topology, sampler: CurrentSampler, out: Path) -> None:
    manifest = topo.site.publish(out)
    sampler.verified.add(manifest["sha256"])
    topo.faults["release published"] = topo.faults.get("release published", 0) + 1


def _publish_tampered(topo: Topology, out: Path) -> None:
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    flip_byte(out / manifest["artifact"])
    topo._publish_by_hand(out, [p.name for p in out.iterdir()])


def converge_and_check(topo: Topology, sampler: CurrentSampler, schedule: Schedule, plan: list, releases: dict,
                       seed: int, seconds: int, chaos_s: float) -> int:
    for host in ("gateway", *topo.robot_names):
        topo.rate_limit(host, None)
    for name in topo.daemons:
        topo.start_daemon(name)
    newest, failing = releases["newest_good"], releases["failing"]
    began = time.monotonic()
    converged = True
    try:
        # Releases still waiting for their moment (a short run, or a schedule that kept the site away).
        wait_until(lambda: publish_due(plan, float("inf")) or not plan, CONVERGE_S, "the last releases to be published", interval=0.2)
        wait_until(lambda: topo.settled_on(newest) and all(failing in topo.state(r).get("blacklist", []) for r in topo.robot_names),
                   CONVERGE_S, f"every robot on {newest} with {failing} blacklisted", interval=0.2)
    except AssertionError as exc:
        converged = False
        print(f"soak: {exc}")
    converge_s = time.monotonic() - began
    sampler.stop()
    # Telemetry: let the agents catch up (one may be in backoff after a fault), stop them,
    # let the gateway flush, then compare the spools with the dashboard.
    try:
        wait_until(lambda: all(len(topo.agent_pending(r)) <= 1 for r in topo.robot_names), 60,
                   "the agents' spools to drain", interval=0.2)
    except AssertionError as exc:
        print(f"soak: {exc}")
    for robot in topo.robot_names:
        topo.daemons[f"{robot}-agent"].stop()
    try:
        wait_until(lambda: topo.gateway_backlog() == 0, 120, "the gateway's buffer to drain", interval=0.2)
    except AssertionError as exc:
        print(f"soak: {exc}")
    tele = telemetry_figures(topo)
    logs = {name: topo.log(name) for name in topo.daemons}
    robot_logs = "".join(logs[r] for r in topo.robot_names)
    tampered = releases["tampered"]
    checks = [
        (f"no broken CURRENT in {sampler.samples} samples x {len(topo.robot_names)} robots", not sampler.problems),
        (f"every robot on the newest good release {newest}", converged and all(topo.current(r) == newest for r in topo.robot_names)),
        (f"self-test-failing {failing} blacklisted on every robot", all(failing in topo.state(r).get("blacklist", []) for r in topo.robot_names)),
        (f"tampered {tampered} never unpacked", not any((topo.app_dir(r) / "releases" / tampered).exists() for r in topo.robot_names)
         and f"installed app {tampered}" not in robot_logs),
        ("every acknowledged record at the dashboard", tele["lost"] == 0),
        ("no record twice at the dashboard", tele["duplicated"] == 0),
        ("records in seq order per robot", tele["reordered"] == 0),
        ("gap records account for every dropped metric", tele["unaccounted"] == 0),
    ]
    faults = {k: v for k, v in topo.faults.items() if k != "release published"}
    print_summary(topo, seed, seconds, chaos_s, converge_s, faults, schedule, releases, tele, logs, checks, sampler)
    return 0 if all(ok for _, ok in checks) else 1


def telemetry_figures(topo: Topology) -> dict:
    held = seqs_by_robot(topo.dashboard_rows())
    gaps = [r for r in topo.dashboard_rows() if r[3] == "gap"]
    import json

    gap_dropped = sum(json.loads(r[4])["dropped"] for r in gaps)
    figures = {"per_robot": {}, "lost": 0, "duplicated": 0, "reordered": 0, "sent": 0, "acked": 0, "delivered": 0,
               "gap_records": len(gaps), "gap_dropped": gap_dropped}
    spool_dropped = 0
    for robot in topo.robot_names:
        created = topo.agent_issued(robot)
        pending = set(topo.agent_pending(robot))
        dropped = sum(int(n) for n in re.findall(r"dropped the (\d+) oldest metrics", topo.log(f"{robot}-agent")))
        spool_dropped += dropped
        seqs = held.get(robot, [])
        delivered = set(seqs)
        # seqs start above the boot clock, so count: what was made and neither waits in the
        # spool nor was dropped by it (its `dropped` records say so) must be at the dashboard.
        acked = created - len(pending) - dropped
        lost = acked - len(delivered)
        row = {"sent": created, "acked": acked, "pending": len(pending), "delivered": len(delivered),
               "lost": max(0, lost), "duplicated": len(seqs) - len(delivered), "reordered": int(seqs != sorted(seqs)),
               "spool dropped": dropped}
        figures["per_robot"][robot] = row
        for key in ("lost", "duplicated", "reordered", "sent", "acked", "delivered"):
            figures[key] += row[key]
    # The gateway's bound drops metrics only with a gap record saying how many; the spool's drops are logged.
    gateway_dropped = sum(int(n) for n in re.findall(r"telemetry buffer full: dropped (\d+)", topo.log("gateway")))
    figures["unaccounted"] = abs(gateway_dropped - gap_dropped)
    figures["spool_dropped"] = spool_dropped
    return figures


def print_summary(topo, seed, seconds, chaos_s, converge_s, faults, schedule, releases, tele, logs, checks, sampler) -> None:
    robot_logs = "".join(logs[r] for r in topo.robot_names)
    rollbacks = len(re.findall(r"rolled back app ", robot_logs))
    blacklists = len(re.findall(r"blacklisted app ", robot_logs))
    crash_recoveries = len(re.findall(r"recovery: |: interrupted before the self-test passed", robot_logs))
    reconnects = len(re.findall(r"dashboard reachable again", logs["gateway"]))
    rejected = len(re.findall(rf"rejected app {re.escape(releases['tampered'])}", logs["gateway"]))
    print()
    print(f"== otad chaos soak: seed {seed}, {seconds} s scheduled ({chaos_s:.0f} s of chaos), converged in {converge_s:.0f} s")
    print(f"   replay: SOAK_SEED={seed} SOAK_SECONDS={seconds} make soak")
    print()
    print(f"{'fault':<28}{'injected':>10}")
    for kind, count in sorted(faults.items()):
        print(f"{kind:<28}{count:>10}")
    print(f"{'total':<28}{sum(faults.values()):>10}")
    print()
    print(f"{'recovery':<44}{'count':>8}")
    for what, count in [("faults undone (links up, daemons restarted)", schedule.recoveries),
                        ("gateway reconnects to the dashboard", reconnects),
                        ("robot installs undone after kill -9", crash_recoveries),
                        ("rollbacks", rollbacks), ("blacklists", blacklists),
                        (f"gateway rejections of tampered {releases['tampered']}", rejected)]:
        print(f"{what:<44}{count:>8}")
    print()
    print(f"releases: good {', '.join(releases['good'])}; tampered {releases['tampered']}; self-test failing {releases['failing']}")
    print("blacklisted: " + "; ".join(f"{r} {', '.join(topo.state(r).get('blacklist', [])) or '-'}" for r in topo.robot_names))
    print()
    cols = ["sent", "acked", "pending", "delivered", "lost", "duplicated", "reordered", "spool dropped"]
    print(f"{'robot':<8}" + "".join(f"{c:>14}" for c in cols))
    for robot, row in tele["per_robot"].items():
        print(f"{robot:<8}" + "".join(f"{row[c]:>14}" for c in cols))
    print(f"{'all':<8}" + "".join(f"{sum(r[c] for r in tele['per_robot'].values()):>14}" for c in cols))
    print(f"gap records at the dashboard: {tele['gap_records']} ({tele['gap_dropped']} metrics dropped by the gateway buffer)")
    print()
    for what, ok in checks:
        print(f"[{'ok' if ok else 'FAILED'}] {what}")
    for problem in sampler.problems[:20]:
        print(f"  broken: {problem}")
    print()
    print(f"faults injected: {sum(faults.values())}")
    print(f"records lost: {tele['lost']}")
    print(f"records duplicated: {tele['duplicated']}")
    print(f"broken states seen: {len(sampler.problems)}")


def main() -> int:
    seconds = int(os.environ.get("SOAK_SECONDS", "600"))
    seed = int(os.environ.get("SOAK_SEED") or random.SystemRandom().randrange(1, 10**6))
    if seconds < 10:
        print("soak: SOAK_SECONDS must be at least 10", file=sys.stderr)
        return 1
    return run(seconds, seed)


if __name__ == "__main__":
    sys.exit(main())
