"""`otad-robot`: recovery, then the worker thread under the shared daemon loop."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from otad.daemon import Daemon, Heartbeat, daemon_main
from otad.robot.installer import Installer
from otad.robot.outbox import Outbox
from otad.robot.settings import DEFAULT_CONFIG, RobotSettings
from otad.robot.state import StateStore
from otad.robot.worker import Worker
from otad.transfer.tls import plain_http_warning

log = logging.getLogger("otad.robot")


class Robot(Daemon):
    name = "otad-robot"

    def __init__(self, settings: RobotSettings, config_path: Path) -> None:
        super().__init__(settings, config_path)
        # The worker beats on progress only (bytes downloaded or unpacked, a command still
        # within its deadline, a planned wait), so the allowed silence need not cover a
        # whole install: see RobotSettings.worker_silence.
        self.work_beat = Heartbeat("worker", max_silence=settings.worker_silence)
        self.heartbeats.append(self.work_beat)
        self.installer = Installer(settings, StateStore(settings.state_dir), Outbox(settings.state_dir),
                                   beat=self.work_beat.beat)

    def start(self) -> None:
        self.installer.recover()
        current = self.installer.app.target("CURRENT")
        log.info("recovered: CURRENT is app %s (robot %s)", current or "none", self.settings.robot_id)
        if warning := plain_http_warning(self.settings.gateway_url, "GATEWAY_URL"):
            log.warning("%s", warning)
        self.worker = Worker(self.settings, self.installer, self.work_beat)
        self.thread = self.spawn("worker", self.worker.run)

    def tick(self) -> float:
        return 1.0

    def apply_settings(self, settings: RobotSettings) -> None:
        if settings.app_dir != self.settings.app_dir or settings.state_dir != self.settings.state_dir:
            log.warning("APP_DIR/STATE_DIR changes take effect at the next restart")
            return
        self.settings = settings
        self.work_beat.max_silence = settings.worker_silence
        self.worker.apply(settings)

    def shutdown(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=10)

    def status(self) -> str:
        current = self.installer.app.target("CURRENT")
        text = f"CURRENT app {current or 'none'}"
        worker = getattr(self, "worker", None)
        if worker is not None and worker.downloading is not None:
            version, received, total = worker.downloading
            text += f"; downloading {version} ({100 * received // total if total else 0}%)"
        elif self.installer.step:
            text += f"; installing {self.installer.state.target}: {self.installer.step}"
        if worker is not None and worker.gate.update and not self.installer.step:
            text += f"; update: {worker.gate.update}"  # waiting for a lease, deferred, inhibited
        return text


def main(argv: list[str] | None = None) -> int:
    return daemon_main("otad-robot", DEFAULT_CONFIG, RobotSettings, Robot, argv)


if __name__ == "__main__":
    sys.exit(main())
