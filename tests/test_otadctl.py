"""`otadctl` against a real otad-robot (with a real dashboard and gateway), plus the robot's
behaviour when its gateway goes away and its systemd notifications.

Everything runs as real processes; every wait is a condition with a deadline.
"""
from __future__ import annotations

import json
import os
import re
import socket


from conftest import assert_one_line_error
from notify import NotifySocket
from fleet import served_manifest
from harness import run_command, wait_until
from invariants import current_problem


# -- helpers ------------------------------------------------------------------------------
def ctl(robot, *args: str):
    return run_command("otadctl", "--config", str(robot.config), *args, timeout=30)


def status_json(robot) -> dict:
    result = ctl(robot, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def app_dir(site, name="robot"):
    return site.root / f"{name}-app"


def state_dir(site, name="robot"):
    return site.root / f"{name}-state"


def link(site, which: str, name="robot") -> str | None:
    try:
        return os.readlink(app_dir(site, name) / which)
    except FileNotFoundError:
        return None


def restarts(site, name="robot") -> list[str]:
    path = site.root / f"{name}-restarts.log"
    return path.read_text().splitlines() if path.exists() else []


def served(url: str) -> str | None:
    manifest = served_manifest(url)
    return manifest and manifest.get("version")


def installed_count(robot, version: str) -> int:
    return robot.log().count(f"installed app {version}")


def free_port() -> int:
    """A port nothing listens on (bound, noted, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def robot_with(site, *versions: str, direct: bool = False, **overrides):
    """A gateway and a robot that have installed `versions` in order (`direct`: the robot
    polls the dashboard itself, a source that serves whatever is published)."""
    site.release(versions[0])
    gw = site.gateway().start()
    robot = site.robot(site.dashboard.url if direct else gw.url, **overrides).start(wait_listening=False)
    robot.wait_for_log(f"installed app {versions[0]}", 30)
    for version in versions[1:]:
        site.release(version)
        wait_until(lambda v=version: installed_count(robot, v) >= 1, 30, f"the robot to install {version}")
    return gw, robot


def poll_stamp(site):
    path = state_dir(site) / "last_poll"
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def wait_for_polls(site, count: int, timeout: float) -> None:
    """Wait until STATE_DIR/last_poll has been rewritten `count` times."""
    seen = [poll_stamp(site)]

    def changed():
        stamp = poll_stamp(site)
        if stamp != seen[-1]:
            seen.append(stamp)
        return len(seen) > count

    wait_until(changed, timeout, f"{count} more polls (STATE_DIR/last_poll rewritten)", interval=0.01)


# -- 1. status ----------------------------------------------------------------------------
def test_status_json_and_human_after_two_installs(site):
    _, robot = robot_with(site, "1.0.0", "1.1.0")
    doc = status_json(robot)
    for key in ("current", "old", "new", "phase", "blacklist", "last_failure", "last_poll"):
        assert key in doc, doc
    assert doc["current"] == "1.1.0"
    assert doc["old"] == "1.0.0"
    assert doc["new"] is None
    assert doc["phase"] == "idle"
    assert doc["blacklist"] == []
    assert doc["last_failure"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["last_poll"]), doc["last_poll"]

    result = ctl(robot, "status")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.strip().splitlines())
    facts = {key.strip(): value.strip() for key, value in lines.items()}
    assert facts["current"] == "1.1.0"
    assert facts["old"] == "1.0.0"
    assert facts["new"] == "-"
    assert facts["phase"] == "idle"
    assert facts["blacklist"] == "-"
    assert facts["last failure"] == "-"
    assert facts["last poll"] >= doc["last_poll"]  # the daemon keeps polling in between


# -- 2. rollback, blacklist, unblacklist ----------------------------------------------------
def test_rollback_blacklists_until_unblacklisted(site):
    _, robot = robot_with(site, "1.0.0", "1.1.0")
    assert restarts(site) == ["restarted 1.0.0", "restarted 1.1.0"]

    result = ctl(robot, "rollback")
    assert result.returncode == 0, result.stderr
    assert "1.1.0" in result.stdout and "1.0.0" in result.stdout
    assert link(site, "CURRENT") == "releases/1.0.0"
    assert (app_dir(site) / "CURRENT" / "VERSION").read_text().strip() == "1.0.0"
    assert current_problem(app_dir(site)) is None
    assert restarts(site)[-1] == "restarted 1.0.0"
    doc = status_json(robot)
    assert doc["current"] == "1.0.0" and doc["phase"] == "idle"
    assert doc["blacklist"] == ["1.1.0"]
    assert doc["last_failure"]["version"] == "1.1.0"

    # The gateway still offers 1.1.0; the daemon must leave it alone, poll after poll.
    wait_for_polls(site, 3, timeout=15)
    assert link(site, "CURRENT") == "releases/1.0.0"
    assert installed_count(robot, "1.1.0") == 1
    assert robot.log().count("downloading app 1.1.0") == 1
    assert robot.running()

    result = ctl(robot, "unblacklist", "1.1.0")
    assert result.returncode == 0, result.stderr
    assert status_json(robot)["blacklist"] == []
    wait_until(lambda: installed_count(robot, "1.1.0") >= 2, 10, "the daemon to install 1.1.0 again")
    assert link(site, "CURRENT") == "releases/1.1.0"
    assert link(site, "OLD") == "releases/1.0.0"
    assert restarts(site)[-1] == "restarted 1.1.0"


def test_rollback_blacklist_holds_when_the_gateway_offers_the_version_again(site):
    """The release manager re-points the site to 1.0.0 and back to 1.1.0 (same files): the
    robot the operator rolled back must still refuse 1.1.0 until it is unblacklisted. (The
    robot polls the dashboard: a gateway no longer follows a re-point below the highest
    version it verified, issue 13 item 14; a compromised one still could.)"""
    _, robot = robot_with(site, "1.0.0", "1.1.0", direct=True)
    source = site.dashboard.url
    assert ctl(robot, "rollback").returncode == 0
    site.publish(site.root / "out-1.0.0-release")
    wait_until(lambda: served(source) == "1.0.0", 20, "the dashboard to serve 1.0.0")
    wait_for_polls(site, 2, timeout=15)  # the robot has seen 1.0.0
    site.publish(site.root / "out-1.1.0-release")
    wait_until(lambda: served(source) == "1.1.0", 20, "the dashboard to serve 1.1.0 again")
    wait_for_polls(site, 3, timeout=15)
    assert robot.log().count("downloading app 1.1.0") == 1, robot.new_log()[-1500:]
    assert link(site, "CURRENT") == "releases/1.0.0"
    doc = status_json(robot)
    assert doc["current"] == "1.0.0" and doc["blacklist"] == ["1.1.0"], doc


def test_unblacklist_after_automatic_blacklist_makes_the_daemon_try_again(site):
    _, robot = robot_with(site, "1.0.0", MAX_ATTEMPTS=1)
    site.release("2.0.0", selftest="echo broken >&2; exit 1")
    robot.wait_for_log("blacklisted app 2.0.0", 30)
    doc = status_json(robot)
    assert doc["current"] == "1.0.0" and doc["blacklist"] == ["2.0.0"], doc
    assert doc["last_failure"]["version"] == "2.0.0" and "broken" in doc["last_failure"]["reason"], doc

    result = ctl(robot, "unblacklist", "2.0.0")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: robot.log().count("downloading app 2.0.0") >= 2, 10, "the daemon to try 2.0.0 again")
    wait_until(lambda: robot.log().count("blacklisted app 2.0.0") >= 2, 20, "2.0.0 to fail and be blacklisted again")
    assert link(site, "CURRENT") == "releases/1.0.0"


# -- 3. busy --------------------------------------------------------------------------------
def test_refuses_while_the_daemon_is_installing(site):
    _, robot = robot_with(site, "1.0.0")
    go = site.root / "selftest-may-pass"
    site.release("2.0.0", selftest=f"while [ ! -e {go} ]; do sleep 0.1; done")
    robot.wait_for_log("activated app 2.0.0", 30)

    for args in (["rollback"], ["unblacklist", "2.0.0"]):
        result = ctl(robot, *args)
        assert_one_line_error(result, "busy")
    # Reading is always allowed, and shows what the daemon is doing.
    doc = status_json(robot)
    assert doc["phase"] == "selftest" and doc["current"] == "2.0.0" and doc["old"] == "1.0.0"
    assert "installed app 2.0.0" not in robot.log(), "the self-test finished before otadctl ran: the test proved nothing"
    assert link(site, "CURRENT") == "releases/2.0.0"  # the refused rollback changed nothing

    go.write_text("")
    robot.wait_for_log("installed app 2.0.0", 20)
    result = ctl(robot, "rollback")
    assert result.returncode == 0, result.stderr
    assert link(site, "CURRENT") == "releases/1.0.0"
    assert status_json(robot)["blacklist"] == ["2.0.0"]


# -- 4. one-line errors ---------------------------------------------------------------------
def test_one_line_errors(site):
    _, robot = robot_with(site, "1.0.0")
    assert_one_line_error(ctl(robot, "unblacklist", "9.9.9"), "9.9.9", "not blacklisted")
    assert_one_line_error(ctl(robot, "rollback"), "no OLD")
    assert link(site, "CURRENT") == "releases/1.0.0"
    assert status_json(robot)["blacklist"] == []

    bad = site.robot("http://127.0.0.1:9", name="bad", POLL_INTERVAL="abc")
    for args in (["status"], ["status", "--json"], ["rollback"], ["unblacklist", "1.0.0"]):
        assert_one_line_error(run_command("otadctl", "--config", str(bad.config), *args), "POLL_INTERVAL")
    assert_one_line_error(run_command("otadctl", "--config", str(site.root / "missing.conf"), "status"), "missing.conf")


# -- 5. gateway unreachable -----------------------------------------------------------------
def test_gateway_unreachable_backs_off_and_keeps_current(site):
    port = free_port()
    site.release("1.0.0")
    gw = site.gateway(LISTEN=f"127.0.0.1:{port}").start()
    robot = site.robot(gw.url, BACKOFF_MAX=4).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0", 30)
    assert gw.stop() == 0  # the robot keeps polling the same URL, where nothing listens now

    pattern = re.compile(r"gateway unreachable, retrying in (\d+)s")
    wait_until(lambda: len(pattern.findall(robot.new_log())) >= 6, 40, "six 'gateway unreachable' lines")
    delays = [int(n) for n in pattern.findall(robot.new_log())]
    assert all(d <= 4 for d in delays), delays
    # Exponential from 1 s with equal jitter: the n-th wait is within [ceiling/2, ceiling].
    for n, delay in enumerate(delays[:6]):
        ceiling = min(4, 2 ** n)
        assert ceiling / 2 - 0.5 <= delay <= ceiling, (n, delays)
    assert delays[0] <= 1 and max(delays[2:6]) >= 2, delays  # it grows...
    assert max(delays) <= 4  # ...and stays capped

    assert robot.running()
    assert link(site, "CURRENT") == "releases/1.0.0"
    assert current_problem(app_dir(site)) is None
    assert status_json(robot)["current"] == "1.0.0"


# -- 6. systemd -----------------------------------------------------------------------------
def test_robot_systemd_notifications(site, tmp_path):
    site.release("1.0.0")
    gw = site.gateway().start()
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        robot = site.robot(gw.url, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
        robot.start(wait_listening=False)
        wait_until(lambda: any("READY=1" in m for m in notify.drain()), 20, "READY=1")
        wait_until(lambda: any(re.search(r"STATUS=.*CURRENT app 1\.0\.0", m) for m in notify.drain()), 30,
                   "a STATUS line naming CURRENT app 1.0.0")
        wait_until(lambda: sum("WATCHDOG=1" in m for m in notify.drain()) >= 3, 10, "three watchdog pings")
        assert robot.stop() == 0
        assert any("STOPPING=1" in m for m in notify.drain()), notify.messages
    finally:
        notify.close()


# -- 7. issue 13 ----------------------------------------------------------------------------
def test_unblacklist_during_probation_is_not_undone_when_probation_ends(site):
    _, robot = robot_with(site, "1.0.0", MAX_ATTEMPTS=1, HEALTH_CMD="true", PROBATION_S=6, HEALTH_INTERVAL=1)
    site.release("2.0.0", selftest="exit 1")
    robot.wait_for_log("blacklisted app 2.0.0", 30)
    site.release("2.1.0")  # above the refused 2.0.0: the gateway never goes lower
    robot.wait_for_log("installed app 2.1.0; on probation", 30)
    assert status_json(robot)["phase"] == "probation"

    result = ctl(robot, "unblacklist", "2.0.0")
    assert result.returncode == 0, result.stderr
    assert "passed probation" not in robot.log(), "probation ended before otadctl ran: the test proved nothing"
    assert status_json(robot)["blacklist"] == []
    robot.wait_for_log("app 2.1.0 passed probation", 30)
    doc = status_json(robot)
    assert doc["phase"] == "idle" and doc["blacklist"] == [], doc
    assert doc["attempts"].get("2.0.0", 0) == 0, doc


def test_crash_at_old_linked_in_a_first_upgrade_leaves_nothing_to_roll_back_to(site):
    """kill -9 between linking OLD and CURRENT on a robot's first upgrade: recovery must not
    leave OLD pointing at CURRENT, and `otadctl rollback` must refuse rather than 'roll back'
    from 1.0.0 to 1.0.0 and blacklist the running release."""
    gw, robot = robot_with(site, "1.0.0")
    robot.stop()
    site.release("2.0.0")
    robot.env["OTAD_TEST_CRASH_AT"] = "old-linked"
    robot.start(wait_listening=False)
    wait_until(lambda: robot.proc.poll() is not None, 30, "the robot to die at old-linked")
    robot.env.pop("OTAD_TEST_CRASH_AT")
    assert gw.stop() == 0  # so the restarted robot cannot simply install 2.0.0 again
    robot.start(wait_listening=False)
    robot.wait_for_log("recovered: CURRENT is app 1.0.0")
    assert link(site, "CURRENT") == "releases/1.0.0"
    assert link(site, "OLD") is None
    assert_one_line_error(ctl(robot, "rollback"), "no OLD")
    doc = status_json(robot)
    assert doc["current"] == "1.0.0" and doc["old"] is None and doc["blacklist"] == [], doc

    # An OLD left pointing at CURRENT (e.g. by an older otad) is refused the same way.
    robot.stop()
    os.symlink("releases/1.0.0", app_dir(site) / "OLD")
    assert_one_line_error(ctl(robot, "rollback"), "no OLD")
    assert link(site, "CURRENT") == "releases/1.0.0"
    assert status_json(robot)["blacklist"] == []
