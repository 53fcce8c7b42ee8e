"""Signed plans: sign with the rollout key, verify against ROLLOUT_KEYS, expiry, anti-replay.

The signature machinery is the release manifest's (trust/signing.py, a Sigstore
v0.3 bundle from trust/bundle.py, trust/verify.py's key search), over a
different message: not the plan's bytes but DSSE's pre-authentication encoding
PAE(PAYLOAD_TYPE, plan bytes). So the two key roles cannot stand in for each
other even if an operator lists one key in both places by mistake:

- a rollout key's signature is over "DSSEv1 <len> application/vnd.otad.rollout-plan..."
  bytes, which are never a manifest (not JSON), so it can never verify a release;
- a release key's signature over a manifest is over bare JSON, never a PAE, so a
  release bundle can never verify a plan; and a plan that a release key did sign
  as a plan is refused by name (`release_keys`), since only ROLLOUT_KEYS count.

`check_key_split` (used by keyconfig.rollout_keys) refuses a key that is both.

Anti-replay is `check_revision`: state in, decision and new state out. It keeps,
per rollout_id, the highest revision seen and the digest of its bytes: an older
revision is refused (a replay), the same revision with other bytes is refused
(the signer equivocated), and `aborted` is final.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping

from cryptography.hazmat.primitives.asymmetric import ec

from otad.errors import ChecksumMismatch, MalformedMetadata, TrustError
from otad.rollout.plan import MAX_PLAN_BYTES, Plan, PlanError, parse_plan, render_plan
from otad.trust.bundle import render_bundle
from otad.trust.keys import PublicKey, public_key_hint
from otad.trust.metadata import describe_age
from otad.trust.signing import sign_digest
from otad.trust.verify import verify_cosign_signature

PAYLOAD_TYPE = "application/vnd.otad.rollout-plan.v1+json"
MAX_SEEN = 10_000  # rollout ids remembered; a robot sees a handful in its life


class UntrustedPlan(TrustError):
    """A well-formed plan that must not be believed: signature, key, expiry or replay."""


class ExpiredPlan(UntrustedPlan):
    """Correctly signed, but past its `expires`."""


class ReplayedPlan(UntrustedPlan):
    """A revision older than one already seen, or the same revision with other content."""


@dataclass(frozen=True)
class SignedPlan:
    data: bytes  # the canonical plan bytes (render_plan)
    bundle: bytes  # Sigstore v0.3 bundle over sha256(PAE(PAYLOAD_TYPE, data))


@dataclass(frozen=True)
class VerifiedPlan:
    plan: Plan
    key: str  # the ROLLOUT_KEYS key file that signed it
    sha256: str  # of the plan bytes: with the revision, what check_revision remembers


@dataclass(frozen=True)
class SeenRevision:
    revision: int
    sha256: str
    state: str


@dataclass(frozen=True)
class RevisionDecision:
    accepted: bool
    reason: str
    newer: bool = False  # the plan moved forward (False for the same revision again)


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the bytes actually signed."""
    kind = payload_type.encode("ascii")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


def plan_digest(data: bytes) -> bytes:
    return hashlib.sha256(pae(PAYLOAD_TYPE, data)).digest()


def sign_plan(plan: Plan, key: ec.EllipticCurvePrivateKey) -> SignedPlan:
    """The plan's canonical bytes and their bundle, signed with the rollout key."""
    data = render_plan(plan)
    digest = plan_digest(data)
    return SignedPlan(data, render_bundle(sign_digest(key, digest), digest, public_key_hint(key.public_key())))


def verify_plan(data: bytes, bundle: bytes, rollout_keys: tuple[PublicKey, ...] | list[PublicKey], now: float | None,
                release_keys: tuple[PublicKey, ...] | list[PublicKey] = (), grace: float = 0.0) -> VerifiedPlan:
    """Accept a plan: well formed, canonical, signed by a rollout key, not expired.

    `release_keys` (TRUSTED_KEYS) only sharpen the refusal of a plan one of them
    signed; they never make a plan acceptable. `now=None` skips expiry (a
    caller re-reading what it verified when it was fresh).
    """
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(f"plan is larger than {MAX_PLAN_BYTES} bytes")
    plan = parse_plan(data)
    if render_plan(plan) != data:
        raise PlanError("plan is not in canonical form (sorted keys, no spaces, every field): sign it with otad's signer")
    key = _signer(data, bundle, rollout_keys, release_keys)
    expired_for = 0.0 if now is None else now - plan.expires_epoch
    if expired_for > grace:
        raise ExpiredPlan(f"plan {plan.rollout_id} revision {plan.revision} expired at {plan.expires}, {describe_age(expired_for)} ago")
    return VerifiedPlan(plan, key, hashlib.sha256(data).hexdigest())


def _signer(data: bytes, bundle: bytes, rollout_keys, release_keys) -> str:
    if not bundle:
        raise UntrustedPlan("plan is not signed: empty plan bundle")
    if not rollout_keys:
        raise UntrustedPlan("no rollout key is trusted (ROLLOUT_KEYS is empty)")
    digest = plan_digest(data)
    try:
        return verify_cosign_signature(digest, bundle, rollout_keys).name
    except MalformedMetadata as exc:
        raise PlanError(f"plan signature: {exc}") from None
    except ChecksumMismatch:
        # Checked before any key: the bundle's messageDigest names other bytes (tampered, or
        # a release's bundle, which signs bare manifest bytes rather than a plan's PAE).
        raise UntrustedPlan("plan signature: the bundle signs other bytes than this plan "
                            "(changed after signing, or not a plan signature)") from None
    except TrustError as exc:
        refusal = exc
    for release_key in release_keys:
        try:
            verify_cosign_signature(digest, bundle, (release_key,))
        except TrustError:
            continue
        raise UntrustedPlan(f"plan is signed by the release key {release_key.name}; "
                            "plans must be signed by a rollout key (ROLLOUT_KEYS)") from None
    raise UntrustedPlan(f"plan signature: {refusal}") from None


def check_key_split(trusted: tuple[PublicKey, ...], rollout: tuple[PublicKey, ...]) -> None:
    """A key may sign releases or plans, never both: raise ValueError naming the key."""
    release_hints = {k.hint: k.name for k in trusted}
    for key in rollout:
        if key.hint in release_hints:
            raise ValueError(f"{key.name} is also a release key ({release_hints[key.hint]} in TRUSTED_KEYS): "
                             "the rollout key must be a separate key")


def check_revision(seen: Mapping[str, SeenRevision], verified: VerifiedPlan) -> tuple[RevisionDecision, dict[str, SeenRevision]]:
    """The anti-replay rule: keep the highest revision seen per rollout_id.

    Returns the decision and the state to keep (unchanged when refused). Pure:
    the caller persists the state (before acting on the plan) and passes it back.
    """
    plan = verified.plan
    last = seen.get(plan.rollout_id)
    state = dict(seen)
    if last is None:
        if len(seen) >= MAX_SEEN:
            # Forget the rollout least likely to come back: the lowest revision among the finished ones.
            oldest = min(seen, key=lambda rid: (seen[rid].state != "aborted", seen[rid].revision))
            del state[oldest]
        state[plan.rollout_id] = SeenRevision(plan.revision, verified.sha256, plan.state)
        return RevisionDecision(True, f"first revision seen ({plan.revision})", newer=True), state
    where = f"plan {plan.rollout_id} revision {plan.revision}"
    if plan.revision < last.revision:
        return RevisionDecision(False, f"{where} is older than revision {last.revision}, already seen: a replay"), dict(seen)
    if plan.revision == last.revision:
        if verified.sha256 != last.sha256:
            return RevisionDecision(False, f"{where} differs from the revision {last.revision} already seen: the signer equivocated"), dict(seen)
        return RevisionDecision(True, f"revision {plan.revision} again"), dict(seen)
    if last.state == "aborted" and plan.state != "aborted":
        return RevisionDecision(False, f"{where} is {plan.state}, but revision {last.revision} aborted the rollout (final)"), dict(seen)
    state[plan.rollout_id] = SeenRevision(plan.revision, verified.sha256, plan.state)
    return RevisionDecision(True, f"revision {plan.revision} replaces {last.revision}", newer=True), state


def require_revision(seen: Mapping[str, SeenRevision], verified: VerifiedPlan) -> dict[str, SeenRevision]:
    """check_revision that raises ReplayedPlan on a refusal; returns the new state."""
    decision, state = check_revision(seen, verified)
    if not decision.accepted:
        raise ReplayedPlan(decision.reason)
    return state


def render_seen(seen: Mapping[str, SeenRevision]) -> bytes:
    doc = {rid: {"revision": s.revision, "sha256": s.sha256, "state": s.state} for rid, s in seen.items()}
    return (json.dumps({"schema": 1, "seen": doc}, sort_keys=True, indent=1) + "\n").encode("ascii")


def parse_seen(data: bytes) -> dict[str, SeenRevision]:
    """The persisted anti-replay state; a malformed file is a PlanError (never silently empty:
    an empty state would let every old revision in again)."""
    try:
        doc = json.loads(data)
        entries = doc["seen"] if doc.get("schema") == 1 else None
        if not isinstance(entries, dict) or len(entries) > MAX_SEEN:
            raise ValueError
        seen = {}
        for rid, entry in entries.items():
            revision, digest, state = entry["revision"], entry["sha256"], entry["state"]
            if not (isinstance(revision, int) and not isinstance(revision, bool) and isinstance(digest, str)
                    and len(digest) == 64 and state in ("active", "paused", "aborted")):
                raise ValueError
            seen[rid] = SeenRevision(revision, digest, state)
        return seen
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError, RecursionError):
        raise PlanError("the seen-revisions state is not well formed") from None
