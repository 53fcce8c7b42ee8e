"""Fuzzing the robot's site-orchestration inputs (issue 16) with hypothesis, as test_fuzz_parsers.py does
for the other parsers (its run_fuzz: short and deterministic in `make check`, FUZZ_SECONDS of fresh
seeds in `make fuzz`). The hostile cases themselves go to a real robot
(test_orchestration_robot.py::test_hostile_lease_answers_keep_the_robot_from_installing_and_running);
these properties are on the modules that robot calls:
- a gateway's answer to POST /lease (otad/robot/leaseclient.read_answer) is a LeaseAnswer whose every
  field is in range (a grant always with a lease id and a TTL), or TransportError, never anything else;
- the bytes of STATE_DIR/orchestration.json (otad/robot/orchestrate.parse_state) give fields of their
  types, or ValueError, never anything else; what parses renders back to the same state.
"""
from __future__ import annotations

import json

from otad.errors import TransportError
from otad.robot.leaseclient import MAX_RETRY_S, MAX_TTL_S, STATES, LeaseAnswer, read_answer
from otad.robot.orchestrate import parse_state
from test_fuzz_parsers import documents, run_fuzz

VALID_ANSWER = {"state": "granted", "reason": "r1 holds lease 3", "lease": 3, "ttl_s": 300, "ahead": None, "retry_s": 5}
VALID_STATE = {"schema": 1, "update": "installing 2.0.0 (lease 3)", "version": "2.0.0", "deferred_since": 1796320000.5,
               "lease": {"lease": 3, "version": "2.0.0", "ttl_s": 300, "outcome": ""}}


def check_answer(data: bytes) -> None:
    try:
        answer = read_answer(data)
    except TransportError:
        return
    assert isinstance(answer, LeaseAnswer) and answer.state in STATES
    assert 1 <= answer.retry_s <= MAX_RETRY_S and "\n" not in answer.reason and len(answer.reason) <= 200
    assert answer.ttl_s is None or 1 <= answer.ttl_s <= MAX_TTL_S
    assert answer.ahead is None or answer.ahead >= 0
    if answer.state == "granted":
        assert type(answer.lease) is int and answer.lease >= 1 and answer.ttl_s is not None


def check_state(data: bytes) -> None:
    try:
        state = parse_state(data)
    except ValueError:
        return
    assert isinstance(state["update"], str) and "\n" not in state["update"]
    assert state["deferred_since"] is None or isinstance(state["deferred_since"], float)
    assert parse_state(json.dumps(state).encode()) == state


def test_fuzz_lease_answer():
    run_fuzz(documents(VALID_ANSWER), check_answer)


def test_fuzz_orchestration_state():
    run_fuzz(documents(VALID_STATE), check_state)
