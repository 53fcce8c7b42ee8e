"""The /status page in a real browser: headless Chromium (Debian's `chromium`) during a fleet run.

A demo-like site: the real dashboard, two real gateways, three real robots
each with its real telemetry agent; a release everyone installs, then one
whose self-test fails (rollback, blacklist). Chromium renders /status; the
robots, versions, gateways and events it shows must be what /status.json says.
Screenshots (laptop and phone width) go to test-artifacts/ for a human to look at.
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from conftest import REPO
from fleet import GATEWAY_TOKEN, Site, write_tokens
from harness import wait_until

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARTIFACTS = REPO / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
SITES = {"gw-a": ("r1", "r2"), "gw-b": ("r3",)}
ROBOTS = [robot for robots in SITES.values() for robot in robots]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`; "
                                                "`make browser-deps` installs it when run as root)"),
    pytest.mark.slow,
]


def chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="otad-chromium-") as profile:
        result = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                                timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result


class StatusPage(HTMLParser):
    """What the rendered page shows: the text of robot rows, version legend, gateway cards, event rows."""

    def __init__(self) -> None:
        super().__init__()
        self.robots: list[dict[str, str]] = []
        self.versions: list[dict[str, str]] = []
        self.gateways: list[dict[str, str]] = []
        self.events: list[dict[str, str]] = []
        self._stack: list[tuple[str, str]] = []  # (tag, class) of open elements
        self._cell: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            return
        cls = dict(attrs).get("class") or ""
        classes = cls.split()
        self._stack.append((tag, cls))
        if tag == "tr" and "robot" in classes:
            self.robots.append({"gateway": self.gateways[-1].get("h3", "") if self.gateways else ""})
        elif tag == "li" and "version" in classes:
            self.versions.append({})
        elif tag == "article" and "gateway" in classes:
            self.gateways.append({})
        elif tag == "tr" and self._inside("table", "event-list") and self._inside("tbody"):
            self.events.append({"bad": "bad" in classes})
        # A cell: the outermost classed td/span/b (named by its first class), or an h3.
        if self._cell is None and tag in ("td", "span", "b", "h3") and (classes or tag == "h3"):
            self._cell, self._text, self._cell_depth = classes[0] if classes else tag, [], len(self._stack)

    def handle_startendtag(self, tag, attrs):
        pass  # <x/>: nothing to open or close

    def handle_endtag(self, tag):
        if not self._stack:
            return
        if self._cell is not None and len(self._stack) == self._cell_depth:
            self._store(self._cell, " ".join("".join(self._text).split()))
            self._cell = None
        self._stack.pop()

    def handle_data(self, data):
        if self._cell is not None and not self._inside("title"):
            self._text.append(data)

    def _inside(self, tag: str, cls: str | None = None) -> bool:
        return any(t == tag and (cls is None or cls in c.split()) for t, c in self._stack)

    def _store(self, name: str, text: str) -> None:
        if self._inside("tr") and self._inside("table", "robots") and self.robots:
            self.robots[-1].setdefault(name, text)
        elif self._inside("li") and self.versions and self._inside("ul", "legend"):
            self.versions[-1].setdefault(name, text)
        elif self._inside("table", "event-list") and self.events:
            self.events[-1].setdefault(name, text)
        elif self._inside("article", "gateway") and self.gateways:
            self.gateways[-1].setdefault(name, text)


@pytest.fixture
def fleet(tmp_path, keypair):
    key, pub = keypair
    site = Site(tmp_path, key, pub)
    tokens = {}
    for gateway, robots in SITES.items():
        (tmp_path / gateway).mkdir()
        tokens[gateway] = write_tokens(tmp_path / gateway, list(robots), gateway)
    tokens["gw-b"]["gateway_own"].write_text(GATEWAY_TOKEN + "-b\n")  # each gateway its own token
    dashboard_tokens = tmp_path / "dashboard-tokens"
    dashboard_tokens.write_text(f"gw-a {GATEWAY_TOKEN}\ngw-b {GATEWAY_TOKEN}-b\n")
    dashboard_tokens.chmod(0o600)
    site.start_dashboard(TOKENS_FILE=dashboard_tokens)
    try:
        site.release("1.0.0")
        for gw, robots in SITES.items():
            gateway = site.gateway(name=gw, TOKEN_FILE=tokens[gw]["gateway_own"], ROBOT_TOKENS_FILE=tokens[gw]["robots"]).start()
            for robot in robots:
                site.robot(gateway.url, name=robot, MAX_ATTEMPTS=1).start(wait_listening=False)
                site.agent(gateway.url, name=robot).start(wait_listening=False)
        yield site
    finally:
        site.stop_all()


def status_json(site) -> dict:
    return requests.get(f"{site.dashboard.url}/status.json", timeout=10).json()


def on_version(site, version: str, rolled_back: str | None = None) -> dict | None:
    """/status.json once every robot reports `version` (and, if given, rolled back and blacklisted that one)."""
    doc = status_json(site)
    robots = {r["robot_id"]: r for r in doc["robots"]}
    if not all(robots.get(r, {}).get("version") == version for r in ROBOTS):
        return None
    events = {(e.get("robot_id"), e.get("event"), e.get("version")) for e in doc["events"]}
    wanted = {(r, e, rolled_back) for r in ROBOTS for e in ("rolled_back", "blacklisted")} if rolled_back else set()
    return doc if wanted <= events else None


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_the_status_page_shows_what_status_json_says(fleet):
    site = fleet
    wait_until(lambda: on_version(site, "1.0.0"), 60, "every robot reporting 1.0.0 at the dashboard")
    site.release("1.1.0", selftest="echo 'arm calibration failed' >&2; exit 2")
    before = wait_until(lambda: on_version(site, "1.0.0", rolled_back="1.1.0"), 90,
                        "rollbacks of 1.1.0 on every robot, at the dashboard")

    dom = chromium("--dump-dom", f"{site.dashboard.url}/status").stdout.decode()
    after = status_json(site)
    page = StatusPage()
    page.feed(dom)

    # Robots: the same ids, versions, health, grouped under the gateways they report through.
    shown = {r["id"]: (r["gateway"], r["version"], r["health"]) for r in page.robots}
    for doc in (before, after):
        assert shown == {r["robot_id"]: (r["gateway_id"], r["version"], r["state"]) for r in doc["robots"]}
    assert len(shown) == len(ROBOTS)
    assert [g["h3"] for g in page.gateways] == [g["gateway_id"] for g in after["gateways"]] == ["gw-a", "gw-b"]
    for card, gateway in zip(page.gateways, after["gateways"]):
        assert card["badge"] == f"WAN {gateway['wan']}" == "WAN up"
        assert int(card["backlog"].replace(",", "")) >= 0
    # Versions: the legend's counts are the document's.
    assert {v["v"]: int(v["n"]) for v in page.versions} == after["versions"] == {"1.0.0": 3}
    # Events: one row each, and exactly the rollbacks and blacklistings stand out.
    assert len(page.events) == len(after["events"])
    bad_rows = [e for e in page.events if e["bad"]]
    assert len(bad_rows) == sum(e.get("event") in ("rolled_back", "blacklisted", "rejected") for e in after["events"]) == 6
    assert all(e["event"] in ("rolled_back", "blacklisted") and e["version"] == "1.1.0" for e in bad_rows)
    assert "arm calibration failed" in dom
    # Charts are drawn from the robots' history (their CPU and memory series).
    assert dom.count('class="spark"') == 2 * len(after["robots"])
    assert all(any(v is not None for v in r["cpu_series"]) for r in after["robots"])

    ARTIFACTS.mkdir(exist_ok=True)
    for name, size in (("status.png", "1280,1400"), ("status-phone.png", "390,2200")):
        target = ARTIFACTS / name
        target.unlink(missing_ok=True)
        chromium(f"--window-size={size}", f"--screenshot={target}", f"{site.dashboard.url}/status")
        assert png_size(target) == tuple(int(n) for n in size.split(","))
