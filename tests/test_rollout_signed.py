"""Signed rollout plans (otad/rollout/signed.py) with real keys from `otad-release keygen`.

No daemon verifies plans yet (issue 15's foundation), so these tests call the
module: signature, the key split between the release key (TRUSTED_KEYS) and
the rollout key (ROLLOUT_KEYS) in both directions, expiry against a given
clock, and the anti-replay rule.
"""
from __future__ import annotations

import hashlib

import pytest

from otad.errors import TrustError
from otad.keyconfig import rollout_keys, trusted_keys
from otad.release.signers import CosignSigner
from otad.rollout.plan import PlanError
from otad.rollout.signed import (ExpiredPlan, ReplayedPlan, UntrustedPlan, check_revision, parse_seen, render_seen,
                                 require_revision, sign_plan, verify_plan)
from otad.trust.digest import FileDigest
from otad.trust.metadata import verify_manifest
from otad.trust.verify import TrustAnchors
from rollouts import EXPIRES_EPOCH, make_plan

NOW = EXPIRES_EPOCH - 86400


def signed(role_keys, **overrides):
    return sign_plan(make_plan(**overrides), role_keys["rollout"][0])


def verified(role_keys, **overrides):
    s = signed(role_keys, **overrides)
    return verify_plan(s.data, s.bundle, (role_keys["rollout"][1],), NOW)


def test_a_plan_signed_by_the_rollout_key_verifies(role_keys):
    result = verified(role_keys)
    assert result.key == "rollout.pub" and result.plan == make_plan()
    assert result.sha256 == hashlib.sha256(signed(role_keys).data).hexdigest()


def test_a_flipped_byte_is_refused(role_keys):
    s = signed(role_keys)
    tampered = s.data.replace(b'"percent":50', b'"percent":90')
    with pytest.raises(UntrustedPlan, match="plan signature: the bundle signs other bytes than this plan"):
        verify_plan(tampered, s.bundle, (role_keys["rollout"][1],), NOW)


def test_a_plan_signed_by_an_untrusted_key_is_refused(role_keys):
    """The release key is trusted for releases, not here: only ROLLOUT_KEYS count (and no release keys are named)."""
    s = sign_plan(make_plan(), role_keys["release"][0])
    with pytest.raises(UntrustedPlan, match="signed by an unknown key"):
        verify_plan(s.data, s.bundle, (role_keys["rollout"][1],), NOW)


def test_a_plan_signed_by_the_release_key_is_refused_by_name(role_keys):
    s = sign_plan(make_plan(), role_keys["release"][0])
    with pytest.raises(UntrustedPlan, match="signed by the release key release.pub; plans must be signed by a rollout key"):
        verify_plan(s.data, s.bundle, (role_keys["rollout"][1],), NOW, release_keys=(role_keys["release"][1],))


@pytest.mark.parametrize("legacy", [False, True], ids=["v0.3-bundle", "legacy-bundle"])
def test_a_release_manifest_bundle_never_verifies_a_plan(role_keys, tmp_path, legacy):
    """A release signature (over bare bytes, as `otad-release build` signs the manifest) over the very plan bytes
    does not verify as a plan, even when the same key were trusted for plans: the plan's message is a PAE.
    A legacy bundle carries no digest, so there the signature check itself refuses it."""
    data = signed(role_keys).data
    signer = CosignSigner(role_keys["release"][0], legacy=legacy)
    bundle = signer.sign(tmp_path, FileDigest(len(data), hashlib.sha256(data).digest()))
    expect = "signature does not verify with any trusted key" if legacy else "not a plan signature"
    with pytest.raises(UntrustedPlan, match=expect):
        verify_plan(data, bundle, (role_keys["release"][1],), NOW)


def test_a_rollout_key_signature_never_verifies_a_release(role_keys):
    """The other direction: the rollout key's bundle, put beside the plan bytes as a manifest and its
    manifest.json.bundle, is refused even by a gateway that (wrongly) trusted the rollout key for releases."""
    s = signed(role_keys)
    anchors = TrustAnchors(cosign_keys=(role_keys["rollout"][1],))
    with pytest.raises(TrustError):
        verify_manifest(s.data, s.bundle, anchors, NOW)
    from otad.trust.verify import verify_cosign_signature
    with pytest.raises(TrustError, match="does not match"):  # not even the bare signature check passes
        verify_cosign_signature(hashlib.sha256(s.data).digest(), s.bundle, anchors.cosign_keys)


def test_rollout_keys_refuses_a_key_that_is_also_a_release_key(role_keys):
    folder = role_keys["folder"]
    release = trusted_keys(str(folder / "release.pub"))
    assert [k.name for k in rollout_keys(str(folder / "rollout.pub"), release)] == ["rollout.pub"]
    with pytest.raises(ValueError, match="release.pub is also a release key .*the rollout key must be a separate key"):
        rollout_keys(str(folder / "release.pub"), release)
    assert rollout_keys("", release) == ()  # no ROLLOUT_KEYS: no rollouts, today's behaviour


def test_an_unsigned_plan_and_an_empty_key_list_are_refused(role_keys):
    s = signed(role_keys)
    with pytest.raises(UntrustedPlan, match="not signed"):
        verify_plan(s.data, b"", (role_keys["rollout"][1],), NOW)
    with pytest.raises(UntrustedPlan, match="ROLLOUT_KEYS is empty"):
        verify_plan(s.data, s.bundle, (), NOW)


def test_a_malformed_bundle_is_bad_input(role_keys):
    s = signed(role_keys)
    with pytest.raises(PlanError, match="plan signature: bundle is not valid JSON"):
        verify_plan(s.data, b"{not json", (role_keys["rollout"][1],), NOW)


def test_an_expired_plan_is_refused_against_the_given_clock(role_keys):
    s = signed(role_keys)
    keys = (role_keys["rollout"][1],)
    assert verify_plan(s.data, s.bundle, keys, EXPIRES_EPOCH).plan.revision == 1  # at the instant: still valid
    with pytest.raises(ExpiredPlan, match="expired at 2026-12-31T00:00:00Z, 2 hours ago"):
        verify_plan(s.data, s.bundle, keys, EXPIRES_EPOCH + 7200)
    assert verify_plan(s.data, s.bundle, keys, EXPIRES_EPOCH + 7200, grace=7200).plan.revision == 1
    assert isinstance(ExpiredPlan("x"), UntrustedPlan)


def test_an_older_revision_is_refused_after_a_newer_one(role_keys):
    first, second = verified(role_keys, revision=1), verified(role_keys, revision=2, state="paused")
    state = require_revision({}, first)
    state = require_revision(state, second)
    decision, after = check_revision(state, first)
    assert not decision.accepted and "revision 1 is older than revision 2, already seen: a replay" in decision.reason
    assert after == state  # a refusal changes nothing
    with pytest.raises(ReplayedPlan):
        require_revision(state, first)


def test_the_same_revision_again_is_accepted_but_other_bytes_under_it_are_not(role_keys):
    state = require_revision({}, verified(role_keys, revision=3))
    again, same = check_revision(state, verified(role_keys, revision=3))
    assert again.accepted and not again.newer and same == state
    other, _ = check_revision(state, verified(role_keys, revision=3, state="paused"))
    assert not other.accepted and "equivocated" in other.reason


def test_an_abort_is_final(role_keys):
    state = require_revision({}, verified(role_keys, revision=4, state="aborted"))
    resumed, _ = check_revision(state, verified(role_keys, revision=5, state="active"))
    assert not resumed.accepted and "aborted the rollout (final)" in resumed.reason
    assert check_revision(state, verified(role_keys, revision=5, state="aborted"))[0].accepted


def test_revisions_are_kept_per_rollout(role_keys):
    state = require_revision({}, verified(role_keys, rollout_id="a", revision=9))
    decision, state = check_revision(state, verified(role_keys, rollout_id="b", revision=1))
    assert decision.accepted and decision.newer and {k: v.revision for k, v in state.items()} == {"a": 9, "b": 1}


def test_the_seen_state_round_trips_and_a_broken_one_is_refused(role_keys):
    state = require_revision({}, verified(role_keys, revision=2))
    assert parse_seen(render_seen(state)) == state
    for broken in (b"", b"[]", b'{"schema": 1, "seen": {"x": {"revision": "2", "sha256": "00", "state": "active"}}}'):
        with pytest.raises(PlanError, match="seen-revisions state is not well formed"):
            parse_seen(broken)
