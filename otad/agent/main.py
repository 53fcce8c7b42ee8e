"""`telemetry-agent`: a collector thread fills the spool, a sender thread empties it.

Two threads, so that a stalled gateway (READ_TIMEOUT) or backoff never delays
sampling, and a slow HEALTH_CMD never delays sending. READY=1 is sent once
the spool is open and both threads run.
"""
from __future__ import annotations

import dataclasses
import logging
import sqlite3
import sys
import threading
import time
from pathlib import Path

from otad.agent.collect import Collector, boot_id
from otad.agent.sender import BEAT_EVERY, Sender
from otad.agent.settings import DEFAULT_CONFIG, AgentSettings
from otad.agent.spool import Spool
from otad.daemon import Daemon, Heartbeat, daemon_main
from otad.errors import OtadError
from otad.robot.outbox import Outbox

log = logging.getLogger("otad.agent")


class CollectLoop:
    """Every INTERVAL: one metric into the spool, then the robot's outbox into the spool.

    The first metric comes one INTERVAL after start: CPU % is the change between
    two samples, and a window of a few milliseconds of our own start-up is noise.
    Events waiting in the outbox are taken at once.
    """

    def __init__(self, settings: AgentSettings, spool: Spool, sender: Sender, heartbeat: Heartbeat) -> None:
        self.settings, self.spool, self.sender, self.heartbeat = settings, spool, sender, heartbeat
        self.boot = boot_id()
        self.collector = Collector()
        self._wake = threading.Event()
        self._stop = False
        self._last_error = ""

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def apply(self, settings: AgentSettings) -> None:
        self.settings = settings
        self._wake.set()  # a new INTERVAL counts from the last sample, not from the old due time

    def run(self) -> None:
        first = True
        while not self._stop:
            began = time.monotonic()
            self.heartbeat.beat()
            self.collect_once(sample=not first)
            first = False
            # Sampling starts INTERVAL apart; after a stall that is longer, no burst to catch up.
            while not self._stop and (remaining := began + self.settings.interval - time.monotonic()) > 0:
                self._wake.wait(min(remaining, BEAT_EVERY))
                self._wake.clear()
                self.heartbeat.beat()

    def collect_once(self, sample: bool = True) -> None:
        settings = self.settings
        try:
            if sample:
                record = self.collector.sample(
                    settings.robot_id, self.boot, settings.app_dir, settings.health_cmd, settings.health_timeout
                )
                self.spool.add(record)
            outbox_dir = settings.robot_state_dir / "outbox"
            # No outbox folder: otad-robot is not installed (or not started yet); never create it for it.
            if outbox_dir.is_dir():
                self.spool.drain_outbox(Outbox(settings.robot_state_dir), settings.robot_id, self.boot)
        except (OSError, sqlite3.Error, OtadError) as exc:
            # A full disk or an unreadable /proc file: log once per distinct problem, keep trying.
            message = f"{type(exc).__name__}: {exc}"
            if message != self._last_error:
                log.error("cannot collect or spool a record: %s", message)
            self._last_error = message
        else:
            if self._last_error:
                log.info("collecting again")
            self._last_error = ""
        self.sender.notify()


class Agent(Daemon):
    name = "telemetry-agent"

    def __init__(self, settings: AgentSettings, config_path: Path) -> None:
        super().__init__(settings, config_path)
        # Longest legitimate silences: a health command; a request that hits both timeouts.
        self.collect_beat = Heartbeat("collector", max_silence=settings.health_timeout + 2 * BEAT_EVERY + 60)
        self.send_beat = Heartbeat("sender", max_silence=2 * (settings.connect_timeout + settings.read_timeout) + 60)
        self.heartbeats += [self.collect_beat, self.send_beat]

    def start(self) -> None:
        try:
            self.spool = Spool(self.settings.spool_path, self.settings.spool_max_bytes)
        except (OSError, sqlite3.Error) as exc:
            raise OtadError(f"cannot open the spool {self.settings.spool_path}: {exc}") from None
        self.sender = Sender(self.settings, self.spool, self.send_beat)
        try:
            self.collector = CollectLoop(self.settings, self.spool, self.sender, self.collect_beat)
        except OSError as exc:
            raise OtadError(f"cannot read the boot id or CPU times from /proc: {exc}") from None
        self.threads = [self.spawn("collector", self.collector.run), self.spawn("sender", self.sender.run)]
        log.info("robot %s, boot %s, sending to %s/metrics", self.settings.robot_id, self.collector.boot,
                 self.settings.gateway_url)

    def tick(self) -> float:
        return 1.0

    def apply_settings(self, settings: AgentSettings) -> None:
        if settings.state_dir != self.settings.state_dir:
            log.warning("STATE_DIR changes take effect at the next restart")
            settings = dataclasses.replace(settings, state_dir=self.settings.state_dir)
        self.settings = settings
        self.spool.set_bound(settings.spool_max_bytes)
        self.collect_beat.max_silence = settings.health_timeout + 2 * BEAT_EVERY + 60
        self.send_beat.max_silence = 2 * (settings.connect_timeout + settings.read_timeout) + 60
        self.collector.apply(settings)
        self.sender.apply(settings)

    def shutdown(self) -> None:
        self.collector.stop()
        self.sender.stop()
        for thread in self.threads:
            thread.join(timeout=10)
        # A request still hanging in its read timeout: leave the spool to process exit
        # rather than close it under that thread (SQLite keeps the data either way).
        if not any(t.is_alive() for t in self.threads):
            self.spool.close()

    def status(self) -> str:
        return self.sender.status()


def main(argv: list[str] | None = None) -> int:
    return daemon_main("telemetry-agent", DEFAULT_CONFIG, AgentSettings, Agent, argv)


if __name__ == "__main__":
    sys.exit(main())
