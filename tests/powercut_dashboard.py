"""Power cuts under otad-dashboard and `otad-release publish`: OTA_DIR and STATE_DIR on the power-loss layer.

The dashboard runs with its OTA_DIR and its STATE_DIR (telemetry.db, its only state)
on the layer of tests/lazyfs.py. Two posters send telemetry batches to it all the
time, as a gateway's forwarder does (gzip, the gateway's token, a batch resent until
the dashboard acknowledges it). Each cut is one of:

- a publish: a release is built (its artifact 16 KiB to 8 MiB, so cuts land mid-copy)
  and `otad-release publish --from OUT --to OTA_DIR` runs as a process; one in five
  republishes the newest release after `otad-release refresh` (new manifest, same
  artifact). The cut lands at a random time, or at a step of the publish seen by
  inotify on the mount (a temp file created, a name renamed in), where the publisher
  is frozen (SIGSTOP) and the power cut at that instant;
- ingest only: the cut lands at a random moment of the telemetry flow.

After every cut, on the backing folder as the cut left it and again over HTTP after
the dashboard's restart:

- the manifest the dashboard serves (manifest.json with manifest.json.bundle, read
  by the dashboard's own OtaFolder) is a verified pair whose artifact, signature and
  checksum file verify: never a missing or short artifact, never a mismatched bundle;
- it is byte for byte a manifest that was published (never torn), and not older
  than the last publish that finished before the cut;
- a real gateway, pointed at the dashboard, accepts what it serves after the restart;
- every batch the dashboard acknowledged (2xx) is in telemetry.db exactly once, and
  the database passes integrity_check; the dashboard restarts cleanly each time.

The publisher's steps and the posters are in tests/powercut_drivers.py.
Each mount draws, from the seed, whether it tears writes. Run:
`python tests/powercut_dashboard.py` (POWER_CUTS, POWER_SEED, POWER_SECONDS, see
tests/powerloop.py); tests/test_powercut_dashboard.py runs a short one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import BIN, otad_release  # noqa: E402
from fleet import dashboard_records, write_tokens  # noqa: E402
from harness import wait_until  # noqa: E402
from powercut_drivers import Killable, Poster, PublishWatch  # noqa: E402
from powerloop import PowerLayer, Report, soak_main  # noqa: E402
from otad.dashboard.ota import OtaFolder  # noqa: E402
from otad.errors import OtadError  # noqa: E402
from otad.fsutil import fsync_dir  # noqa: E402
from otad.manifest_pair import BUNDLE_NEXT, MANIFEST_NEXT  # noqa: E402
from otad.trust.keys import load_public_key_files  # noqa: E402
from otad.trust.manifest import parse_manifest  # noqa: E402
from otad.trust.metadata import MANIFEST, MANIFEST_BUNDLE, verify_manifest  # noqa: E402
from otad.trust.verify import TrustAnchors, verify_artifact  # noqa: E402

SIZES = (16 * 1024, 256 * 1024, 2 * 1024 * 1024, 8 * 1024 * 1024)
# The steps of a publish that a targeted cut may land on: (inotify event, file name or its role). The
# staged pair's names (otad.manifest_pair) are written by publish since the fix of the publish order.
TARGETS = (("create", "artifact"), ("moved", "artifact"), ("create", "signature"), ("create", "checksum"),
           ("create", BUNDLE_NEXT), ("create", MANIFEST_NEXT), ("moved", MANIFEST_NEXT),
           ("moved", MANIFEST_BUNDLE), ("moved", MANIFEST))
KEEP_RELEASES = 3  # older releases are deleted from OTA_DIR, as an operator would, to bound the layer's memory


class DashboardPowerCuts:
    """The dashboard on the layer, a publisher and two posters; a real gateway follows it."""

    def __init__(self, site, seed: int, targets: tuple[tuple[str, str], ...] | None = None) -> None:
        self.site = site
        self.seed = seed
        self.rng = random.Random(seed)
        self.targets = targets  # None: random times and every step; else only cuts on these steps
        self.report = Report("dashboard", seed)
        self.disk = site.root / "dashboard-disk"
        self.mnt = site.root / "dashboard-fs"
        self.layer = PowerLayer(self.disk, self.mnt, self.rng, self.report)
        self.anchors = TrustAnchors(cosign_keys=tuple(load_public_key_files([str(site.pub)])))
        self.watch = PublishWatch()
        self.published: dict[bytes, str] = {}  # every manifest handed to publish -> its version
        self.durable: bytes | None = None  # the manifest of the last publish that exited 0
        self.in_flight: bytes | None = None
        self.on_disk: bytes | None = None  # the manifest the dashboard serves from the disk as the last cut left it
        self.outs: list[tuple[str, Path]] = []  # (version, OUT) in publish order
        self.estimate = {size: 1.5 for size in SIZES}  # seconds a publish of that size takes
        self.posters: list[Poster] = []
        self.gateway = None
        self.verbose = False
        self.url = ""

    # -- the checks -------------------------------------------------------------------------

    def pair_problem(self, data: bytes, bundle: bytes | None, artifact_dir: Path, where: str) -> str | None:
        """`data` and `bundle` (the served pair) must be published, current and verify with their files."""
        if data not in self.published:
            return f"{where}: manifest.json is no manifest that was published (torn?): {data[:80]!r}"
        if data not in (self.durable, self.in_flight):
            durable = self.published.get(self.durable, "none")
            return f"{where}: serves {self.published[data]}, not the last durable publish ({durable}) nor the one in flight"
        if bundle is None:
            return f"{where}: {self.published[data]} is served without {MANIFEST_BUNDLE}"
        try:
            manifest = verify_manifest(data, bundle, self.anchors, time.time()).manifest
            verify_artifact(artifact_dir / manifest.artifact, manifest, (artifact_dir / manifest.bundle).read_bytes(),
                            self.anchors, checksum_bytes=(artifact_dir / manifest.checksum).read_bytes())
        except (OtadError, OSError) as exc:
            return f"{where}: the served {self.published[data]} does not verify: {exc}"
        return None

    def disk_problems(self, cut: int) -> list[str]:
        """On the backing folder as the cut left it: what the dashboard will serve, and the store."""
        problems = []
        folder = OtaFolder(self.disk / "ota", use_inotify=False)
        current = folder.current()
        folder.close()
        if current is not None:
            self.on_disk = current.data
        if current is None:
            if self.durable is not None:
                files = sorted(p.name for p in (self.disk / "ota").iterdir() if "manifest" in p.name)
                problems.append(f"on disk: no manifest pair would be served after {self.published[self.durable]} "
                                f"was published ({MANIFEST} {self.version_on_disk()}, files {files})")
        else:
            problem = self.pair_problem(current.data, current.bundle, self.disk / "ota", "on disk")
            if problem:
                problems.append(problem)
        with tempfile.TemporaryDirectory(prefix="dashboard-store-") as copy:
            # A copy: opening the store recovers its WAL, and the disk itself must stay as the cut left it.
            shutil.copytree(self.disk / "state", copy, dirs_exist_ok=True)
            problems += self.store_problems(Path(copy) / "telemetry.db", "on disk")
        return [f"seed {self.seed}, cut {cut}: {p}" for p in problems]

    def version_on_disk(self) -> str:
        try:
            return parse_manifest((self.disk / "ota" / MANIFEST).read_bytes()).version
        except (OSError, OtadError) as exc:
            return f"unreadable ({exc})"

    def store_problems(self, db: Path, where: str) -> list[str]:
        # Taken before the read: on the live store the posters go on, and only rows acknowledged before count.
        acked = {poster.robot: poster.acked for poster in self.posters}
        if not db.exists():
            return [f"{where}: telemetry.db is gone"] if any(acked.values()) else []
        with sqlite3.connect(db) as conn:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        conn.close()
        problems = [] if check == "ok" else [f"{where}: telemetry.db integrity_check: {check}"]
        held: dict[str, Counter] = {}
        for robot, _boot, seq, kind, _body in dashboard_records(db):
            if kind != "gap":
                held.setdefault(robot, Counter())[seq] += 1
        for robot, upto in acked.items():
            seqs = held.get(robot, Counter())
            lost = [seq for seq in range(1, upto + 1) if seqs[seq] == 0]
            twice = sorted(seq for seq, n in seqs.items() if n > 1)
            if lost:
                problems.append(f"{where}: {len(lost)} acknowledged rows of {robot} lost (first {lost[:5]}, "
                                f"acknowledged up to {upto})")
            if twice:
                problems.append(f"{where}: rows of {robot} held twice: {twice[:5]}")
        return problems

    def served_problems(self) -> list[str]:
        """After the restart, over HTTP: the served pair, the gateway's verdict on it, the store."""
        problems = []
        answer = requests.get(f"{self.url}/manifest", timeout=10)
        if answer.status_code != 200:
            if self.durable is not None:
                problems.append(f"after restart: /manifest answers {answer.status_code} ({answer.text.strip()[:120]}) "
                                f"after {self.published[self.durable]} was published")
        else:
            data = answer.content
            bundle = requests.get(f"{self.url}/manifest.bundle", timeout=10)
            with tempfile.TemporaryDirectory(prefix="dashboard-served-") as folder:
                manifest = parse_manifest(data)
                for name in manifest.files:
                    got = requests.get(f"{self.url}/ota/{name}", timeout=30)
                    if got.status_code == 200:
                        (Path(folder) / name).write_bytes(got.content)
                problem = self.pair_problem(data, bundle.content if bundle.status_code == 200 else None,
                                            Path(folder), "after restart")
            if problem:
                problems.append(problem)
            else:
                problems += self.gateway_problems(data)
        problems += self.store_problems(self.mnt / "state" / "telemetry.db", "after restart")
        return problems

    def gateway_problems(self, data: bytes) -> list[str]:
        def follows() -> bool:
            try:
                return requests.get(f"{self.gateway.url}/manifest", timeout=5).content == data
            except requests.RequestException:
                return False
        try:
            wait_until(follows, 60, f"the gateway to serve {self.published[data]}", interval=0.1)
        except AssertionError as exc:
            rejected = [line for line in self.gateway.new_log().splitlines() if "rejected" in line][-1:]
            return [f"after restart: {exc} {rejected}"]
        return []

    # -- the run ------------------------------------------------------------------------------

    def start_dashboard(self):
        if self.url:
            self.site.dashboard.start()
        else:
            if self.site.dashboard is not None and self.site.dashboard.running():
                self.site.dashboard.stop()  # the site's own, on its OTA folder: this one runs on the layer
            tokens = write_tokens(self.site.root, [])
            self.site.start_dashboard(OTA_DIR=self.mnt / "ota", STATE_DIR=self.mnt / "state", TOKENS_FILE=tokens["dashboard"])
        self.url = self.site.dashboard.url
        health = requests.get(f"{self.url}/healthz", timeout=10)
        assert health.status_code == 200, health.text
        return self.site.dashboard

    def build(self, size: int) -> tuple[str, Path]:
        version = f"1.{len(self.outs) + 1}.0"
        out = self.site.build(version, size=size, seed=self.rng.randrange(1, 1 << 30))
        shutil.rmtree(self.site.root / f"app-{version}")
        return version, out

    def refresh(self) -> tuple[str, Path]:
        version, out = self.outs[-1]
        result = otad_release("refresh", "--from", str(out), "--key", str(self.site.key), "--expires-in", "30")
        assert result.returncode == 0, result.stderr
        return version, out

    def publish_cut(self) -> str:
        """One publish (a new release, or a refreshed one) with the power cut somewhere in it; the phase."""
        if self.outs and self.rng.random() < 0.2:
            version, out = self.refresh()
            size = json.loads((out / MANIFEST).read_text())["size"]
            size = min(SIZES, key=lambda s: abs(s - size))
        else:
            size = self.rng.choice(SIZES)
            version, out = self.build(size)
            self.outs.append((version, out))
        data = (out / MANIFEST).read_bytes()
        self.published[data] = version
        self.in_flight = data
        manifest = parse_manifest(data)
        roles = {manifest.artifact: "artifact", manifest.bundle: "signature", manifest.checksum: "checksum"}
        targets = self.targets or TARGETS
        target = None if self.targets is None and self.rng.random() < 0.5 else self.rng.choice(targets)
        delay = self.rng.uniform(0.0, 1.3 * self.estimate[size])
        started = time.monotonic()
        with tempfile.TemporaryFile() as errors:
            proc = subprocess.Popen([str(BIN / "otad-release"), "publish", "--from", str(out), "--to", str(self.mnt / "ota")],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
            self.watch.arm(roles, target, proc.pid)
            if target is None:
                try:
                    proc.wait(delay)
                except subprocess.TimeoutExpired:
                    pass
            else:
                wait_until(lambda: self.watch.fired.is_set() or proc.poll() is not None, 120,
                           f"publish of {version} to reach {target} or end", interval=0.005)
            with self.watch.lock:
                self.watch.victim = None
                phase = self.watch.last
            if proc.poll() is not None:
                self.estimate[size] = time.monotonic() - started
                errors.seek(0)
                if proc.returncode != 0:
                    self.report.violations.append(f"seed {self.seed}: publish of {version} failed before the cut: "
                                                  f"{errors.read().decode(errors='replace').strip()}")
                self.durable, self.in_flight = data, None
                phase = "after publish"
            # The publisher dies with the power: left running between two files it holds nothing open on
            # the mount, and would write into the bare mount point once the layer is gone.
            self.layer.cut(self.site.dashboard, Killable(proc))
        return phase

    def ingest_cut(self) -> str:
        try:
            self.site.dashboard.proc.wait(self.rng.uniform(0.05, 1.0))
        except subprocess.TimeoutExpired:
            pass
        self.layer.cut(self.site.dashboard)
        return "ingest only"

    def prune(self) -> None:
        """Delete all but the newest releases from OTA_DIR (never the one served), durably."""
        served = self.published.get(self.durable)
        for version, out in self.outs[:-KEEP_RELEASES]:
            if version != served:
                for name in parse_manifest((out / MANIFEST).read_bytes()).files:
                    (self.mnt / "ota" / name).unlink(missing_ok=True)
        fsync_dir(self.mnt / "ota")

    def run(self, cuts: int, seconds: float | None = None) -> Report:
        """`cuts` power cuts, fewer if `seconds` run out first (the report says how many)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            return self._run(cuts, deadline)
        finally:
            for poster in self.posters:
                poster.stopping.set()
            self.watch.stop()
            if self.site.dashboard is not None:
                self.site.dashboard.kill9()
            self.layer.close()

    def _run(self, cuts: int, deadline: float | None) -> Report:
        self.layer.mount()
        # OTA_DIR and STATE_DIR exist, durably, before the first start, as the Debian package lays them out.
        for name in ("ota", "state"):
            (self.mnt / name).mkdir()
        fsync_dir(self.mnt)
        self.start_dashboard()
        self.gateway = self.site.gateway(dashboard_url=self.url, name="gw-follow").start()
        self.posters = [Poster(lambda: self.url, "a1", "ra", self.rng.randrange(1 << 30)),
                        Poster(lambda: self.url, "b2", "rb", self.rng.randrange(1 << 30))]
        for poster in self.posters:
            poster.start()
        self.watch.start(self.mnt / "ota")
        # A first release published without a cut: from here on a release is always durably published.
        version, out = self.build(SIZES[0])
        self.outs.append((version, out))
        result = otad_release("publish", "--from", str(out), "--to", str(self.mnt / "ota"))
        assert result.returncode == 0, result.stderr
        self.durable = (out / MANIFEST).read_bytes()
        self.published[self.durable] = version
        for number in range(1, cuts + 1):
            if deadline is not None and time.monotonic() > deadline:
                print(f"time budget spent after {self.report.cuts} cuts", flush=True)
                break
            publishing = self.rng.random() < 0.8
            phase = self.publish_cut() if publishing else self.ingest_cut()
            self.watch.stop()
            self.report.phases[phase] += 1
            self.report.cuts += 1
            problems = self.disk_problems(number)
            torn = self.layer.lazy.torn
            self.layer.mount()
            self.watch.start(self.mnt / "ota")
            self.start_dashboard()
            problems += [f"seed {self.seed}, cut {number}, {p}" for p in self.served_problems()]
            problems += [f"seed {self.seed}, cut {number}: poster refused: {r}" for p in self.posters for r in p.refusals]
            if self.verbose:
                print(f"cut {number}: {phase}, {'torn' if torn else 'whole'} writes lost, "
                      f"acked {[p.acked for p in self.posters]}, {'VIOLATION' if problems else 'invariants hold'}", flush=True)
            if problems:
                self.report.violations += problems
                break
            # What the dashboard serves from the disk now is durable: the floor for the next cuts.
            self.durable, self.in_flight = self.on_disk, None
            self.prune()
        return self.report


def start_dashboard_loop(site, seed: int) -> DashboardPowerCuts:
    """POWER_TARGETS="moved:manifest.json,create:artifact" cuts only on those steps of each publish."""
    wanted = os.environ.get("POWER_TARGETS")
    targets = tuple(tuple(item.split(":", 1)) for item in wanted.split(",")) if wanted else None
    return DashboardPowerCuts(site, seed, targets)


if __name__ == "__main__":
    sys.exit(soak_main("dashboard", start_dashboard_loop))
