"""The robot side of rollouts (issue 15): a real otad-robot, real HTTP, real keys.

The gateway side of rollouts is written in parallel, so the robot's gateway here
is a stand-in: `HostileServer` (tests/test_hostile_release.py) serves a real
signed release built by `otad-release build` (tests/fleet.py Site.build) and a
`/rollout.json` (Wire 2, docs/formats.md) holding plans signed in the test with a
rollout key from `otad-release keygen` (conftest.role_keys). Everything else is
real: the robot's config, keys, token, HTTP client, plan verification, anti-replay
state and installer; and, for events, a real telemetry agent posting to a real
gateway's POST /metrics (the shared record validator), read back from its SQLite.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from fleet import Site, robot_token, write_tokens
from harness import run_command, wait_until
from invariants import current_version, robot_state
from rollouts import plan_doc
from test_hostile_release import HostileServer, wait_for_reason
from otad.rollout.plan import plan_from_doc
from otad.rollout.signed import sign_plan
from otad.trust.keys import load_private_key

# The rollout daemons' tests run once, in make check's first pass (current PyPI), and not again
# on the bookworm pins: they exercise otad's rollout logic through the same HTTP and crypto calls
# that the other daemon tests, which do run there, already cover (CI time).
pytestmark = pytest.mark.slow

CORPUS = Path(__file__).parent / "corpus"
ROLLOUT_CASES = json.loads((CORPUS / "rollout-cases.json").read_text())
ROBOT = "r1"
TIMEOUT = 30


def stamp(offset: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset))


def plan(**fields) -> dict:
    """A plan document moving 1.0.0 to 2.0.0 whose canary names this robot, expiring in a day."""
    doc = plan_doc(**{"rollout_id": "app-2.0.0", "expires": stamp(86400), "approved_phase": 2, **fields})
    if "phases" not in fields:
        doc["phases"][0]["robots"] = [ROBOT, "b1"]
    return doc


def base_plan() -> dict:
    """Brings a fresh robot to 1.0.0: every robot, one phase."""
    return plan_doc(rollout_id="base-1.0.0", version="1.0.0", expires=stamp(86400), **{"from": []},
                    phases=[{"robots": [], "percent": 100, "min_soak_s": 0, "advance": "auto", "halt": {}}],
                    offline_max_phase=0, approved_phase=0)


def item(doc: dict, key) -> dict:
    signed = sign_plan(plan_from_doc(doc), key)
    return {"plan": signed.data.decode(), "bundle": json.loads(signed.bundle)}


def body(*items: dict) -> bytes:
    return json.dumps({"plans": list(items)}).encode()


@pytest.fixture
def rolls(tmp_path, keypair, role_keys):
    """A Site whose robot's gateway is a HostileServer, with 1.0.0, 2.0.0 and 3.0.0 built."""
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    site.server = HostileServer()
    site.rollout_key = role_keys["rollout"][0]
    site.other_key = role_keys["release"][0]  # a key this robot trusts for nothing
    site.release_key = load_private_key(key.read_bytes(), b"test-password", key.name)
    site.rollout_pub = role_keys["folder"] / "rollout.pub"
    site.out = {v: site.build(v) for v in ("1.0.0", "2.0.0", "3.0.0")}
    site.token_file = tmp_path / f"{ROBOT}-agent.token"
    site.token_file.write_text(robot_token(ROBOT) + "\n")
    site.token_file.chmod(0o600)
    yield site
    site.stop_all()
    site.server.close()


def serve(site: Site, version: str, rollout: bytes | None) -> None:
    site.server.serve_release(site.out[version], **({"/rollout.json": rollout} if rollout is not None else {}))


def rollout_robot(site: Site, **overrides):
    return site.robot(site.server.url, ROBOT, ROLLOUT_KEYS=site.rollout_pub, TOKEN_FILE=site.token_file, **overrides)


def app(site: Site) -> Path:
    return site.root / f"{ROBOT}-app"


def on_version(site: Site, version: str) -> None:
    wait_until(lambda: current_version(app(site)) == version and robot_state(site.root / f"{ROBOT}-state")["phase"] == "idle",
               TIMEOUT, f"robot on {version}")


def start_on_1(site: Site, **overrides):
    """A robot with ROLLOUT_KEYS, brought to 1.0.0 by a base plan."""
    serve(site, "1.0.0", body(item(base_plan(), site.rollout_key)))
    robot = rollout_robot(site, **overrides).start(wait_listening=False)
    on_version(site, "1.0.0")
    return robot


def refused(site: Site, robot, version: str, rollout: bytes, fragment: str) -> str:
    """Serve `version` with this /rollout.json; the robot must log its refusal and keep 1.0.0."""
    offset = len(robot.log())
    serve(site, version, rollout)
    line = wait_for_reason(robot, offset, fragment, TIMEOUT)
    assert line is not None, robot.log()[offset:]
    assert current_version(app(site)) == "1.0.0"
    assert robot.running()
    return line


def outbox(site: Site) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((site.root / f"{ROBOT}-state" / "outbox").glob("*.json"))]


def gateway_events(gw_state: Path) -> list[dict]:
    try:
        with sqlite3.connect(gw_state / "telemetry.db") as db:
            rows = db.execute("SELECT body FROM records WHERE kind = 'event' ORDER BY id").fetchall()
    except sqlite3.Error:
        return []
    return [json.loads(b) for (b,) in rows]


def test_a_plan_that_assigns_the_version_installs_and_its_events_carry_rollout_and_phase(rolls):
    site = rolls
    tokens = write_tokens(site.root, [ROBOT])
    # Only its POST /metrics matters here; its dashboard is unreachable (port 9: discard).
    gw = site.gateway(dashboard_url="http://127.0.0.1:9", ROBOT_TOKENS_FILE=tokens["robots"]).start()
    start_on_1(site, PROBATION_S=2, HEALTH_CMD="true", HEALTH_INTERVAL=1)
    site.agent(gw.url, ROBOT, token_file=site.token_file).start(wait_listening=False)
    serve(site, "2.0.0", body(item(base_plan(), site.rollout_key), item(plan(), site.rollout_key)))
    on_version(site, "2.0.0")
    wanted = [("installed", "2.0.0"), ("committed", "2.0.0")]

    def tagged():
        events = [e for e in gateway_events(site.root / "gw-state") if e.get("rollout_id") == "app-2.0.0"]
        return [(e["event"], e["version"]) for e in events] == wanted and events

    events = wait_until(tagged, TIMEOUT, "installed and committed of 2.0.0 at the gateway, with rollout_id")
    assert all(e["phase"] == 0 for e in events)
    base = [e for e in gateway_events(site.root / "gw-state") if e.get("rollout_id") == "base-1.0.0"]
    assert [(e["event"], e["phase"]) for e in base] == [("installed", 0), ("committed", 0)]
    # The token went with every request to the gateway: plans, manifest, bundle, release files.
    paths = {p for p, _ in site.server.requests}
    assert {"/rollout.json", "/manifest", "/manifest.bundle"} <= paths and any(p.startswith("/ota/") for p in paths)
    assert {auth for _, auth in site.server.requests} == {f"Bearer {robot_token(ROBOT)}"}
    assert robot_token(ROBOT) not in (site.root / f"{ROBOT}.log").read_text()


def test_a_version_outside_the_plan_is_refused(rolls):
    """A compromised gateway offers a signed 3.0.0 that no plan assigns."""
    site = rolls
    robot = start_on_1(site)
    line = refused(site, robot, "3.0.0", body(item(plan(), site.rollout_key)), "refused app 3.0.0 for robot r1")
    assert "3.0.0 is not assigned to r1" in line
    events = outbox(site)
    assert events[-1]["event"] == "rejected" and events[-1]["version"] == "3.0.0"


def test_a_robot_outside_the_cohort_is_refused(rolls):
    site = rolls
    robot = start_on_1(site)
    phases = [{"robots": ["other"], "percent": 0, "min_soak_s": 0, "advance": "auto", "halt": {}}]
    line = refused(site, robot, "2.0.0", body(item(plan(phases=phases, offline_max_phase=0, approved_phase=0), site.rollout_key)),
                   "r1 is in no phase of rollout app-2.0.0")  # a poll may first refuse it under the base plan
    assert "refused app 2.0.0 for robot r1" in line


def test_an_old_revision_replayed_after_a_newer_one_is_refused_also_after_a_restart(rolls):
    site = rolls
    robot = start_on_1(site)
    newer = item(plan(revision=2, state="paused", reason="operator pause"), site.rollout_key)
    refused(site, robot, "2.0.0", body(newer), "rollout app-2.0.0 is paused")
    older = body(item(plan(revision=1), site.rollout_key))
    refused(site, robot, "2.0.0", older, "revision 1 is older than revision 2, already seen: a replay")
    robot.stop()
    robot.start(wait_listening=False)
    offset = len(robot.log())
    line = wait_for_reason(robot, offset, "refused app 2.0.0 for robot r1", TIMEOUT)
    assert line is not None and "no current signed rollout plan assigns 2.0.0" in line, robot.log()[offset:]
    assert "a replay" in robot.log()[offset:]
    assert current_version(app(site)) == "1.0.0"
    seen = json.loads((site.root / f"{ROBOT}-state" / "rollout-seen.json").read_text())
    assert seen["seen"]["app-2.0.0"]["revision"] == 2


@pytest.mark.parametrize("signer, fragment", [
    ("other_key", "plan signature"),
    ("release_key", "plan is signed by the release key release.pub"),
])
def test_a_plan_signed_by_an_untrusted_key_or_by_the_release_key_is_refused(rolls, signer, fragment):
    site = rolls
    robot = start_on_1(site)
    offset = len(robot.log())
    refused(site, robot, "2.0.0", body(item(plan(), getattr(site, signer))), "refused app 2.0.0 for robot r1")
    # The robot reads /rollout.json and then /manifest: a poll between the two can see 2.0.0 with the
    # base plan and refuse it for that reason first; the next poll, under the new plans, names the key.
    wait_until(lambda: fragment in robot.log()[offset:], TIMEOUT, f"robot to log {fragment!r}")


def test_an_aborted_plan_with_rollback_returns_the_robot_to_its_from_version(rolls):
    """The one downgrade below the floor a plan authorises: back to what this robot came from."""
    site = rolls
    robot = start_on_1(site)
    active = item(plan(), site.rollout_key)
    serve(site, "2.0.0", body(active))
    on_version(site, "2.0.0")
    # Paused: robots keep what they have, and the floor rule stands (1.0.0 is not signed as a downgrade).
    offset = len(robot.log())
    serve(site, "1.0.0", body(item(plan(revision=2, state="paused"), site.rollout_key)))
    assert wait_for_reason(robot, offset, "refused app 1.0.0 for robot r1", TIMEOUT) is not None, robot.log()[offset:]
    assert current_version(app(site)) == "2.0.0"
    aborted = item(plan(revision=3, state="aborted", reason="canary failed"), site.rollout_key)
    serve(site, "1.0.0", body(aborted))
    on_version(site, "1.0.0")
    state = robot_state(site.root / f"{ROBOT}-state")
    assert state["highest_committed"] == "1.0.0"  # the floor follows the authorised return
    # The abort authorises exactly the version this robot came from, nothing lower, nothing else.
    offset = len(robot.log())
    serve(site, "3.0.0", body(aborted))
    assert wait_for_reason(robot, offset, "refused app 3.0.0 for robot r1", TIMEOUT) is not None, robot.log()[offset:]
    assert current_version(app(site)) == "1.0.0"


def test_without_rollout_keys_the_robot_installs_the_newest_release_as_before(rolls):
    site = rolls
    serve(site, "1.0.0", None)
    site.robot(site.server.url, ROBOT).start(wait_listening=False)
    on_version(site, "1.0.0")
    serve(site, "3.0.0", body(item(plan(), site.rollout_key)))  # a plan that assigns something else
    on_version(site, "3.0.0")
    assert "/rollout.json" not in {p for p, _ in site.server.requests}
    assert {auth for _, auth in site.server.requests} == {None}
    # The event follows the state write that makes the robot idle: wait for it.
    events = wait_until(lambda: len(e := outbox(site)) == 2 and e, TIMEOUT, "two installed events")
    assert [e["event"] for e in events] == ["installed", "installed"] and not any("rollout_id" in e for e in events)


@pytest.mark.parametrize("case", [
    ("no-token-file", {}, "ROLLOUT_KEYS needs TOKEN_FILE"),
    ("world-readable-token", {"mode": 0o644}, "token file is readable or writable by every user"),
    ("release-key-as-rollout-key", {"rollout": "release"}, "is also a release key"),
], ids=lambda c: c[0])
def test_bad_rollout_config_stops_the_robot_with_one_line(rolls, case):
    site = rolls
    name, how, fragment = case
    values = {"ROLLOUT_KEYS": site.rollout_pub, "TOKEN_FILE": site.token_file}
    if name == "no-token-file":
        del values["TOKEN_FILE"]
    if "mode" in how:
        site.token_file.chmod(how["mode"])
    if how.get("rollout") == "release":
        values["ROLLOUT_KEYS"] = site.pub
    robot = site.robot(site.server.url, ROBOT, **values)
    result = run_command("otad-robot", "--config", str(robot.config), "--check-config")
    assert result.returncode == 1, result
    assert fragment in result.stderr and robot_token(ROBOT) not in result.stderr + result.stdout


def corpus_body(site: Site, case: dict) -> bytes:
    """A corpus file with its placeholders filled: `"{{PLAN}}"` a genuine plan's canonical text,
    `"{{BUNDLE}}"` its real rollout-key bundle, `"{{TAMPERED}}"` that plan with one field changed
    after signing. So a refusal must come from the robot's own checks, not a missing signature."""
    genuine = item(plan(), site.rollout_key)
    tampered = genuine["plan"].replace('"revision":1', '"revision":9')
    text = (CORPUS / "rollout" / case["file"]).read_bytes()
    for name, value in (("PLAN", genuine["plan"]), ("BUNDLE", genuine["bundle"]), ("TAMPERED", tampered)):
        text = text.replace(b'"{{%s}}"' % name.encode(), json.dumps(value).encode())
    return text


def test_rollout_corpus_is_refused_by_a_real_robot(rolls):
    """tests/corpus/rollout-cases.json: each hostile /rollout.json beside a genuine signed 2.0.0."""
    site = rolls
    robot = start_on_1(site)
    for case in ROLLOUT_CASES:
        offset = len(robot.log())
        serve(site, "2.0.0", corpus_body(site, case))
        line = wait_for_reason(robot, offset, case["expect"], TIMEOUT)
        assert line is not None, (case["id"], robot.log()[offset:])
        assert wait_for_reason(robot, offset, "refused app 2.0.0 for robot r1", TIMEOUT) is not None, case["id"]
        assert current_version(app(site)) == "1.0.0" and robot.running(), case["id"]
    serve(site, "2.0.0", body(item(plan(), site.rollout_key)))
    on_version(site, "2.0.0")


def test_every_rollout_corpus_file_has_a_row_and_every_row_a_file():
    files = {p.name for p in (CORPUS / "rollout").iterdir()}
    assert files == {case["file"] for case in ROLLOUT_CASES}
