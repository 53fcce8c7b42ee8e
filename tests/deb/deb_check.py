#!/usr/bin/env python3
"""`make deb-check`: otad's Debian packages, installed with apt, running under a real systemd.

Builds the .debs (tests/deb/build-debs.sh, into a private folder), boots a fresh copy of a cached
Debian bookworm root with `systemd-nspawn --boot`, installs the .debs there
with apt (dependencies from Debian's archive, no pip), and checks what a user
of the packages would see:

- the four units are active (running) after `systemctl start`, each with its Status: line;
- the daemons run on Debian's library versions (printed, and read from their /proc/PID/maps);
- a release published with `otad-release publish` travels dashboard -> gateway
  -> robot and is running (the robot restarts the app unit through the polkit
  rule, which refuses anything else); a broken release is rolled back and
  `journalctl -u otad-robot` says so with its reason; telemetry reaches the dashboard;
- `kill -STOP` of a daemon makes systemd's watchdog restart it;
- `systemctl reload` re-reads the config (a changed OTA_DIR takes effect, same PID);
- an upgrade to a newer version keeps the state and restarts the running daemons;
- `apt purge` stops the units and removes the packages, the state and the user;
- `systemd-analyze security` exposure per unit (<= 2.5 for gateway, dashboard, agent).

Exit status: 0 all passed (or SKIPPED, printed, when not root or without
systemd-nspawn/debootstrap), 1 when an assertion failed. Not a pytest module
(the main suite must not collect it); it is the `deb-check` part of `make check`.
Environment: OTAD_DEB_CHECK_CACHE (default /var/cache/otad-deb-check).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from container import CheckFailed, Container, log, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Set per run in main(): a private folder, so that concurrent runs never share .debs.
DEBS = Path()
CACHE = Path(os.environ.get("OTAD_DEB_CHECK_CACHE", "/var/cache/otad-deb-check"))
PACKAGES = ["python3-otad", "otad-gateway", "otad-robot", "otad-telemetry-agent", "otad-dashboard", "otad-release"]
UNITS = ["otad-dashboard", "otad-gateway", "otad-robot", "telemetry-agent"]
EXPOSURE_TARGET = {"otad-gateway": 2.5, "otad-dashboard": 2.5, "telemetry-agent": 2.5}
LIBRARIES = ["python3", "python3-requests", "python3-urllib3", "python3-cryptography", "python3-nacl",
             "python3-gnupg", "python3-sdnotify", "python3-pyinotify", "python3-waitress", "gpg"]
PASSWORD = "deb-check"

APP_UNIT = """\
[Unit]
Description=the robot's app (deb-check)
[Service]
DynamicUser=yes
WorkingDirectory=/var/lib/otad/app/CURRENT
ExecStart=/var/lib/otad/app/CURRENT/bin/app
"""
APP = '#!/bin/sh\necho "robot-app $(cat VERSION) running"\nexec sleep infinity\n'
GOOD_SELFTEST = '#!/bin/sh\necho "selftest $(cat VERSION): all sensors answer"\n'
BAD_SELFTEST = '#!/bin/sh\necho "selftest $(cat VERSION): motor controller does not answer" >&2\nexit 3\n'


def skip(reason: str) -> int:
    log(f"SKIPPED: deb-check did not run: {reason}")
    return 0


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (the container shares the host's network)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Check:
    def __init__(self, box: Container) -> None:
        self.box = box
        self.dashboard_port, self.gateway_port = free_ports(2)
        self.timings: list[tuple[str, float]] = []

    def step(self, title: str) -> None:
        self.timings.append((title, time.monotonic()))
        log(f"== {title}")

    # -- helpers ----------------------------------------------------------------
    def show(self, unit: str, prop: str) -> str:
        return self.box.out(f"systemctl show -p {prop} --value {unit}").strip()

    def journal(self, unit: str) -> str:
        return self.box.out(f"journalctl -u {unit} --no-pager -o cat")

    def running(self, unit: str) -> str:
        """`systemctl status` of a unit once it is active (running) with a Status: line, else ''."""
        status = self.box.run(f"systemctl status --no-pager --lines=0 {unit}", check=False).stdout
        if "Active: active (running)" in status and re.search(r"^\s*Status: ", status, re.M):
            return status
        return ""

    def robot_status(self) -> dict:
        return json.loads(self.box.out("otadctl status --json"))

    def wait_log(self, unit: str, pattern: str, timeout: float) -> str:
        found = wait_until(lambda: re.search(pattern, self.journal(unit), re.M), timeout, f"/{pattern}/ in the journal of {unit}")
        return found.group(0)  # type: ignore[union-attr]

    # -- the steps ----------------------------------------------------------------
    def install(self) -> None:
        self.step("apt installs the .debs into the clean bookworm; dependencies come from Debian's archive")
        debs = sorted(DEBS.glob("*.deb"))
        names = {p.name.split("_")[0] for p in debs}
        if names != set(PACKAGES):
            raise CheckFailed(f"expected the packages {PACKAGES}, build/deb has {sorted(names)}")
        for deb in debs:
            shutil.copy(deb, self.box.root / "root" / deb.name)
        self.box.run("apt-get update -q", timeout=300)
        result = self.box.run("apt-get install -y -q " + " ".join(f"/root/{d.name}" for d in debs), timeout=600)
        log("   " + next((l for l in result.stdout.splitlines() if "newly installed" in l), "?"))
        installed = self.box.out("dpkg-query -W -f '${Package} ${Version} ${db:Status-Status}\\n' " + " ".join(PACKAGES))
        for package in PACKAGES:
            if not re.search(rf"^{package} \S+ installed$", installed, re.M):
                raise CheckFailed(f"{package} is not installed:\n{installed}")
        if self.box.run("/usr/bin/python3 -c 'import pip'", check=False).returncode == 0:
            raise CheckFailed("pip is importable in the container: the packages must not need it")
        enabled = self.box.out("systemctl is-enabled " + " ".join(UNITS), check=False).split()
        inactive = self.box.out("systemctl is-active " + " ".join(UNITS), check=False).split()
        log(f"   units after install: enabled={enabled} active={inactive} (started once configured)")
        if enabled != ["enabled"] * 4:
            raise CheckFailed(f"the units should be enabled by the packages: {enabled}")

    def configure(self) -> None:
        self.step("configure: a release key, tokens, the four config files, the robot's app unit")
        box, dport, gport = self.box, self.dashboard_port, self.gateway_port
        box.run("mkdir -p /root/ci /etc/otad/keys /srv/otad/ota /srv/otad/ota-stable"
                " && otad-release keygen --output-prefix /root/ci/release && cp /root/ci/release.pub /etc/otad/keys/",
                env={"COSIGN_PASSWORD": PASSWORD})
        box.write("/etc/otad/gateway-tokens", "gw1 gateway-token-0123456789\n", 0o600)
        box.write("/etc/otad/gateway.token", "gateway-token-0123456789\n", 0o600)
        box.write("/etc/otad/robot-tokens", "robot1 robot-token-0123456789\n", 0o600)
        box.write("/etc/otad/telemetry-agent.token", "robot-token-0123456789\n", 0o600)
        box.run("chown otad:otad /etc/otad/gateway-tokens /etc/otad/gateway.token /etc/otad/robot-tokens"
                " /etc/otad/telemetry-agent.token")
        self.dashboard_conf = (f"LISTEN=127.0.0.1:{dport}\nOTA_DIR=/srv/otad/ota\nTHREADS=4\n"
                               "TOKENS_FILE=/etc/otad/gateway-tokens\n")
        box.write("/etc/otad/dashboard.conf", self.dashboard_conf)
        box.write("/etc/otad/gateway.conf", f"DASHBOARD_URL=http://127.0.0.1:{dport}\nLISTEN=127.0.0.1:{gport}\n"
                  "TRUSTED_KEYS=/etc/otad/keys\nPOLL_INTERVAL=2\nGATEWAY_ID=gw1\nTOKEN_FILE=/etc/otad/gateway.token\n"
                  "ROBOT_TOKENS_FILE=/etc/otad/robot-tokens\nBACKOFF_MAX=5\n")
        box.write("/etc/otad/robot.conf", f"GATEWAY_URL=http://127.0.0.1:{gport}\nTRUSTED_KEYS=/etc/otad/keys\n"
                  "POLL_INTERVAL=2\nROBOT_ID=robot1\nRESTART_CMD=systemctl restart robot-app.service\n"
                  "PROBATION_S=0\nMAX_ATTEMPTS=1\nBACKOFF_MAX=5\n")
        box.write("/etc/otad/telemetry-agent.conf", f"GATEWAY_URL=http://127.0.0.1:{gport}\nROBOT_ID=robot1\n"
                  "INTERVAL=2\nBACKOFF_MAX=5\n")
        box.write("/etc/systemd/system/robot-app.service", APP_UNIT)
        box.run("systemctl daemon-reload")
        for name in ("otad-dashboard", "otad-gateway", "otad-robot", "telemetry-agent"):
            box.run(f"{name} --check-config")

    def release(self, version: str, selftest: str, to: str = "/srv/otad/ota") -> None:
        app = f"/root/ci/app-{version}"
        self.box.write(f"{app}/VERSION", version + "\n")
        self.box.write(f"{app}/bin/app", APP, 0o755)
        self.box.write(f"{app}/selftest", selftest, 0o755)
        self.box.run(f"otad-release build --app-dir {app} --version {version} --key /root/ci/release.key"
                     f" --out /root/ci/out-{version} && otad-release publish --from /root/ci/out-{version} --to {to}",
                     env={"COSIGN_PASSWORD": PASSWORD})

    def start(self) -> None:
        self.step("systemctl start: all four units active (running), each with its Status: line")
        self.release("1.0.0", GOOD_SELFTEST, to="/srv/otad/ota-stable")
        # The robot first: its outbox must exist when the agent's sandbox is set up.
        self.box.run("systemctl start otad-dashboard otad-gateway otad-robot")
        wait_until(lambda: self.running("otad-robot"), 60, "otad-robot running")
        self.box.run("systemctl start telemetry-agent")
        for unit in UNITS:
            status = wait_until(lambda: self.running(unit), 60, f"{unit} active (running) with a Status: line")
            lines = [l.strip() for l in str(status).splitlines() if re.match(r"\s*(Active|Status|Main PID):", l)]
            log(f"   {unit}: " + " | ".join(lines))

    def libraries(self) -> None:
        self.step("the daemons run on Debian's library versions")
        versions = self.box.out("dpkg-query -W -f '${Package} ${Version}\\n' " + " ".join(LIBRARIES))
        for line in versions.splitlines():
            log(f"   {line}")
        # What the daemons' interpreter imports: the distributions' own metadata and file locations.
        probe = ("import importlib.metadata as m; "
                 "print(' '.join(f'{d} {m.version(d)} ({m.distribution(d).locate_file(str())})' for d in "
                 "('requests', 'urllib3', 'cryptography', 'PyNaCl', 'python-gnupg', 'sdnotify', 'pyinotify', 'waitress')))")
        imported = self.box.out(f'/usr/bin/python3 -c "{probe}"').split(") ")
        for item in imported:
            if "/usr/lib/python3/dist-packages" not in item:
                raise CheckFailed(f"a library the daemons import is not Debian's: {item}")
        log("   /usr/bin/python3 imports: " + "; ".join(i.split(" (")[0] for i in imported) + " (all from /usr/lib/python3/dist-packages)")
        for unit in UNITS:
            pid = self.show(unit, "MainPID")
            exe = self.box.out(f"readlink /proc/{pid}/exe").strip()
            maps = self.box.out(f"cat /proc/{pid}/maps")
            libs = sorted({line.split()[-1] for line in maps.splitlines() if "python3" in line and line.endswith(".so")})
            foreign = [lib for lib in libs if "/usr/local/" in lib or "site-packages" in lib]
            if foreign or not exe.startswith("/usr/bin/python3"):
                raise CheckFailed(f"{unit} runs on something not from Debian: {exe} {foreign}")
            owners = self.box.out("dpkg -S " + " ".join(libs)).split("\n") if libs else []
            packages = sorted({o.split(":")[0] for o in owners if o})
            log(f"   {unit} (pid {pid}, {exe}): native modules from {', '.join(packages) or 'the interpreter only'}")
        gateway_maps = self.box.out(f"cat /proc/{self.show('otad-gateway', 'MainPID')}/maps")
        if "/usr/lib/python3/dist-packages/cryptography/" not in gateway_maps:
            raise CheckFailed("otad-gateway has not loaded Debian's python3-cryptography")

    def ota(self) -> None:
        self.step("a release from `otad-release publish` reaches the robot and runs; the polkit rule allows only that")
        self.release("1.0.0", GOOD_SELFTEST)
        line = self.wait_log("otad-robot", r"^installed app 1\.0\.0.*$", 120)
        log(f"   otad-robot: {line}")
        wait_until(lambda: "robot-app 1.0.0 running" in self.journal("robot-app"), 30, "robot-app 1.0.0 running")
        log("   robot-app: " + self.journal("robot-app").strip().splitlines()[-1])
        if self.robot_status()["current"] != "1.0.0":
            raise CheckFailed(f"otadctl status: {self.robot_status()}")
        refused = self.box.run("runuser -u otad -- systemctl stop robot-app.service", check=False)
        if refused.returncode == 0 or self.show("robot-app", "ActiveState") != "active":
            raise CheckFailed("the user otad could stop robot-app.service; the polkit rule must allow only restart")
        log(f"   as the user otad, `systemctl stop robot-app`: refused ({refused.stderr.strip().splitlines()[0]})")

        self.step("a broken release (its self-test fails) is rolled back; journalctl -u otad-robot says why")
        self.release("1.1.0", BAD_SELFTEST)
        line = self.wait_log("otad-robot", r"^rolled back app 1\.1\.0 to 1\.0\.0: .+$", 120)
        log(f"   journalctl -u otad-robot: {line}")
        if "motor controller does not answer" not in line and "exit 3" not in line:
            raise CheckFailed(f"the rollback line does not give the self-test's reason: {line}")
        self.wait_log("otad-robot", r"^blacklisted app 1\.1\.0.*$", 30)
        status = self.robot_status()
        if status["current"] != "1.0.0" or "1.1.0" not in status["blacklist"]:
            raise CheckFailed(f"after the rollback otadctl status says {status}")
        wait_until(lambda: self.journal("robot-app").count("robot-app 1.0.0 running") >= 2, 30,
                   "robot-app restarted on 1.0.0 after the rollback")
        log("   robot-app: " + " -> ".join(l for l in self.journal("robot-app").splitlines() if "running" in l))

        self.step("telemetry: agent -> gateway -> dashboard, the rollback event included")
        url = f"http://127.0.0.1:{self.dashboard_port}/status.json"

        def fleet() -> dict | None:
            result = self.box.run(f"/usr/bin/python3 -c 'import urllib.request; print(urllib.request.urlopen(\"{url}\").read().decode())'", check=False)
            if result.returncode:
                return None
            doc = json.loads(result.stdout)
            robots = {r["robot_id"]: r for r in doc.get("robots", [])}
            kinds = {value for event in doc.get("events", []) for value in event.values() if isinstance(value, str)}
            return doc if "robot1" in robots and "rolled_back" in kinds else None

        doc = wait_until(fleet, 90, "robot1 and its rolled_back event on the dashboard's /status.json")
        robot = next(r for r in doc["robots"] if r["robot_id"] == "robot1")  # type: ignore[index]
        log(f"   /status.json: robot1 version={robot.get('version')} health={robot.get('health')}; "
            f"{len(doc['events'])} events")  # type: ignore[index]
        left = self.box.out("ls /var/lib/otad/robot/outbox").split()
        if [name for name in left if name.endswith(".json")]:
            raise CheckFailed(f"the agent did not remove delivered events from the robot's outbox: {left}")

    def watchdog(self) -> None:
        self.step("kill -STOP: systemd's watchdog restarts the hung daemon")
        unit = "otad-gateway"
        pid = self.show(unit, "MainPID")
        self.box.run(f"kill -STOP {pid}")
        started = time.monotonic()
        wait_until(lambda: self.show(unit, "MainPID") not in ("0", pid) and self.running(unit), 120,
                   f"{unit} restarted by the watchdog")
        log(f"   {unit}: pid {pid} stopped; pid {self.show(unit, 'MainPID')} running {time.monotonic() - started:.0f}s later")
        lines = [l for l in self.box.out(f"journalctl -u {unit} --no-pager -o cat").splitlines()
                 if "atchdog" in l or "Scheduled restart" in l]
        for line in lines:
            log(f"   journal: {line}")
        if not any("Watchdog timeout" in line for line in lines):
            raise CheckFailed(f"no watchdog timeout in the journal of {unit}")

    def reload(self) -> None:
        self.step("systemctl reload re-reads the config (dashboard OTA_DIR -> the stable folder)")
        before = self.show("otad-dashboard", "MainPID")
        status_before = self.show("otad-dashboard", "StatusText")
        self.box.write("/etc/otad/dashboard.conf", self.dashboard_conf.replace("OTA_DIR=/srv/otad/ota\n", "OTA_DIR=/srv/otad/ota-stable\n"))
        self.box.run("systemctl reload otad-dashboard")
        line = self.wait_log("otad-dashboard", r"^OTA_DIR is now /srv/otad/ota-stable$", 30)
        wait_until(lambda: "1.0.0" in self.show("otad-dashboard", "StatusText"), 30, "the dashboard serving 1.0.0")
        after = self.show("otad-dashboard", "MainPID")
        if after != before:
            raise CheckFailed(f"reload restarted the dashboard (pid {before} -> {after})")
        log(f"   {line}; Status: {status_before!r} -> {self.show('otad-dashboard', 'StatusText')!r}, same pid {after}")
        for unit in ("otad-gateway", "otad-robot", "telemetry-agent"):
            pid = self.show(unit, "MainPID")
            self.box.run(f"systemctl reload {unit}")
            self.wait_log(unit, r"^reloaded config from /etc/otad/.*$", 30)
            if self.show(unit, "MainPID") != pid:
                raise CheckFailed(f"reload restarted {unit}")
        log("   otad-gateway, otad-robot, telemetry-agent: 'reloaded config from /etc/otad/...', same pids")

    def upgraded_debs(self) -> list[str]:
        """The same packages as version V+upgrade1, so dpkg really upgrades (postinst configure V)."""
        work = self.box.workdir / "upgrade"
        target = self.box.root / "root" / "upgrade"
        work.mkdir()
        target.mkdir(parents=True)
        names = []
        for deb in sorted(DEBS.glob("*.deb")):
            tree = work / deb.stem
            subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
            control = tree / "DEBIAN" / "control"
            text = control.read_text()
            version = re.search(r"^Version: (\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
            newer = f"{version}+upgrade1"
            control.write_text(text.replace(f"Version: {version}\n", f"Version: {newer}\n").replace(f"(= {version})", f"(= {newer})"))
            name = f"{deb.name.split('_')[0]}_{newer}_all.deb"
            subprocess.run(["dpkg-deb", "--build", str(tree), str(target / name)], check=True, stdout=subprocess.DEVNULL)
            names.append(f"/root/upgrade/{name}")
        return names

    def upgrade(self) -> None:
        self.step("upgrade to a newer version with apt: state kept, running daemons restarted")
        before = {unit: self.show(unit, "MainPID") for unit in UNITS}
        cached = self.box.out("ls /var/lib/otad/gateway/cache/versions").split()
        result = self.box.run("apt-get install -y -q " + " ".join(self.upgraded_debs()), timeout=300)
        summary = next((l for l in result.stdout.splitlines() if "upgraded," in l), "")
        if not summary.startswith(f"{len(PACKAGES)} upgraded"):
            raise CheckFailed(f"expected {len(PACKAGES)} packages upgraded: {summary!r}")
        for unit in UNITS:
            wait_until(lambda: self.running(unit) and self.show(unit, "MainPID") != before[unit], 60, f"{unit} restarted")
        status = self.robot_status()
        if status["current"] != "1.0.0" or "1.1.0" not in status["blacklist"]:
            raise CheckFailed(f"the upgrade lost the robot's state: {status}")
        still_cached = self.box.out("ls /var/lib/otad/gateway/cache/versions").split()
        if not cached or still_cached != cached:
            raise CheckFailed(f"the upgrade changed the gateway's cache: {cached} -> {still_cached}")
        log(f"   {summary}")
        log(f"   new pids {[self.show(u, 'MainPID') for u in UNITS]} (were {list(before.values())}); "
            f"robot CURRENT {status['current']}, blacklist {status['blacklist']}; gateway cache {still_cached}")

    def exposure(self) -> dict[str, float]:
        self.step("systemd-analyze verify and security (inside the booted container)")
        units = " ".join(f"/lib/systemd/system/{u}.service" for u in UNITS)
        verify = self.box.run(f"systemd-analyze verify {units}", check=False)
        if verify.returncode != 0 or verify.stdout.strip() or verify.stderr.strip():
            raise CheckFailed(f"systemd-analyze verify complains about the units:\n{verify.stdout}{verify.stderr}")
        log("   systemd-analyze verify: no warnings for the four units")
        scores = {}
        for unit in UNITS:
            out = self.box.out(f"systemd-analyze security --no-pager {unit}.service", check=False)
            match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\S+)", out)
            if not match:
                raise CheckFailed(f"no exposure level for {unit}:\n{out[-1500:]}")
            scores[unit] = float(match.group(1))
            # The directives still costing exposure, biggest first (the docs' hardening table).
            costs = re.findall(r"^✗ (\S+?)(?:=\S*)?\s.*?(\d\.\d)$", out, re.M)
            costs = sorted(((float(c), name) for name, c in costs if float(c) > 0), reverse=True)
            log(f"   {unit}.service: {match.group(1)} {match.group(2)}; left: "
                + ", ".join(f"{name} {c}" for c, name in costs))
        over = {u: s for u, s in scores.items() if s > EXPOSURE_TARGET.get(u, 10)}
        if over:
            raise CheckFailed(f"exposure above {EXPOSURE_TARGET}: {over}")
        return scores

    def purge(self) -> None:
        self.step("apt purge: units stopped, packages, state and the user otad gone")
        self.box.run("systemctl stop robot-app.service")
        self.box.run("apt-get purge -y -q " + " ".join(PACKAGES), timeout=300)
        active = self.box.out("systemctl is-active " + " ".join(UNITS), check=False).split()
        if any(state == "active" for state in active):
            raise CheckFailed(f"units still active after purge: {active}")
        left = self.box.out("dpkg-query -W -f '${Package} ${db:Status-Status}\\n' " + " ".join(PACKAGES), check=False)
        if re.search(r" (installed|config-files)$", left, re.M):
            raise CheckFailed(f"packages left after purge:\n{left}")
        checks = {
            "processes of the user otad": "ps -eo user=,pid=,args= | grep '^otad ' || true",
            "the user otad": "getent passwd otad || true",
            "the group otad": "getent group otad || true",
            "/var/lib/otad": "ls -A /var/lib/otad 2>/dev/null; test -e /var/lib/otad && echo exists || true",
            "the config files": "ls /etc/otad/*.conf /etc/otad/*token* /etc/otad/*tokens 2>/dev/null || true",
            "unit files": "ls /lib/systemd/system/otad-* /lib/systemd/system/telemetry-agent.service 2>/dev/null || true",
            "the polkit rule": "ls /usr/share/polkit-1/rules.d/50-otad-robot.rules 2>/dev/null || true",
        }
        for what, command in checks.items():
            found = self.box.out(command).strip()
            if found:
                raise CheckFailed(f"{what} left after purge: {found}")
        log(f"   units: {active}; no otad package, process, user, group, state or config left; "
            f"/etc/otad keeps only what the operator added: {self.box.out('ls -A /etc/otad 2>/dev/null || true').split()}")

    def report(self, total_started: float) -> None:
        log("== timings")
        ends = [t for _, t in self.timings[1:]] + [time.monotonic()]
        for (title, began), end in zip(self.timings, ends):
            log(f"   {end - began:6.1f}s  {title}")


def main() -> int:
    if os.geteuid() != 0:
        return skip("it needs root (systemd-nspawn, debootstrap); run `sudo make deb-check`")
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-buildpackage") if shutil.which(tool) is None]
    if missing:
        return skip(f"missing {', '.join(missing)} (apt-get install systemd-container debootstrap util-linux dpkg-dev)")
    # A CI timeout's SIGTERM must still power the container off and remove its folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    global DEBS
    DEBS = Path(tempfile.mkdtemp(prefix="otad-deb-check-debs.", dir="/var/tmp"))
    log(f"== make deb: building the packages into {DEBS}")
    try:
        build = subprocess.run([str(REPO / "tests/deb/build-debs.sh"), str(DEBS)], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL)
    except BaseException:
        shutil.rmtree(DEBS, ignore_errors=True)
        raise
    if build.returncode != 0:
        shutil.rmtree(DEBS, ignore_errors=True)
        log(f"{build.stdout[-6000:]}{build.stderr[-6000:]}")
        log(f"FAILED: deb-check: make deb exited {build.returncode} (output above)")
        return 1
    # The build log is long; keep what matters: build-time tests, lintian, the .debs.
    for line in build.stdout.splitlines():
        if re.search(r"passed|failed|^make deb:|^[EWI]: |\.deb$", line):
            log(f"   {line}")
    built = time.monotonic()
    box = Container(CACHE, f"otad-check-{os.getpid()}")
    failure: str | None = None
    check = None
    try:
        log("== booting a fresh copy of the cached Debian bookworm root with systemd-nspawn --boot")
        box.boot()
        check = Check(box)
        check.install()
        check.configure()
        check.start()
        check.libraries()
        check.ota()
        check.watchdog()
        check.reload()
        check.upgrade()
        check.exposure()
        check.purge()
        check.report(started)
    except Exception as exc:  # any failure: report it, show the journals, clean up, exit 1
        failure = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
        if box.pid1:
            for unit in UNITS + ["robot-app"]:
                tail = box.run(f"journalctl -u {unit} --no-pager -o cat -n 15", check=False).stdout
                log(f"---- journalctl -u {unit} (last lines)\n{tail}")
    finally:
        shutil.rmtree(DEBS, ignore_errors=True)
        try:
            box.destroy()
        except CheckFailed as exc:
            failure = (failure + "\n" if failure else "") + str(exc)
    if failure:
        log(f"FAILED: deb-check: {failure}")
        return 1
    log(f"PASSED: deb-check in {time.monotonic() - started:.0f}s (build {built - started:.0f}s, "
        f"container {time.monotonic() - built:.0f}s); nothing left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
