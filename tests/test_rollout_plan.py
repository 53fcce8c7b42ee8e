"""The rollout plan parser (otad/rollout/plan.py) and the plan corpus, on the real module.

No daemon reads plans yet (issue 15's foundation; another change wires them
in), so these tests call the parser and `verify_plan` directly. Every corpus
case is signed with a real rollout key first: the refusal must come from the
parser, whatever a key holder signed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from otad.errors import MalformedMetadata
from otad.rollout.plan import Criteria, PlanError, parse_plan, plan_from_doc, render_plan, revise
from otad.rollout.signed import verify_plan
from rollouts import EXPIRES_EPOCH, make_plan, plan_doc, sign_raw

CORPUS = Path(__file__).parent / "corpus"
CASES = json.loads((CORPUS / "plan-cases.json").read_text())


def test_a_valid_plan_parses_with_every_field():
    plan = parse_plan(render_plan(make_plan()))
    assert (plan.rollout_id, plan.revision, plan.version, plan.from_versions) == ("app-2.0.0", 1, "2.0.0", ("1.0.0",))
    assert [p.robots for p in plan.phases] == [("a1", "b1"), (), ()]
    assert [p.percent for p in plan.phases] == [0, 50, 100]
    assert plan.phases[1].advance == "approve" and plan.phases[1].fleet == Criteria(None, 0.1, 4)
    assert plan.phases[2].fleet is None and plan.phases[2].site is None
    assert (plan.on_halt, plan.offline_policy, plan.offline_max_phase, plan.state) == ("rollback", "continue", 1, "active")
    assert plan.expires_epoch == EXPIRES_EPOCH


def test_canonical_bytes_round_trip_and_are_stable():
    data = render_plan(make_plan())
    assert render_plan(parse_plan(data)) == data
    assert b" " not in data and data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()


def test_optional_fields_take_their_safe_defaults():
    doc = {k: v for k, v in plan_doc().items() if k in ("schema", "rollout_id", "revision", "expires", "version", "install_timeout_s")}
    plan = plan_from_doc({**doc, "phases": [{"percent": 10}]})
    assert (plan.on_halt, plan.offline_policy, plan.offline_max_phase, plan.state, plan.approved_phase) == ("pause", "hold", 0, "active", 0)
    assert plan.from_versions == () and plan.phases[0].advance == "auto" and plan.phases[0].min_soak_s == 0


def test_plan_error_is_the_bad_input_family():
    with pytest.raises(MalformedMetadata):
        parse_plan(b"{}")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_plan_corpus_is_refused_with_its_one_line_reason(case, role_keys):
    """tests/corpus/plan/: each file, validly signed by the trusted rollout key, is refused by verify_plan."""
    data = (CORPUS / case["file"]).read_bytes()
    private, public = role_keys["rollout"]
    with pytest.raises(PlanError) as refused:
        verify_plan(data, sign_raw(data, private), (public,), now=EXPIRES_EPOCH - 86400)
    message = str(refused.value)
    assert case["expect"] in message and "\n" not in message and len(message) < 300, message


def test_every_corpus_file_has_a_row_and_every_row_a_file():
    files = {f"plan/{p.name}" for p in (CORPUS / "plan").iterdir()}
    assert files == {c["file"] for c in CASES}


def test_pause_resume_approve_and_abort_are_new_revisions():
    plan = make_plan(revision=4)
    paused = revise(plan, state="paused", reason="operator: looking at a1's logs")
    assert (paused.revision, paused.state, paused.reason) == (5, "paused", "operator: looking at a1's logs")
    resumed = revise(paused, state="active", reason="")
    approved = revise(resumed, approved_phase=2)
    aborted = revise(approved, state="aborted", reason="phase 1 fleet-wide: 3 failed, more than max_failures 2")
    assert [p.revision for p in (resumed, approved, aborted)] == [6, 7, 8] and aborted.approved_phase == 2
    assert aborted.phases == plan.phases and aborted.version == plan.version


def test_a_revision_readers_would_refuse_cannot_be_made():
    plan = make_plan()
    with pytest.raises(PlanError, match="field 'approved_phase' must be between 0 and 2"):
        revise(plan, approved_phase=3)
    with pytest.raises(PlanError, match="field 'reason' must be one line"):
        revise(plan, state="paused", reason="two\nlines")
    with pytest.raises(PlanError, match="sets the revision itself"):
        revise(plan, revision=1)


def test_site_orchestration_fields_round_trip_and_are_absent_unless_set():
    """A plan may set the site's budget, its maintenance windows and force_after_s (issue 16);
    a plan without them renders exactly as before, so plans signed before the fields still verify."""
    plain = make_plan()
    assert (plain.site_max_concurrent, plain.windows, plain.force_after_s) == ("", "", None)
    assert b"site_max_concurrent" not in render_plan(plain) and b"windows" not in render_plan(plain)
    doc = {**plan_doc(), "site_max_concurrent": "25%", "windows": "Mon-Fri 22:00-05:00", "force_after_s": 3600}
    plan = parse_plan(render_plan(plan_from_doc(doc)))
    assert (plan.site_max_concurrent, plan.windows, plan.force_after_s) == ("25%", "Mon-Fri 22:00-05:00", 3600)
    assert revise(plan, state="paused").windows == "Mon-Fri 22:00-05:00"
