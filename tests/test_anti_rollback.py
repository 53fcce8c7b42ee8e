"""Anti-rollback and mix-and-match with the real daemons.

A robot never installs a version below CURRENT or below the highest version it
ever committed (state.json, which survives kill -9), unless the signed manifest
says `allow_downgrade` (otad-release build --allow-downgrade). Name, version and
digest must agree across manifest, checksum file, bundle and the archive's VERSION.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from conftest import otad_release
from fleet import served_manifest, wait_for_version
from harness import run_command, wait_until
from hostile_archives import BUILDERS, prepare_outside
from invariants import current_version, robot_state
from test_robot_unpack import publish_signed, stage_signed


@pytest.fixture
def site(site):
    """conftest's site, plus a running gateway as site.gw."""
    site.gw = site.gateway().start()
    return site


def app(site, name="robot"):
    return site.root / f"{name}-app"


def state(site, name="robot"):
    return robot_state(site.root / f"{name}-state")


def events(site, name="robot") -> list[tuple[str, str]]:
    found = [json.loads(p.read_text()) for p in sorted((site.root / f"{name}-state" / "outbox").glob("*.json"))]
    return [(e["event"], e["version"]) for e in found]


def test_lower_version_refused_until_the_signed_manifest_allows_it(site):
    """The robot's own floor. It talks to the dashboard directly here, standing in for a
    compromised gateway that serves whatever it likes (an honest gateway refuses 1.5.0 too:
    test_gateway_refuses_a_lower_version_unless_the_signed_manifest_allows_it)."""
    site.release("1.0.0")
    robot = site.robot(site.dashboard.url).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    site.release("2.0.0")
    robot.wait_for_log("installed app 2.0.0")
    assert state(site)["highest_committed"] == "2.0.0"
    # A lower, validly signed release (a replay, or a re-point without authorisation).
    site.release("1.5.0")
    line = robot.wait_for_log(r"rejected app 1\.5\.0: (.*)")[1]
    assert line == "1.5.0 is lower than CURRENT 2.0.0 and the signed manifest does not allow a downgrade", line
    assert "downloading app 1.5.0" not in robot.log()
    # The floor is on disk: a robot killed and restarted refuses it just the same.
    robot.kill9()
    robot.start(wait_listening=False)
    robot.wait_for_log("recovered: CURRENT is app 2.0.0")
    assert robot.wait_for_log(r"rejected app 1\.5\.0: (.*)")[1] == line
    # Signed with --allow-downgrade: installed, and the floor moves down with it.
    site.release("1.5.1", args=("--allow-downgrade",))
    robot.wait_for_log("installed app 1.5.1")
    assert current_version(app(site)) == "1.5.1"
    assert state(site)["highest_committed"] == "1.5.1"
    site.release("1.6.0")  # so the fix after the downgrade goes out normally
    robot.wait_for_log("installed app 1.6.0")
    assert events(site) == [("installed", "1.0.0"), ("installed", "2.0.0"), ("rejected", "1.5.0"),
                            ("rejected", "1.5.0"), ("installed", "1.5.1"), ("installed", "1.6.0")]


def test_a_robot_with_allow_downgrade_no_refuses_even_a_signed_downgrade(site):
    site.release("2.0.0")
    robot = site.robot(site.gw.url, ALLOW_DOWNGRADE="no").start(wait_listening=False)
    robot.wait_for_log("installed app 2.0.0")
    site.release("1.0.0", args=("--allow-downgrade",))
    line = robot.wait_for_log(r"rejected app 1\.0\.0: (.*)")[1]
    assert "the manifest allows a downgrade but ALLOW_DOWNGRADE=no" in line, line
    assert current_version(app(site)) == "2.0.0"


def test_operator_rollback_keeps_the_floor(site):
    """otadctl rollback is the operator's local hand: allowed below the floor. The floor
    stays at the highest committed version, so the gateway cannot walk the robot further
    down, or back up to anything in between, without a signed authorisation."""
    site.release("1.0.0")
    robot = site.robot(site.dashboard.url).start(wait_listening=False)  # no gateway's floor in between
    robot.wait_for_log("installed app 1.0.0")
    site.release("2.0.0")
    robot.wait_for_log("installed app 2.0.0")
    ctl = run_command("otadctl", "--config", str(robot.config), "rollback")
    assert ctl.returncode == 0, ctl.stderr
    assert current_version(app(site)) == "1.0.0"
    assert state(site)["highest_committed"] == "2.0.0"
    site.release("1.5.0")
    line = robot.wait_for_log(r"rejected app 1\.5\.0: (.*)")[1]
    assert line.startswith("1.5.0 is lower than the highest committed version 2.0.0"), line
    site.release("2.1.0")
    robot.wait_for_log("installed app 2.1.0")
    assert current_version(app(site)) == "2.1.0"


def gateway_refusal(site, version: str) -> str:
    return site.gw.wait_for_log(rf"rejected app {re.escape(version)}: (.*)")[1]


def test_gateway_refuses_a_lower_version_unless_the_signed_manifest_allows_it(site, monkeypatch):
    """Issue 13 (14): the gateway followed the dashboard to any lower version, so whoever could
    replay an older, still valid signed manifest (a plain-HTTP WAN, a compromised dashboard)
    froze the site on it. Its floor is the highest version it verified, on disk, kept across a
    kill -9 and a cache wiped by hand; only a signed allow_downgrade lowers it, and a replayed
    allow_downgrade manifest older than what the gateway has accepted since is refused."""
    site.release("1.0.0")
    site.release("2.0.0")
    wait_for_version(site.gw.url, "2.0.0")
    site.release("1.5.0")
    assert gateway_refusal(site, "1.5.0") == ("1.5.0 is lower than the highest version this gateway verified 2.0.0 "
                                              "and the signed manifest does not allow a downgrade; keeping app 2.0.0")
    assert served_manifest(site.gw.url)["version"] == "2.0.0"
    assert not (site.root / "gw-state" / "cache" / "files" / "app-v1.5.0.tar.gz").exists()
    # The floor is on disk, apart from the cache: kill -9, cache wiped, restarted: still refused.
    site.gw.kill9()
    shutil.rmtree(site.root / "gw-state" / "cache")
    site.gw.start()
    assert gateway_refusal(site, "1.5.0").startswith("1.5.0 is lower than the highest version this gateway verified 2.0.0")
    assert served_manifest(site.gw.url) is None
    # Signed with --allow-downgrade: followed, and the floor moves down with it.
    now = int(time.time())
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(now + 100))  # `created`, so the order below does not hang on a second
    downgrade = site.build("1.5.1", args=("--allow-downgrade",))
    site.publish(downgrade)
    wait_for_version(site.gw.url, "1.5.1")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(now + 200))
    site.release("1.6.0")
    wait_for_version(site.gw.url, "1.6.0")
    # The downgrade's manifest replayed after 1.6.0: it allows a downgrade, but it is older than 1.6.0's.
    for name in ("manifest.json.bundle", "manifest.json"):
        (site.ota / f".{name}.tmp").write_bytes((downgrade / name).read_bytes())
        os.replace(site.ota / f".{name}.tmp", site.ota / name)
    line = gateway_refusal(site, "1.5.1")
    assert line.startswith("1.5.1 is lower than the highest version this gateway verified 1.6.0; the manifest allows a "
                           "downgrade but was created at "), line
    assert "before the newest manifest accepted so far" in line, line
    assert served_manifest(site.gw.url)["version"] == "1.6.0"


def test_archive_whose_version_file_disagrees_is_refused_by_gateway_and_robot(site, tmp_path):
    """A signed archive of one version relabelled as another (VERSION says 99.0.0)."""
    outside = tmp_path / "outside"
    prepare_outside(outside)
    site.release("1.0.0")
    wait_for_version(site.gw.url, "1.0.0")
    staged = stage_signed(site, BUILDERS["version-mismatch"](tmp_path / "hostile", "1.0.1", outside), "1.0.1", tmp_path / "signed")
    publish_signed(site, staged)
    line = site.gw.wait_for_log(r"rejected app 1\.0\.1: (.*)")[1]
    assert line.startswith("archive VERSION says '99.0.0', the manifest says '1.0.1'"), line
    assert served_manifest(site.gw.url)["version"] == "1.0.0"
    # A robot that talks to the dashboard itself checks VERSION when it unpacks.
    robot = site.robot(site.dashboard.url).start(wait_listening=False)
    line = robot.wait_for_log(r"rejected app 1\.0\.1: (.*)")[1]
    assert "archive VERSION says '99.0.0'" in line, line
    assert current_version(app(site)) is None


def test_manifest_pointing_at_another_versions_files_is_refused(site):
    """Signed 1.1.0 manifest naming 1.0.0's (also signed) artifact: the names must say the version."""
    site.release("1.0.0")
    wait_for_version(site.gw.url, "1.0.0")
    out = site.build("1.1.0")
    doc = json.loads((site.ota / "manifest.json").read_text())
    doc["version"] = "1.1.0"
    path = out / "manifest.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    signed = otad_release("sign", "--key", str(site.key), "--bundle", str(out / "manifest.json.bundle"), str(path))
    assert signed.returncode == 0, signed.stderr
    refused = otad_release("publish", "--from", str(out), "--to", str(site.ota))
    assert refused.returncode == 1 and "manifest field 'artifact' is 'app-v1.0.0.tar.gz', expected 'app-v1.1.0.tar.gz'" in refused.stderr
    for name in ("manifest.json.bundle", "manifest.json"):  # published by hand regardless
        (site.ota / f".{name}.tmp").write_bytes((out / name).read_bytes())
        (site.ota / f".{name}.tmp").rename(site.ota / name)
    line = site.gw.wait_for_log(r"rejected app 1\.1\.0: (.*)")[1]
    assert line.startswith("manifest field 'artifact' is 'app-v1.0.0.tar.gz', expected 'app-v1.1.0.tar.gz'"), line
    wait_until(lambda: served_manifest(site.gw.url)["version"] == "1.0.0", 5, "1.0.0 still served")
