"""The rollout console (/rollouts, /rollouts/<id>) in a real browser: headless Chromium (Debian's `chromium`).

The real dashboard with the rollout key, a rollout created with the real CLI,
update events from two sites forwarded as gateways forward them. Chromium is
driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`, no
extra package): the page must show the per-site counts /api/rollouts/<id>
says, and its buttons, clicked in the page with an operator token typed in,
must pause, resume and approve the rollout at the dashboard; with a wrong
token the page shows the refusal and nothing changes. Screenshots go to
test-artifacts/.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO
from harness import wait_until
from test_rollout_dashboard import (API, GATEWAY_TOKEN, OPERATOR_TOKEN, SITE_B_TOKEN, api, built, desk, forward,  # noqa: F401
                                    plan_fields, rollout, update_event, write_plan)
from test_status_browser import CHROMIUM, FLAGS, chromium, png_size

ARTIFACTS = REPO / "test-artifacts"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`; "
                                                "`make browser-deps` installs it when run as root)"),
    pytest.mark.slow,
]


class Browser:
    """Chromium with the DevTools protocol on fds 3 (commands in) and 4 (answers out), NUL-separated JSON."""

    def __init__(self) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="otad-chromium-")
        to_child, self._send = os.pipe()
        self._receive, from_child = os.pipe()

        def wire() -> None:
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}",
                                      "about:blank"], preexec_fn=wire, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next = 0
        target = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._send, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._receive, 1 << 16)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next:
                assert "error" not in answer, answer["error"]
                return answer["result"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", self.session, url=url)
        wait_until(lambda: self.js("document.readyState") == "complete" and self.js("location.href") == url, 20, f"{url} loaded")

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        # Chromium's helpers (zygote, renderer, crash handler) outlive a killed browser process and
        # still write into the profile: kill the whole group and wait until none of it runs before
        # the profile is removed (removing it earlier failed with "Directory not empty").
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        wait_until(lambda: not _group_members(self.proc.pid), 20, "chromium's helper processes to end")
        os.close(self._send)
        os.close(self._receive)
        self._profile.cleanup()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


@pytest.fixture
def browser():
    started = Browser()
    yield started
    started.close()


def shown_counts(browser: Browser) -> dict:
    """The phase table as the page shows it: (phase, site) -> {count name: number}."""
    return {(row["phase"], row["site"]): row["counts"] for row in browser.js("""
      Array.from(document.querySelectorAll('table.phases tbody tr')).map(function(tr){
        var counts = {};
        tr.querySelectorAll('td.n').forEach(function(td){ counts[td.classList[1]] = parseInt(td.textContent, 10); });
        return {phase: parseInt(tr.dataset.phase, 10), site: tr.dataset.site || 'all', counts: counts};
      })""")}


def click(browser: Browser, action: str, token: str) -> None:
    browser.js(f"document.getElementById('token').value = {json.dumps(token)};"
               f"document.querySelector('button.act.{action}').click()")


def test_the_console_shows_the_counts_and_its_buttons_steer_the_rollout(desk, browser):
    assert rollout(desk, "create", write_plan(desk, plan_fields())).returncode == 0
    forward(desk, "gw", GATEWAY_TOKEN, [
        {"id": 1, "received": time.time(), "record": update_event("r1", 1, "installed", "app-2", 0)},
        {"id": 2, "received": time.time(), "record": update_event("r1", 2, "committed", "app-2", 0)}])
    forward(desk, "gw-b", SITE_B_TOKEN, [
        {"id": 1, "received": time.time(), "record": update_event("r2", 1, "installed", "app-2", 0)}], buffer_id="b0")
    url = f"{desk.dashboard.url}/rollouts/app-2"
    browser.open(url)
    status = api(desk, "GET", f"{API}/app-2").json()
    counts = shown_counts(browser)
    for phase in status["phases"]:
        assert counts[(phase["index"], "all")] == {k: phase[k] for k in ("targeted", "waiting", "installing", "committed", "failed")}
        for site, row in phase["sites"].items():
            assert counts[(phase["index"], site)] == {k: row[k] for k in ("targeted", "waiting", "installing", "committed", "failed")}
    assert counts[(0, "gw")]["committed"] == 1 and counts[(0, "gw-b")]["installing"] == 1
    assert browser.js("document.querySelector('.badge.state').textContent") == "active"

    # A wrong token: the page says so in one line, and the plan does not change.
    click(browser, "pause", GATEWAY_TOKEN)
    refused = wait_until(lambda: "refused" in (t := browser.js("document.getElementById('result').textContent")) and t, 20,
                         "the refusal on the page")
    assert refused == "refused (401): missing or wrong operator token (a gateway token is not one)"
    assert api(desk, "GET", f"{API}/app-2").json()["revision"] == 1

    # The operator's token: pause, resume, approve, each a new revision at the dashboard, shown after the reload.
    for action, state, revision in (("pause", "paused", 2), ("resume", "active", 3), ("approve", "active", 4)):
        click(browser, action, OPERATOR_TOKEN)
        wait_until(lambda: api(desk, "GET", f"{API}/app-2").json()["revision"] == revision, 20, f"{action} at the dashboard")
        wait_until(lambda: browser.js("(document.querySelector('.revision') || {}).textContent") == str(revision), 20,
                   f"the page showing revision {revision}")
        assert browser.js("document.querySelector('.badge.state').textContent") == state
    assert api(desk, "GET", f"{API}/app-2").json()["approved_phase"] == 1

    # The list and /status show the rollout in progress.
    browser.open(f"{desk.dashboard.url}/rollouts")
    assert browser.js("document.querySelector('tr.rollout a').getAttribute('href')") == "/rollouts/app-2"
    page = requests.get(f"{desk.dashboard.url}/status", timeout=10).text
    assert 'href="/rollouts/app-2"' in page and "Rollouts in progress" in page

    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "rollout.png"
    target.unlink(missing_ok=True)
    chromium("--window-size=1280,1100", f"--screenshot={target}", url)
    assert png_size(target) == (1280, 1100)
