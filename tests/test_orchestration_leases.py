"""The install-lease table (otad/orchestration/leases.py) with the budget, and the lease corpus.

No daemon holds leases yet (issue 16's foundation; the gateway and the robot
are wired in a later change), and a daemon could not be stopped between every
pair of operations anyway: these tests drive the real module, including a
"restart" (render, parse, carry on) after any operation. The property test runs
random request/grant/renew/release/expire/restart sequences on a 6-robot site
with groups and checks, after every step, the budget and min_available, and at
the end that every waiting robot is served.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otad.orchestration import Verdict
from otad.orchestration.budget import Budget, may_grant, parse_groups, parse_limit
from otad.orchestration.leases import MAX_TABLE_BYTES, LeaseTable, LeaseTableError, parse_table

CORPUS = Path(__file__).parent / "corpus"
CASES = json.loads((CORPUS / "leases-cases.json").read_text())
VALID_TABLE = {
    "schema": 1, "next_seq": 5, "next_lease": 3,
    "leases": [{"robot": "r1", "lease": 1, "phase": 0, "granted_at": 1000, "expires_at": 1300, "ttl_s": 300},
               {"robot": "r2", "lease": 2, "phase": 0, "granted_at": 1010.5, "expires_at": 1310.5, "ttl_s": 300}],
    "queue": [{"robot": "r3", "phase": 0, "seq": 3, "since": 1001, "seen": 1200},
              {"robot": "r4", "phase": 1, "seq": 4, "since": 1002, "seen": 1201}],
}
ROBOTS = [f"r{n}" for n in range(6)]
TTL = 300


def budget_decide(budget: Budget, site_robots: int = 6):
    return lambda robot, phase, held: may_grant(robot, held, budget, site_robots)


def restarted(table: LeaseTable) -> LeaseTable:
    """What a gateway reads back after a kill -9 right after persisting `table`."""
    data = table.render()
    again = parse_table(data)
    assert again.render() == data
    return again


def test_one_slot_five_ready_robots_each_get_their_turn_in_order():
    table, decide = LeaseTable(), budget_decide(Budget(parse_limit("1")))
    for n, robot in enumerate(ROBOTS[:5]):
        assert table.request(robot, 0, 100 + n).ahead == n
    served = []
    for step in range(5):
        for robot in ROBOTS[step:5]:  # the rest keep asking while waiting: nobody moves up or back by it
            table.request(robot, 0, 200 + step)
        granted = [d.lease for d in table.grant(200 + step, TTL, decide) if d.lease]
        assert len(granted) == 1 and all(d.lease is None for d in table.grant(200 + step, TTL, decide))
        served.append(granted[0].robot_id)
        assert table.release(granted[0].robot_id, granted[0].lease_id, "committed", 201 + step).state == "released"
    assert served == ROBOTS[:5] and not table.queue and not table.leases


def test_asking_again_for_a_held_lease_gets_the_same_lease():
    table, decide = LeaseTable(), budget_decide(Budget(parse_limit("2")))
    table.request("r1", 0, 10)
    [decision] = table.grant(10, TTL, decide)
    again = table.request("r1", 0, 20)
    assert again.state == "granted" and again.lease.lease_id == decision.lease.lease_id
    assert again.lease.expires_at == decision.lease.expires_at and again.lease.last_heard == 20
    assert table.grant(20, TTL, decide) == [] and len(table.leases) == 1


def test_an_expired_lease_sends_its_robot_to_the_back_and_frees_the_slot():
    table, decide = LeaseTable(), budget_decide(Budget(parse_limit("1")))
    for n, robot in enumerate(ROBOTS[:3]):
        table.request(robot, 0, n)
    [first] = [d.lease for d in table.grant(10, TTL, decide) if d.lease]
    assert table.renew("r0", first.lease_id, 200).lease.expires_at == 200 + TTL
    assert table.expire(499) == [] and table.grant(499, TTL, decide)[0].lease is None  # still held: r1 waits
    lines = table.expire(500)
    assert lines == ["lease 1 of r0 expired (not renewed within 300s); r0 goes to the back of the queue"]
    assert [w.robot_id for w in table.order()] == ["r1", "r2", "r0"]
    assert [d.lease.robot_id for d in table.grant(500, TTL, decide) if d.lease] == ["r1"]
    late = table.renew("r0", first.lease_id, 501)
    assert late.state == "refused" and late.reason == "r0 holds no lease (ask again)"


def test_expiry_holds_at_its_time_even_before_a_sweep():
    """A renew at or after expires_at is refused whether or not expire() ran: the decision cannot
    depend on when the gateway's sweep happened to run."""
    table = LeaseTable()
    table.request("r0", 0, 0)
    [lease] = [d.lease for d in table.grant(0, TTL, budget_decide(Budget(parse_limit("1"))))]
    refused = table.renew("r0", lease.lease_id, TTL)
    assert refused.state == "refused" and "expired (not renewed within 300s)" in refused.reason
    assert "r0" in table.queue and not table.leases


def test_release_is_idempotent_and_a_stale_lease_id_cannot_end_a_newer_lease():
    table, decide = LeaseTable(), budget_decide(Budget(parse_limit("1")))
    table.request("r0", 0, 0)
    old = table.grant(0, TTL, decide)[0].lease
    table.expire(TTL)
    table.request("r0", 0, TTL)  # it asks again (a robot put back by an expiry is not granted before)
    new = table.grant(TTL, TTL, decide)[0].lease
    assert new.lease_id != old.lease_id
    assert table.release("r0", old.lease_id, "committed", TTL + 1).state == "refused"
    assert table.renew("r0", old.lease_id, TTL + 1).state == "refused" and "r0" in table.leases
    assert table.release("r0", new.lease_id, "rolled_back", TTL + 2).reason == "r0 released lease 2: rolled_back"
    assert table.release("r0", new.lease_id, "rolled_back", TTL + 3).state == "released"  # a retried release
    with pytest.raises(LeaseTableError):
        table.release("r0", new.lease_id, "done", TTL + 4)


def test_a_robot_that_finishes_after_its_lease_expired_leaves_the_queue():
    table = LeaseTable()
    table.request("r0", 0, 0)
    lease = table.grant(0, TTL, budget_decide(Budget(parse_limit("1"))))[0].lease
    table.expire(TTL + 5)
    answer = table.release("r0", lease.lease_id, "committed", TTL + 10)
    assert answer.state == "released" and "r0" not in table.queue


def test_stale_waiters_leave_and_withdrawn_robots_lose_their_place():
    table = LeaseTable()
    table.request("r0", 0, 0)
    table.request("r1", 0, 1)
    table.request("r0", 0, 50)  # still asking: kept
    assert table.expire(61, waiting_ttl_s=60) == ["r1 left the queue: not heard from for 60s"]
    table.request("r2", 0, 62)
    assert table.withdraw("r0").reason == "r0 left the queue (no longer ready)"
    table.request("r0", 0, 63)
    assert [w.robot_id for w in table.order()] == ["r2", "r0"]


def test_a_robot_that_died_holding_a_lease_is_not_granted_again_and_again():
    """Its lease expires and it goes to the back of the queue, but it was last heard from when it
    asked: the same sweep's waiting TTL drops it, so it cannot take the slot for another TTL."""
    table, decide = LeaseTable(), budget_decide(Budget(parse_limit("1")))
    table.request("dead", 0, 0)
    table.request("alive", 0, 1)
    table.grant(1, TTL, decide)
    table.request("alive", 0, TTL)  # still asking; "dead" never renews
    assert table.expire(TTL + 1, waiting_ttl_s=120) == [
        "lease 1 of dead expired (not renewed within 300s); dead goes to the back of the queue",
        "dead left the queue: not heard from for 301s"]
    assert [d.robot_id for d in table.grant(TTL + 1, TTL, decide) if d.lease] == ["alive"]


def test_an_earlier_phase_is_served_first_then_first_come_first_served():
    table = LeaseTable()
    table.request("late-phase", 1, 0)
    table.request("b", 0, 1)
    table.request("c", 0, 2)
    assert [w.robot_id for w in table.order()] == ["b", "c", "late-phase"] and table.ahead("late-phase") == 2


def test_a_robot_passed_over_for_its_group_keeps_its_place():
    budget = Budget(parse_limit("2"), parse_groups("a=r0,r1 max=1"))
    table = LeaseTable()
    for robot in ("r0", "r1", "r2"):
        table.request(robot, 0, 0)
    decisions = table.grant(0, TTL, budget_decide(budget))
    assert [(d.robot_id, d.verdict.ok) for d in decisions] == [("r0", True), ("r1", False), ("r2", True)]
    assert decisions[1].verdict.reason == "group a budget full: 1 of 1 leases in use (max 1)"
    table.release("r0", 1, "committed", 5)
    table.request("r3", 0, 6)
    assert [d.robot_id for d in table.grant(6, TTL, budget_decide(budget)) if d.lease] == ["r1"]


def test_after_a_restart_leases_are_neither_forgotten_nor_duplicated():
    """The gateway persists render() and reads it back: the robot mid-install keeps its lease
    (renew with its id works), asking again gets the same one, and the budget stays full."""
    table, decide = LeaseTable(), budget_decide(Budget(parse_limit("2")))
    for n, robot in enumerate(ROBOTS):
        table.request(robot, 0, n)
    table.grant(10, TTL, decide)
    back = restarted(table)
    assert back.leases == table.leases and back.order() == table.order()
    assert back.grant(20, TTL, decide)[0].lease is None  # no double grant: still 2 of 2
    assert back.renew("r1", table.leases["r1"].lease_id, 30).state == "granted"
    assert back.request("r0", 0, 40).lease.lease_id == table.leases["r0"].lease_id
    back.release("r0", table.leases["r0"].lease_id, "committed", 50)
    fresh = back.grant(50, TTL, decide)[0].lease
    assert fresh.robot_id == "r2" and fresh.lease_id == 3  # the counter survived: no id is reused


def test_the_table_bytes_are_canonical_and_round_trip():
    data = json.dumps(VALID_TABLE, sort_keys=True, separators=(",", ":")).encode()
    assert parse_table(data).render() == data


def test_an_oversized_table_is_refused_before_it_is_parsed():
    with pytest.raises(LeaseTableError) as refused:
        parse_table(b" " * (MAX_TABLE_BYTES + 1))
    assert str(refused.value) == f"lease table is larger than {MAX_TABLE_BYTES} bytes"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_lease_corpus_is_refused_with_its_one_line_reason(case):
    """tests/corpus/leases/: a damaged or forged lease-table file is refused, never half-read."""
    with pytest.raises(LeaseTableError) as refused:
        parse_table((CORPUS / case["file"]).read_bytes())
    message = str(refused.value)
    assert case["expect"] in message and "\n" not in message and len(message) < 300, message


def test_every_lease_corpus_file_has_a_row_and_every_row_a_file():
    files = {f"leases/{p.name}" for p in (CORPUS / "leases").iterdir()}
    assert files == {c["file"] for c in CASES}


# -- property: random sequences keep the budget and min_available, and nobody starves -------------
GROUPS = "a=r0,r1,r2 max=2 min_available=1; b=r3,r4"
operations = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(ROBOTS), st.integers(0, 2)),
    st.tuples(st.just("withdraw"), st.sampled_from(ROBOTS)),
    st.tuples(st.just("grant")),
    st.tuples(st.just("renew"), st.sampled_from(ROBOTS), st.booleans()),
    st.tuples(st.just("release"), st.sampled_from(ROBOTS), st.sampled_from(["committed", "rolled_back", "withdrawn"])),
    st.tuples(st.just("wait"), st.integers(1, 400)),
    st.tuples(st.just("expire"), st.sampled_from([None, 120])),
    st.tuples(st.just("restart")),
)


def check_invariants(table: LeaseTable, budget: Budget) -> None:
    held = table.held()
    assert len(held) <= budget.slots(6)
    for group in budget.groups.groups:
        in_group = held & group.robots
        assert group.max is None or len(in_group) <= group.max.slots(len(group.robots))
        assert len(group.robots - held) >= group.min_available
    assert not set(table.queue) & held
    assert len({l.lease_id for l in table.leases.values()}) == len(table.leases)


@settings(max_examples=150, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(["1", "2", "50%", "100%"]), st.lists(operations, max_size=60))
def test_random_sequences_keep_the_budget_and_every_waiter_is_served(limit, ops):
    budget = Budget(parse_limit(limit), parse_groups(GROUPS))
    decide = budget_decide(budget)
    table, now = LeaseTable(), 1000.0
    for op in ops:
        kind = op[0]
        if kind == "request":
            before = table.leases.get(op[1])
            answer = table.request(op[1], op[2], now)
            if before is not None and now < before.expires_at:
                assert answer.lease == before  # the same lease, never a second one
        elif kind == "withdraw":
            table.withdraw(op[1])
        elif kind == "grant":
            table.grant(now, TTL, decide)
        elif kind == "renew" and op[1] in table.leases:
            table.renew(op[1], table.leases[op[1]].lease_id + (0 if op[2] else 1), now)
        elif kind == "release" and op[1] in table.leases:
            table.release(op[1], table.leases[op[1]].lease_id, op[2], now)
        elif kind == "wait":
            now += op[1]
        elif kind == "expire":
            table.expire(now, op[1])
        elif kind == "restart":
            table = restarted(table)
        check_invariants(table, budget)
    # Drain: every robot alive and cooperative from here on. Each round frees every slot, so
    # at least one waiter is served per round: all are served within as many rounds as waiters.
    waiting = [w.robot_id for w in table.order()]
    served: list[str] = []
    for _ in range(len(waiting)):
        for robot, lease in list(table.leases.items()):
            table.release(robot, lease.lease_id, "committed", now)
        table.expire(now)
        served += [d.robot_id for d in table.grant(now, TTL, decide) if d.lease]
        check_invariants(table, budget)
        now += 1
    assert set(waiting) <= set(served) and not table.queue


def test_a_decide_that_refuses_everything_grants_nothing():
    table = LeaseTable()
    table.request("r0", 0, 0)
    [decision] = table.grant(0, TTL, lambda robot, phase, held: Verdict(False, "outside window"))
    assert decision.lease is None and decision.verdict.reason == "outside window" and "r0" in table.queue


def test_a_dead_robot_is_dropped_even_when_the_lease_ttl_is_shorter_than_the_waiting_ttl():
    """Found by the netns site test: with LEASE_TTL_S=3 (below the 60 s waiting TTL) a robot that
    died holding the only slot was re-queued as heard from at its grant and granted again at the
    next sweep, and so on for ever, each grant blocking the site for a TTL. Now a robot put back by
    its lease's expiry gets no lease until it asks again, and leaves the queue 60 s after it last
    asked (a grant is not hearing from it), while a live robot takes the slot."""
    table, decide = LeaseTable(), budget_decide(Budget(parse_limit("1")))
    table.request("dead", 0, 0)
    table.grant(0, 3, decide)
    table.request("alive", 0, 1)
    granted = []
    for now in range(2, 70, 2):  # the daemon's sweep; "dead" never asks again, "alive" renews
        table.expire(now, waiting_ttl_s=60)
        granted += [d.robot_id for d in table.grant(now, 3, decide) if d.lease]
        if "alive" in table.leases:
            table.renew("alive", table.leases["alive"].lease_id, now)
        else:
            table.request("alive", 0, now)
    assert granted == ["alive"]
    assert "dead" not in table.queue and table.held() == {"alive"}
    again = parse_table(table.render())
    assert again.leases["alive"].last_heard == table.leases["alive"].last_heard == 68


def test_a_robot_whose_lease_expired_gets_a_lease_again_once_it_asks():
    table, decide = LeaseTable(), budget_decide(Budget(parse_limit("1")))
    table.request("r1", 0, 0)
    table.grant(0, 3, decide)
    table.expire(10, waiting_ttl_s=60)
    assert not [d for d in table.grant(10, 3, decide) if d.lease]
    assert table.request("r1", 0, 11).state == "waiting"
    assert [d.robot_id for d in table.grant(11, 3, decide) if d.lease] == ["r1"]


def test_a_table_written_before_the_heard_field_still_reads():
    old = (b'{"leases":[{"expires_at":1300,"granted_at":1000,"lease":1,"phase":0,"robot":"r1","ttl_s":300}],'
           b'"next_lease":2,"next_seq":2,"queue":[],"schema":1}')
    assert parse_table(old).leases["r1"].last_heard == 1000
