"""`make demo`: a whole fleet on this machine, as an ordinary user on loopback.

A dashboard, a gateway, three robots each with its telemetry agent (the real
daemons, state in a temporary folder), then the story in otad.demo.story.
Afterwards the fleet keeps running for you to explore until Ctrl-C (SIGINT or
SIGTERM), which stops every process it started. With DEMO_ONCE=1 it exits after
the summary: status 0 only if every step happened as expected. DEMO_KEEP=1 keeps
the state folder; DEMO_PORT=8080 puts the dashboard on a fixed port.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from otad.demo.fleet import GATEWAY_ID, ROBOTS, Fleet
from otad.demo.procs import BIN
from otad.demo.releases import BUILD_RELEASE, StepFailed, generate_key
from otad.demo.story import BAD, GOOD, OUTAGE_S, Story

PLAN = f"""otad demo: a fleet on this machine (loopback only, no root)
  1. start otad-dashboard, one otad-gateway ({GATEWAY_ID}), and {len(ROBOTS)} robots ({', '.join(ROBOTS)}),
     each an otad-robot with its telemetry-agent; the gateway reaches the dashboard through a
     WAN the demo can cut, the robots reach the gateway over a site network of 2 MiB/s
  2. build, sign and publish {GOOD[0]} with a key generated now (ci/build-release); watch every robot install it
  3. the same for {GOOD[1]}
  4. publish {BAD}, whose self-test fails: every robot rolls back to {GOOD[1]} and blacklists {BAD}
  5. take the WAN down for {OUTAGE_S:.0f}s: the gateway buffers telemetry; bring it back: the backlog flushes
  6. print a summary; then the fleet stays up for you to explore, and Ctrl-C stops all of it"""


EXPLORE = """
to explore, in another terminal:
  ls {work}/etc   # every daemon's config and token files
  {bin}/otadctl --config {work}/etc/robot-1.conf status
  {bin}/otadctl --config {work}/etc/robot-1.conf unblacklist {bad}   # robot-1 tries {bad} again, rolls back again
  # a new release, v1.3.0:
  echo 1.3.0 > {work}/app-1.1.0/VERSION && COSIGN_PASSWORD=demo COSIGN_KEY={key} \\
    OTAD_RELEASE={bin}/otad-release {build} {work}/app-1.1.0 {work}/out-1.3.0 {work}/ota"""


class Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main() -> int:
    once = os.environ.get("DEMO_ONCE") == "1"
    port = int(os.environ.get("DEMO_PORT", "0") or 0)
    work = Path(tempfile.mkdtemp(prefix="otad-demo-"))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "COSIGN_PASSWORD": "demo"}
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    fleet: Fleet | None = None
    story_ok = False
    try:
        print(PLAN)
        print(f"\nstate, configs and logs: {work}", flush=True)
        key, pub = generate_key(work / "demo-release", env)
        fleet = Fleet(work, pub, env, port)
        fleet.start()
        print(f"\nfleet status page: {fleet.dashboard.url}/status  (data: {fleet.dashboard.url}/status.json)", flush=True)
        story = Story(fleet, work, key, env)
        story_ok = story.run()
        story.summary(story_ok)
        if once:
            return 0 if story_ok else 1
        print(EXPLORE.format(work=work, key=key, build=BUILD_RELEASE, bad=BAD, bin=BIN))
        print(f"\nfleet running until Ctrl-C: {fleet.dashboard.url}/status  (logs in {work / 'logs'})", flush=True)
        reported: set[str] = set()
        while True:
            time.sleep(0.5)
            story.sample()  # progress of whatever you do meanwhile
            for dead in set(fleet.dead()) - reported:
                print(f"demo: {dead} stopped; see {work / 'logs'}", flush=True)
                reported.add(dead)
    except Interrupted as stop:
        print(f"\ndemo: {stop} received, stopping the fleet", flush=True)
        return 0 if story_ok else 130
    except StepFailed as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a daemon that did not start
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short; it is bounded anyway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if fleet is not None:
            forced = fleet.stop()
            print(f"demo: stopped {len(fleet.children)} processes"
                  + (f" ({', '.join(forced)} needed SIGKILL)" if forced else ""), flush=True)
        if os.environ.get("DEMO_KEEP") == "1":
            print(f"demo: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
