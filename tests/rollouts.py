"""Plans for the rollout tests: a valid document to start from, signed with real keys.

Shared by tests/test_rollout_*.py, the plan corpus and the fuzzers. No daemon
reads plans yet (issue 15's foundation): these tests drive otad/rollout itself.
"""
from __future__ import annotations

import copy
from typing import Any

from otad.rollout.plan import Plan, plan_from_doc
from otad.trust.bundle import render_bundle
from otad.trust.keys import public_key_hint
from otad.trust.signing import sign_digest

EXPIRES = "2026-12-31T00:00:00Z"
EXPIRES_EPOCH = 1798675200.0


def plan_doc(**overrides: Any) -> dict:
    """A valid plan: a canary of two named robots, then 50 %, then 100 %."""
    doc = {
        "schema": 1, "rollout_id": "app-2.0.0", "revision": 1, "expires": EXPIRES, "version": "2.0.0",
        "from": ["1.0.0"],
        "phases": [
            {"robots": ["a1", "b1"], "percent": 0, "min_soak_s": 600, "advance": "auto",
             "halt": {"fleet": {"max_failures": 0, "min_attempts": 1}, "site": {"max_failures": 0, "min_attempts": 1}}},
            {"robots": [], "percent": 50, "min_soak_s": 1800, "advance": "approve",
             "halt": {"fleet": {"max_failure_rate": 0.1, "min_attempts": 4}, "site": {"max_failures": 1, "min_attempts": 1}}},
            {"robots": [], "percent": 100, "min_soak_s": 0, "advance": "auto", "halt": {}},
        ],
        "install_timeout_s": 900, "on_halt": "rollback", "offline_policy": "continue", "offline_max_phase": 1,
        "state": "active", "approved_phase": 0, "reason": "",
    }
    doc.update(copy.deepcopy(overrides))
    return doc


def make_plan(**overrides: Any) -> Plan:
    return plan_from_doc(plan_doc(**overrides))


def sign_raw(data: bytes, key) -> bytes:
    """A valid rollout-key bundle over any bytes, so a test reaches the parser's refusal, not the signature's."""
    from otad.rollout.signed import plan_digest

    digest = plan_digest(data)
    return render_bundle(sign_digest(key, digest), digest, public_key_hint(key.public_key()))
