"""Power cuts under otad-gateway: its STATE_DIR (release cache, telemetry buffer, release floor) on the layer.

The dashboard runs on the normal file system; the gateway's STATE_DIR is on the power-loss
layer (tests/lazyfs.py). Three robots (one thread each) POST telemetry batches the way
telemetry-agent does: a batch is resent whole until the gateway answers 200, and counts as
acknowledged once `accepted + duplicates` covers it. Each cut: the dashboard may be stopped
for a stretch (the buffer fills) or started again (it forwards); a release may be published,
genuine, or hostile (its artifact tampered and published by hand before its manifest, or
signed by an unknown key), or the tampered one repaired (the operator removes its artifact
and publishes the genuine release of that version); at a random moment of the download, verification, buffer
inserts or forwarding, the power goes (powerloop.PowerLayer.cut), and the gateway restarts.
After every cut, on the disk as the cut left it and again after the restart:

- the cache holds and serves only genuine releases: every versions/<v>.json is the signed
  manifest of a genuine release, every full-size file of it is byte-equal to the genuine
  one; GET /manifest, /manifest.bundle and /ota/<file> answer only genuine bytes (the
  hostile artifacts 404), the served manifest verifies, and its version never drops below
  what robots were already served; release-floor.json never moves backwards and is never
  below what is served; a genuine release is never refused;
- the telemetry buffer: every record the gateway acknowledged is in its buffer or at the
  dashboard; the dashboard never stores a record twice (one row per (robot, boot, seq), its
  per-robot `records` counter equal to the rows held), nothing is quarantined or refused.

At the end, without cuts, the dashboard runs, the buffer drains fully and the dashboard
holds every acknowledged record exactly once; the gateway converges to a last genuine release.
Run: `python tests/powercut_gateway.py` (POWER_CUTS, POWER_SEED, POWER_SECONDS);
tests/test_powercut_gateway.py runs a short one.
"""
from __future__ import annotations

import base64
import json
import random
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import otad_release  # noqa: E402
from fleet import write_tokens  # noqa: E402
from harness import wait_until  # noqa: E402
from powerloop import PowerLayer, Report, soak_main  # noqa: E402
from powercut_telemetry import Robot, buffered_records, dashboard_held  # noqa: E402
from otad.fsutil import fsync_dir  # noqa: E402
from otad.semver import Version  # noqa: E402
from otad.trust.keys import load_public_key_files  # noqa: E402
from otad.trust.metadata import verify_manifest  # noqa: E402
from otad.trust.verify import TrustAnchors  # noqa: E402

ROBOTS = ("r1", "r2", "r3")
RELEASE_FILES = ("manifest.json", "manifest.json.bundle")


class GatewayPowerCuts:
    """One gateway on the layer, between the site's real dashboard and robots posting over real HTTP."""

    def __init__(self, site, seed: int) -> None:
        self.site = site
        self.seed = seed
        self.rng = random.Random(seed)
        self.report = Report("gateway", seed)
        self.disk = site.root / "gateway-disk"
        self.mnt = site.root / "gateway-fs"
        self.layer = PowerLayer(self.disk, self.mnt, self.rng, self.report)
        self.anchors = TrustAnchors(cosign_keys=tuple(load_public_key_files([str(site.pub)])))
        self.genuine: dict[str, dict[str, bytes]] = {}  # version -> file name -> bytes
        self.hostile: set[str] = set()  # artifact names that must never be served
        self.served_high: str | None = None
        self.floor_high: str | None = None
        self.robots: list[Robot] = []
        self.dashboard_db = site.root / "dashboard-state" / "telemetry.db"
        self.daemon = None
        self.url = ""
        self.number = 0
        self.verbose = False
        self.stranger: Path | None = None
        self.tampered: tuple[str, Path] | None = None  # the last release published, if tampered: (version, build)
        self.repaired: dict[str, int] = {}  # version -> the gateway log's length when it was repaired

    # -- releases -----------------------------------------------------------------------

    def publish(self, kind: str) -> str:
        if kind == "repaired":
            version, out = self.tampered
            self.repaired[version] = len(self.daemon.log())
            manifest = json.loads((out / "manifest.json").read_text())
            (self.site.ota / manifest["artifact"]).unlink()
            self.hostile.discard(manifest["artifact"])
            self.genuine[version] = self.release_files(out)
            self.site.publish(out)
            self.tampered = None
            return version
        self.tampered = None
        self.number += 1
        version = f"1.{self.number}.0"
        size = self.rng.choice([64, 1024, 4096]) * 1024
        if kind == "unknown-key":
            out = self.site.build(version, size, key=self.stranger_key())
            self.site.publish(out)
            self.hostile.add(json.loads((out / "manifest.json").read_text())["artifact"])
            return version
        out = self.site.build(version, size)
        manifest = json.loads((out / "manifest.json").read_text())
        if kind == "tampered":
            self.hostile.add(manifest["artifact"])
            self.site.publish_tampered(out)
            self.tampered = (version, out)
            return version
        self.genuine[version] = self.release_files(out)
        self.site.publish(out)
        return version

    @staticmethod
    def release_files(out: Path) -> dict[str, bytes]:
        manifest = json.loads((out / "manifest.json").read_text())
        names = (*RELEASE_FILES, manifest["artifact"], manifest["bundle"], manifest["checksum"])
        return {name: (out / name).read_bytes() for name in names}

    def stranger_key(self) -> Path:
        if self.stranger is None:
            self.stranger = self.site.root / "keys-stranger"
            result = otad_release("keygen", "--output-prefix", str(self.stranger))
            assert result.returncode == 0, result.stderr
        return self.stranger.with_suffix(".key")

    # -- invariants ---------------------------------------------------------------------

    def cache_problems(self, state: Path) -> list[str]:
        """The cache and floor as found in `state` (the disk as the cut left it)."""
        problems = []
        cache = state / "cache"
        for entry in sorted((cache / "versions").glob("*.json")) if (cache / "versions").is_dir() else []:
            version = entry.stem
            genuine = self.genuine.get(version)
            if genuine is None:
                problems.append(f"cache holds versions/{entry.name}, not a genuine release")
                continue
            try:
                doc = json.loads(entry.read_bytes())
            except ValueError:
                continue  # unreadable: the gateway drops it at start (checked after the restart)
            manifest = json.loads(genuine["manifest.json"])
            for name in (manifest["artifact"], manifest["bundle"], manifest["checksum"]):
                path = cache / "files" / name
                if path.is_file() and path.stat().st_size == len(genuine[name]) and path.read_bytes() != genuine[name]:
                    problems.append(f"cache files/{name} of {version} has its full size and other bytes")
            if base64.b64decode(doc.get("manifest", "")) != genuine["manifest.json"]:
                problems.append(f"cache versions/{entry.name} does not hold the genuine manifest of {version}")
        served = cache / "manifest.json"
        if served.is_file() and served.stat().st_size and not any(served.read_bytes() == g["manifest.json"] for g in self.genuine.values()):
            problems.append("cache manifest.json is not the manifest of a genuine release")
        problems += self.floor_problems(state, served)
        return problems

    def floor_problems(self, state: Path, served: Path) -> list[str]:
        try:
            floor = json.loads((state / "release-floor.json").read_text())["highest"]
        except FileNotFoundError:
            floor = None
        except (ValueError, KeyError) as exc:
            return [f"release-floor.json unreadable: {exc}"]
        problems = []
        if self.floor_high and (floor is None or Version(floor) < Version(self.floor_high)):
            problems.append(f"anti-rollback floor moved backwards: {self.floor_high} -> {floor}")
        try:
            active = json.loads(served.read_bytes())["version"]
        except (OSError, ValueError, KeyError):
            active = None
        if active and (floor is None or Version(floor) < Version(active)):
            problems.append(f"floor {floor} is below the cached manifest.json's {active}")
        if floor and (self.floor_high is None or Version(floor) > Version(self.floor_high)):
            self.floor_high = floor
        return problems

    def served_problems(self) -> list[str]:
        """What the restarted gateway serves over HTTP."""
        problems = []
        response = requests.get(f"{self.url}/manifest", timeout=10)
        if response.status_code == 200:
            bundle = requests.get(f"{self.url}/manifest.bundle", timeout=10).content
            version = next((v for v, g in self.genuine.items() if g["manifest.json"] == response.content), None)
            if version is None:
                problems.append("GET /manifest is not the manifest of a genuine release")
            elif bundle != self.genuine[version]["manifest.json.bundle"]:
                problems.append(f"GET /manifest.bundle is not the genuine bundle of {version}")
            else:
                verify_manifest(response.content, bundle, self.anchors, now=None)
                if self.served_high and Version(version) < Version(self.served_high):
                    problems.append(f"served version went back: {self.served_high} -> {version}")
                floor = self.live_floor()
                if floor is None or Version(version) > Version(floor):
                    problems.append(f"serving {version} above the floor on disk {floor}")
        elif response.status_code != 404 or self.served_high:
            problems.append(f"GET /manifest answered {response.status_code} (served {self.served_high} before)")
        for version, files in self.genuine.items():
            for name, data in files.items():
                if name in RELEASE_FILES:
                    continue
                got = requests.get(f"{self.url}/ota/{name}", timeout=30)
                if got.status_code == 200 and got.content != data:
                    problems.append(f"GET /ota/{name} of {version} is not the genuine file")
        problems += self.refusals()
        for name in self.hostile:
            if requests.get(f"{self.url}/ota/{name}", timeout=30).status_code != 404:
                problems.append(f"GET /ota/{name} serves a hostile artifact")
        return problems

    def refusals(self) -> list[str]:
        """A genuine release refused: every one is newer than the last served (a repaired one is the last published)."""
        log = self.daemon.log()
        problems = []
        for match in re.finditer(r"rejected app (\S+): (.*)", log):
            version = match[1]
            if version in self.genuine and match.start() > self.repaired.get(version, -1):
                problems.append(f"refused the genuine release {version}: {match[2][:200]}")
        return problems

    def live_floor(self) -> str | None:
        """The running gateway's floor. An open racing its rename can fail with ENOENT on this layer
        (tests/lazyfs.py): retried, as only a name missing three times in a row is missing."""
        for _ in range(3):
            try:
                return json.loads((self.mnt / "state" / "release-floor.json").read_text())["highest"]
            except FileNotFoundError:
                time.sleep(0.2)
        return None

    def telemetry_problems(self, db: Path, live: bool = False) -> list[str]:
        # Acknowledged first, then the buffer, then the dashboard: a record forwarded and deleted
        # between the two reads is at the dashboard by the second.
        acked = {(robot.robot, seq) for robot in self.robots for seq in set(robot.acked)}
        problems = []
        try:
            held = buffered_records(db, live)
        except (AssertionError, sqlite3.DatabaseError) as exc:
            return [f"telemetry buffer: {exc}"]
        at_dashboard, twice = dashboard_held(self.dashboard_db, ROBOTS)
        lost = acked - held - at_dashboard
        if lost:
            problems.append(f"{len(lost)} acknowledged records neither buffered nor at the dashboard, e.g. {sorted(lost)[:5]}")
        if twice:
            problems.append(f"the dashboard stored records twice: {twice[:5]}")
        refused = sum(robot.refused for robot in self.robots)
        if refused:
            problems.append(f"the gateway refused {refused} records as seq going backwards")
        return problems

    # -- the run ------------------------------------------------------------------------

    def gateway(self):
        tokens = self.site.tokens
        return self.site.gateway(STATE_DIR=self.mnt / "state", TOKEN_FILE=tokens["gateway_own"],
                                 ROBOT_TOKENS_FILE=tokens["robots"], FORWARD_BATCH=50, CACHE_KEEP_VERSIONS=2)

    def start_gateway(self) -> None:
        self.daemon.start()
        self.url = self.daemon.url

    def log_phases(self) -> set[str]:
        """What the gateway and the robots were doing at the instant of the cut."""
        log = self.daemon.new_log()
        phases = set()
        started = {m[1]: m.end() for m in re.finditer(r"downloading app (\S+) \(", log)}
        for version, at in started.items():
            if not re.search(rf"(verified app|rejected app) {re.escape(version)}\b", log[at:]):
                phases.add("release")
        if any(robot.in_flight for robot in self.robots):
            phases.add("insert")
        if self.site.dashboard.running():
            acked = {(robot.robot, seq) for robot in self.robots for seq in set(robot.acked)}
            if acked - dashboard_held(self.dashboard_db, ROBOTS)[0]:
                phases.add("forward")
        return phases or {"idle"}

    def note_served(self) -> None:
        """The highest version the gateway logged serving (it logs after the cache's manifest.json is durable)."""
        for version in re.findall(r"verified app (\S+) .*serving it to robots", self.daemon.new_log()):
            if self.served_high is None or Version(version) > Version(self.served_high):
                self.served_high = version

    def run(self, cuts: int, seconds: float | None = None) -> Report:
        """`cuts` power cuts, fewer if `seconds` run out first (the report says how many)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            return self._run(cuts, deadline)
        finally:
            for robot in self.robots:
                robot.stop.set()
            if self.daemon is not None:
                self.daemon.kill9()
            self.layer.close()

    def _run(self, cuts: int, deadline: float | None) -> Report:
        self.layer.mount()
        (self.mnt / "state").mkdir()  # STATE_DIR exists, durably, as the Debian package lays it out
        fsync_dir(self.mnt)
        self.publish("genuine")
        self.daemon = self.gateway()
        self.start_gateway()
        self.daemon.pin_port()  # the robots keep its address across restarts
        self.daemon.wait_for_log(r"verified app 1\.1\.0", timeout=60)
        self.robots = [Robot(lambda: self.url, name, self.rng.randrange(1 << 30)) for name in ROBOTS]
        for robot in self.robots:
            robot.start()
        for number in range(1, cuts + 1):
            if deadline is not None and time.monotonic() > deadline:
                print(f"time budget spent after {self.report.cuts} cuts", flush=True)
                break
            problems = self.one_cut(number)
            if problems:
                self.report.violations += problems
                break
        if not self.report.violations:
            self.report.violations += [f"seed {self.seed}, at the end: {p}" for p in self.drain()]
        self.daemon.kill9()
        return self.report

    def one_cut(self, number: int) -> list[str]:
        dashboard = self.site.dashboard
        if dashboard.running() and self.rng.random() < 0.2:
            dashboard.stop()  # a WAN outage: the buffer fills
        elif not dashboard.running() and self.rng.random() < 0.5:
            dashboard.start()
        kind = "none"
        if dashboard.running():
            kind = self.rng.choices(["none", "genuine", "tampered", "unknown-key", "repaired"],
                                    [3, 5, 2, 1, 4 if self.tampered else 0])[0]
        if kind != "none":
            version = self.publish(kind)
            self.daemon.wait_for_log(rf"downloading app {re.escape(version)} |rejected app {re.escape(version)}:", timeout=60)
        try:  # the cut lands anywhere in the download, verification, inserts or forwarding
            self.daemon.proc.wait(self.rng.uniform(0.0, 0.6 if kind != "none" else 1.5))
        except subprocess.TimeoutExpired:
            pass
        self.note_served()
        phases = self.log_phases()
        self.report.phases.update(phases)
        self.layer.cut(self.daemon)
        self.report.cuts += 1
        problems = self.cache_problems(self.disk / "state") + self.telemetry_problems(self.disk / "state" / "telemetry.db")
        self.layer.mount()
        self.start_gateway()
        after = self.served_problems() + self.telemetry_problems(self.mnt / "state" / "telemetry.db", live=True)
        problems = [f"seed {self.seed}, cut {number}: {p}" for p in problems]
        problems += [f"seed {self.seed}, cut {number}, after restart: {p}" for p in after]
        if self.verbose:
            print(f"cut {number}: {kind} release, dashboard {'up' if dashboard.running() else 'down'}, "
                  f"phases {'+'.join(sorted(phases))}, {'torn' if self.layer.lazy.torn else 'whole'} writes lost, "
                  f"{'VIOLATION' if problems else 'invariants hold'}", flush=True)
        return problems

    def drain(self) -> list[str]:
        """Without cuts: the robots' last batches acknowledged, the buffer drained, every record held once."""
        if not self.site.dashboard.running():
            self.site.dashboard.start()
        for robot in self.robots:
            robot.finishing = True
        for robot in self.robots:
            robot.join(60)
        version = self.publish("genuine")
        problems = []
        acked = {(robot.robot, seq) for robot in self.robots for seq in robot.acked}
        try:
            wait_until(lambda: acked <= dashboard_held(self.dashboard_db, ROBOTS)[0], 90, "every acknowledged record at the dashboard")
            wait_until(lambda: not buffered_records(self.mnt / "state" / "telemetry.db", live=True), 30, "the gateway's buffer drained")
            self.daemon.wait_for_log(rf"verified app {re.escape(version)} ", timeout=60)
        except AssertionError as exc:
            problems.append(str(exc))
        self.note_served()
        problems += self.served_problems() + self.telemetry_problems(self.mnt / "state" / "telemetry.db", live=True)
        sent = {(robot.robot, seq) for robot in self.robots for seq in range(1, robot.next_seq)}
        extra = dashboard_held(self.dashboard_db, ROBOTS)[0] - sent
        if extra:
            problems.append(f"the dashboard holds records never sent: {sorted(extra)[:5]}")
        if self.served_high != version:
            problems.append(f"the gateway serves {self.served_high}, not the last release {version}")
        return problems


def start_gateway_loop(site, seed: int) -> GatewayPowerCuts:
    site.tokens = write_tokens(site.root, list(ROBOTS))
    site.start_dashboard(TOKENS_FILE=site.tokens["dashboard"])
    return GatewayPowerCuts(site, seed)


if __name__ == "__main__":
    sys.exit(soak_main("gateway", start_gateway_loop))
