"""otad-robot through a real dashboard and gateway: install, self-test, rollback, blacklist, crashes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import otad_release
from fleet import wait_for_version
from harness import wait_until
from otad.transfer.http import content_etag
from invariants import committed_and_sound, current_problem, current_version, robot_state
from otad.robot.crashpoints import INSTALL_STEPS, ROLLBACK_STEPS


@pytest.fixture
def site(site):
    """conftest's site, plus a running gateway as site.gw."""
    site.gw = site.gateway().start()
    return site


def app_dir(site, name="robot"):
    return site.root / f"{name}-app"


def state_dir(site, name="robot"):
    return site.root / f"{name}-state"


def restarts(site, name="robot"):
    path = site.root / f"{name}-restarts.log"
    return path.read_text().split("\n")[:-1] if path.exists() else []


def test_installs_v1_then_v2_with_current_and_old(site):
    site.release("1.0.0")
    robot = site.robot(site.gw.url).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    assert current_version(app_dir(site)) == "1.0.0"
    assert not os.path.lexists(app_dir(site) / "OLD")
    site.release("2.0.0")
    robot.wait_for_log("installed app 2.0.0")
    assert current_version(app_dir(site)) == "2.0.0"
    assert os.readlink(app_dir(site) / "OLD") == "releases/1.0.0"
    assert not os.path.lexists(app_dir(site) / "NEW")
    assert current_problem(app_dir(site)) is None
    assert restarts(site) == ["restarted 1.0.0", "restarted 2.0.0"]
    assert (app_dir(site) / "CURRENT" / "bin" / "app").read_bytes().startswith(b"#!/bin/sh")
    events = sorted((state_dir(site) / "outbox").glob("*.json"))
    assert [json.loads(p.read_text())["event"] for p in events] == ["installed", "installed"]
    # Lower or equal versions are not installed.
    site.release("1.5.0")
    wait_until(lambda: (state_dir(site) / "last_poll").exists(), 5, "a poll")
    first = (state_dir(site) / "last_poll").read_text()
    wait_until(lambda: (state_dir(site) / "last_poll").read_text() != first, 10, "another poll")
    assert current_version(app_dir(site)) == "2.0.0"
    assert "downloading app 1.5.0" not in robot.log()


@pytest.mark.parametrize("selftest,reason", [("echo 'wheels jammed' >&2; exit 3", "self-test failed (exit 3): wheels jammed"),
                                             ("sleep 30", "self-test failed (timed out after 2s)")])
def test_failed_self_test_rolls_back_then_blacklists(site, selftest, reason):
    site.release("1.0.0")
    robot = site.robot(site.gw.url, MAX_ATTEMPTS=2, SELFTEST_TIMEOUT=2).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    site.release("1.1.0", selftest=selftest)
    robot.wait_for_log(r"blacklisted app 1\.1\.0 after 2 failed attempts", timeout=40)
    assert current_version(app_dir(site)) == "1.0.0"
    assert current_problem(app_dir(site)) is None
    state = robot_state(state_dir(site))
    assert state["blacklist"] == ["1.1.0"]
    assert state["last_failure"]["version"] == "1.1.0"
    assert state["last_failure"]["reason"].startswith(reason)
    assert robot.log().count("rolled back app 1.1.0 to 1.0.0") == 2
    assert not (app_dir(site) / "releases" / "1.1.0").exists()
    # Not downloaded again: wait for more polls, then count.
    polls = (state_dir(site) / "last_poll")
    seen = {polls.read_text()}
    wait_until(lambda: seen.add(polls.read_text()) or len(seen) >= 3, 15, "two more polls")
    assert robot.log().count("downloading app 1.1.0") == 2
    assert restarts(site)[-1] == "restarted 1.0.0"
    events = [json.loads(p.read_text()) for p in sorted((state_dir(site) / "outbox").glob("*.json"))]
    assert [e["event"] for e in events] == ["installed", "rolled_back", "rolled_back", "blacklisted"]


def test_probation_health_failure_rolls_back(site):
    flag = site.root / "unhealthy"
    site.release("1.0.0")
    robot = site.robot(site.gw.url, HEALTH_CMD=f"test ! -e {flag}", PROBATION_S=60, HEALTH_INTERVAL=1).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    site.release("1.1.0")
    robot.wait_for_log("installed app 1.1.0; on probation for 60s")
    assert robot_state(state_dir(site))["phase"] == "probation"
    flag.write_text("crashing")
    robot.wait_for_log("rolled back app 1.1.0 to 1.0.0: health check failed during probation")
    assert current_version(app_dir(site)) == "1.0.0"
    assert current_problem(app_dir(site)) is None


def test_robot_verifies_for_itself(site, tmp_path):
    """A gateway that trusts another key, or a server that lies, cannot get a release unpacked."""
    stranger = tmp_path / "stranger"
    assert otad_release("keygen", "--output-prefix", str(stranger)).returncode == 0
    site.release("1.0.0")
    robot = site.robot(site.gw.url).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    # A second gateway that trusts the stranger's key serves the stranger's release.
    rogue = site.gateway(name="rogue", TRUSTED_KEYS=f"{site.pub} {stranger.with_suffix('.pub')}").start()
    site.publish(site.build("2.0.0", key=stranger.with_suffix(".key")))
    wait_for_version(rogue.url, "2.0.0")
    robot2 = site.robot(rogue.url, name="robot2").start(wait_listening=False)
    robot2.wait_for_log(r"rejected app 2\.0\.0: manifest signature: signed by an unknown key")
    assert not (app_dir(site, "robot2") / "releases" / "2.0.0").exists()
    # The robot talking straight to the dashboard, where an artifact was changed after publishing.
    out = site.build("3.0.0")
    site.publish(out)
    data = bytearray((site.ota / "app-v3.0.0.tar.gz").read_bytes())
    data[-100] ^= 0xFF
    (site.ota / "app-v3.0.0.tar.gz").write_bytes(bytes(data))
    robot3 = site.robot(site.dashboard.url, name="robot3").start(wait_listening=False)
    robot3.wait_for_log(r"rejected app 3\.0\.0: sha256 is")
    assert not (app_dir(site, "robot3") / "releases" / "3.0.0").exists()
    events = [json.loads(p.read_text())["event"] for p in (state_dir(site, "robot3") / "outbox").glob("*.json")]
    assert events == ["rejected"]


@pytest.mark.parametrize("step", INSTALL_STEPS)
def test_kill_at_every_install_step_recovers(site, step):
    site.release("1.0.0")
    robot = site.robot(site.gw.url).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    robot.stop()
    site.release("2.0.0")
    robot.env["OTAD_TEST_CRASH_AT"] = step
    robot.start(wait_listening=False)
    wait_until(lambda: robot.proc.poll() is not None, 30, f"the robot to die at {step}")
    assert robot.proc.returncode == -9
    robot.env.pop("OTAD_TEST_CRASH_AT")
    robot.start(wait_listening=False)
    robot.wait_for_log("recovered: CURRENT is app")
    assert committed_and_sound(app_dir(site), state_dir(site)) is None
    wait_until(lambda: current_version(app_dir(site)) == "2.0.0" and robot_state(state_dir(site))["phase"] == "idle",
               30, "2.0.0 committed")
    assert committed_and_sound(app_dir(site), state_dir(site)) is None
    leftovers = {p.name for p in (app_dir(site) / "releases").iterdir()}
    assert leftovers == {"1.0.0", "1.0.0.ok", "2.0.0", "2.0.0.ok"}
    assert not os.path.lexists(app_dir(site) / "NEW")




@pytest.mark.parametrize("step", ROLLBACK_STEPS)
def test_kill_at_every_rollback_step_recovers(site, step):
    site.release("1.0.0")
    robot = site.robot(site.gw.url, MAX_ATTEMPTS=1).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    robot.stop()
    site.release("2.0.0", selftest="exit 1")
    robot.env["OTAD_TEST_CRASH_AT"] = step
    robot.start(wait_listening=False)
    wait_until(lambda: robot.proc.poll() is not None, 30, f"the robot to die at {step}")
    robot.env.pop("OTAD_TEST_CRASH_AT")
    robot.start(wait_listening=False)
    robot.wait_for_log("recovered: CURRENT is app 1.0.0")
    assert committed_and_sound(app_dir(site), state_dir(site)) is None
    state = robot_state(state_dir(site))
    assert state["blacklist"] == ["2.0.0"] and state["attempts"] == {"2.0.0": 1}
    assert not (app_dir(site) / "releases" / "2.0.0").exists()


@pytest.mark.slow
def test_fifty_random_kills_always_leave_a_sound_current(site):
    """kill -9 at random moments of 50 installs, a quarter of them failing their self-test."""
    seed = int(os.environ.get("OTAD_KILL_SEED", "20261126"))
    rng = random.Random(seed)
    site.release("1.0.0")
    robot = site.robot(site.gw.url, MAX_ATTEMPTS=2).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    newest_good, failing, phases = "1.0.0", [], []
    for number in range(1, 51):
        version = f"1.{number}.0"
        passes = rng.random() > 0.25
        site.release(version, selftest="sleep 0.3" if passes else "sleep 0.3; exit 1")
        newest_good = version if passes else newest_good
        failing += [] if passes else [version]
        robot.wait_for_log(f"downloading app {version}", timeout=20)
        try:  # the kill lands anywhere in download, verify, unpack, activation, self-test or rollback
            robot.proc.wait(rng.uniform(0.0, 0.8))
        except subprocess.TimeoutExpired:
            pass
        robot.kill9()
        phases.append(robot_state(state_dir(site))["phase"])
        assert current_problem(app_dir(site)) is None, f"seed {seed}, kill {number}"
        robot.start(wait_listening=False)
        robot.wait_for_log("recovered: CURRENT is app")
        assert committed_and_sound(app_dir(site), state_dir(site)) is None, f"seed {seed}, kill {number}"
    wait_until(lambda: current_version(app_dir(site)) == newest_good and robot_state(state_dir(site))["phase"] == "idle",
               60, f"convergence to {newest_good} (seed {seed})")
    assert committed_and_sound(app_dir(site), state_dir(site)) is None
    installed = [json.loads(p.read_text()) for p in (state_dir(site) / "outbox").glob("*.json")]
    assert not {e["version"] for e in installed if e["event"] == "installed"} & set(failing)
    # The kills really landed inside installs, not only between them.
    assert sum(phase != "idle" for phase in phases) >= 10, phases


def _plant_corrupt_part(site, manifest: dict) -> None:
    """Half a download on disk whose bytes are not the release's (a disk fault, a torn write)."""
    downloads = state_dir(site) / "downloads"
    downloads.mkdir(parents=True)
    part = downloads / f"{manifest['artifact']}.part"
    part.write_bytes(b"\0" * (manifest["size"] // 2))
    meta = {"url": f"{site.gw.url}/ota/{manifest['artifact']}", "size": manifest["size"], "etag": content_etag(manifest["sha256"])}
    part.with_name(part.name + ".meta").write_text(json.dumps(meta))


@pytest.mark.parametrize("cause", ["corrupt-part", "clock-ahead"])
def test_a_refused_release_is_held_back_then_taken_at_once_after_sighup(site, cause):
    """Issue 13 (8): the robot kept the ETag of a manifest it had refused, so every later
    poll was a 304: once the cause was gone (the corrupt .part deleted, a clock that ran
    ahead set right) it never looked again, not even after SIGHUP. The refusal must
    hold the manifest back (no download every poll) and a SIGHUP must retry it at once.
    (The hold's own expiry, 10 minutes, is tested on the real class in test_polling.py.)"""
    manifest = site.release("1.0.0", size=256 * 1024)
    wait_for_version(site.gw.url, "1.0.0")
    if cause == "corrupt-part":
        _plant_corrupt_part(site, manifest)
        robot = site.robot(site.gw.url).start(wait_listening=False)
        robot.wait_for_log(r"rejected app 1\.0\.0: sha256 is")
        assert not (state_dir(site) / "downloads" / f"{manifest['artifact']}.part").exists()
    else:  # the robot's clock 35 days ahead: the 30-day manifest looks expired beyond a 1-day grace
        robot = site.robot(site.gw.url, env={"OTAD_TEST_CLOCK_SKEW": str(35 * 86400)}, MANIFEST_GRACE_S=86400)
        robot.start(wait_listening=False)
        robot.wait_for_log(r"rejected app 1\.0\.0: manifest expired at")
    # Three more polls: held back, no second download or refusal.
    last_poll = state_dir(site) / "last_poll"
    seen = [last_poll.stat().st_mtime_ns]
    wait_until(lambda: (seen.append(last_poll.stat().st_mtime_ns) or len(set(seen)) >= 4), 15, "three more polls")
    assert robot.log().count("rejected app 1.0.0") == 1
    assert robot.log().count("downloading app 1.0.0") == (1 if cause == "corrupt-part" else 0)
    if cause == "clock-ahead":  # the operator allows for it (the clock itself cannot be set right here)
        robot.config.write_text(robot.config.read_text().replace("MANIFEST_GRACE_S=86400", "MANIFEST_GRACE_S=864000"))
    robot.signal(signal.SIGHUP)
    robot.wait_for_log("installed app 1.0.0", timeout=20)
    assert current_version(app_dir(site)) == "1.0.0"


# -- issue 13 ------------------------------------------------------------------------------
def test_kills_during_a_self_test_do_not_blacklist_a_good_release(site):
    """kill -9 (power, OOM killer, watchdog) in the middle of a self-test, three times: the
    release did not fail, so it is not a failed attempt; once the robot is left alone it installs."""
    go = site.root / "selftest-may-pass"
    site.release("1.0.0")
    robot = site.robot(site.gw.url, MAX_ATTEMPTS=2, SELFTEST_TIMEOUT=60).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    site.release("1.1.0", selftest=f"while [ ! -e {go} ]; do sleep 0.1; done")
    for kill in range(3):
        wait_until(lambda: robot_state(state_dir(site)).get("phase") == "selftest", 30, f"self-test {kill + 1} to run")
        robot.kill9()
        robot.start(wait_listening=False)
        robot.wait_for_log("recovered: CURRENT is app 1.0.0")
        assert committed_and_sound(app_dir(site), state_dir(site)) is None
    state = robot_state(state_dir(site))
    assert state["blacklist"] == [] and state.get("attempts", {}).get("1.1.0", 0) == 0, state
    go.write_text("")
    robot.wait_for_log("installed app 1.1.0", timeout=30)
    assert current_version(app_dir(site)) == "1.1.0"
    assert robot_state(state_dir(site))["blacklist"] == []


def test_slow_restart_and_self_test_keep_the_watchdog_fed(site, tmp_path):
    """RESTART_CMD and a self-test that together last far longer than the worker's allowed
    silence (STALL_TIMEOUT=2): the robot shows progress while they run within their deadline,
    so the watchdog keeps being pinged and the release is installed, not killed mid-test."""
    from notify import NotifySocket

    notify = NotifySocket(tmp_path / "notify.sock")
    pings = lambda: sum("WATCHDOG=1" in m for m in notify.drain())  # noqa: E731
    try:
        site.release("1.0.0")
        robot = site.robot(site.gw.url, STALL_TIMEOUT=2, CONNECT_TIMEOUT=1, READ_TIMEOUT=1, SELFTEST_TIMEOUT=20,
                           env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}).start(wait_listening=False)
        robot.wait_for_log("installed app 1.0.0")
        site.release("1.1.0", selftest="sleep 8")
        wait_until(lambda: robot_state(state_dir(site))["phase"] == "selftest", 30, "the self-test to start")
        before = pings()
        # At one ping per 0.5 s, ten pings take 5 s: more than twice STALL_TIMEOUT, all inside the self-test.
        wait_until(lambda: pings() >= before + 10, 15, "ten watchdog pings during the self-test")
        assert robot_state(state_dir(site))["phase"] == "selftest", "the self-test ended too soon: the test proved nothing"
        robot.wait_for_log("installed app 1.1.0", timeout=30)
        assert "worker stalled" not in robot.log()
        assert robot.running()
    finally:
        notify.close()


def _stepped_robot(site, step_file, **overrides):
    """A robot whose wall clock the test can step (tests/clockstep/sitecustomize.py)."""
    step_file.write_text("0")
    clockstep = os.path.join(os.path.dirname(__file__), "clockstep")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (clockstep, os.environ.get("PYTHONPATH")) if p),
           "OTAD_TEST_WALL_STEP_FILE": str(step_file)}
    return site.robot(site.gw.url, env=env, HEALTH_INTERVAL=1, **overrides)


def test_probation_is_not_skipped_by_a_clock_stepped_forward(site):
    """The wall clock jumps a day ahead just after the commit: probation must still run its
    course (a failing health check still rolls back), and the floor stays until it passed."""
    flag = site.root / "unhealthy"
    site.release("1.0.0")
    robot = _stepped_robot(site, site.root / "step", HEALTH_CMD=f"test ! -e {flag}", PROBATION_S=600).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    site.release("1.1.0")
    robot.wait_for_log("installed app 1.1.0; on probation")
    assert robot_state(state_dir(site))["highest_committed"] == "1.0.0"  # raised only once probation has passed
    (site.root / "step").write_text(str(24 * 3600))
    flag.write_text("crashing")
    robot.wait_for_log("rolled back app 1.1.0 to 1.0.0: health check failed during probation", timeout=20)
    assert "passed probation" not in robot.log()
    state = robot_state(state_dir(site))
    assert state["highest_committed"] == "1.0.0" and current_version(app_dir(site)) == "1.0.0", state


def test_probation_is_not_stretched_by_a_clock_stepped_back(site):
    """The wall clock jumps a day back just after the commit: a 3 s probation still ends after
    about 3 s of health checks, survives a restart in the middle, and then raises the floor."""
    site.release("1.0.0")
    robot = _stepped_robot(site, site.root / "step", HEALTH_CMD="true", PROBATION_S=3).start(wait_listening=False)
    robot.wait_for_log("installed app 1.0.0")
    site.release("1.1.0")
    robot.wait_for_log("installed app 1.1.0; on probation")
    (site.root / "step").write_text(str(-24 * 3600))
    robot.stop()
    robot.start(wait_listening=False)
    robot.wait_for_log("app 1.1.0 passed probation", timeout=20)
    state = robot_state(state_dir(site))
    assert state["phase"] == "idle" and state["highest_committed"] == "1.1.0", state


def test_waits_between_polls_longer_than_the_allowed_silence_are_not_a_stall(site, tmp_path):
    """POLL_INTERVAL (or a backoff up to BACKOFF_MAX=300) beyond the worker's allowed silence:
    a planned wait is not a hang, so the watchdog keeps being pinged across it."""
    from notify import NotifySocket

    notify = NotifySocket(tmp_path / "notify.sock")
    pings = lambda: sum("WATCHDOG=1" in m for m in notify.drain())  # noqa: E731
    try:
        site.release("1.0.0")
        robot = site.robot(site.gw.url, STALL_TIMEOUT=2, POLL_INTERVAL=20,
                           env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}).start(wait_listening=False)
        robot.wait_for_log("installed app 1.0.0")
        settled = pings()
        wait_until(lambda: pings() >= settled + 2, 10, "the worker to settle into its wait")
        polled = (state_dir(site) / "last_poll").stat().st_mtime_ns
        before = pings()
        wait_until(lambda: pings() >= before + 10, 15, "ten watchdog pings while the worker waits for its next poll")
        assert (state_dir(site) / "last_poll").stat().st_mtime_ns == polled, "it polled meanwhile: the test proved nothing"
        assert "worker stalled" not in robot.log()
    finally:
        notify.close()


def test_a_command_wedged_past_its_deadline_stops_the_watchdog_pings(site, tmp_path):
    """The beat proves progress, it does not merely beat: a self-test that leaves a process
    holding its output open cannot be reaped at its deadline (SELFTEST_TIMEOUT=2), and from
    then on the worker shows nothing, so the ping is withheld and systemd would restart it."""
    from notify import NotifySocket

    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        site.release("1.0.0")
        robot = site.robot(site.gw.url, STALL_TIMEOUT=2, SELFTEST_TIMEOUT=2,
                           env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}).start(wait_listening=False)
        robot.wait_for_log("installed app 1.0.0")
        site.release("1.1.0", selftest="setsid sleep 20 & sleep 10")
        robot.wait_for_log(r"worker stalled \(worker\); withholding the watchdog ping", timeout=30)
        notify.drain()
        notify.messages.clear()
        # The stall is logged once, not at every turn: absence of pings is judged over six ping
        # periods (WATCHDOG_USEC=1 s: a healthy robot pings every 0.5 s), by the monotonic clock.
        window_ends = time.monotonic() + 3
        wait_until(lambda: time.monotonic() > window_ends, 10, "six watchdog periods to pass")
        assert not any("WATCHDOG=1" in m for m in notify.drain()), notify.messages
        assert robot_state(state_dir(site))["phase"] == "selftest"
    finally:
        notify.close()
