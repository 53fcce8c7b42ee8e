"""One metric sample: CPU and memory from /proc, the CURRENT release, the health command.

Records leave here without `seq`: the spool assigns it in the same
transaction that stores the record, so a number is never handed out twice.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from otad.robot import runner
from otad.robot.layout import AppDir

PROC = Path("/proc")


def rfc3339(epoch: float) -> str:
    """UTC with millisecond precision: two samples a second apart still sort by ts."""
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def boot_id(proc: Path = PROC) -> str:
    return (proc / "sys/kernel/random/boot_id").read_text().strip()


def cpu_times(proc: Path = PROC) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from the first line of /proc/stat."""
    with open(proc / "stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is already in user/nice.
    fields = (fields + [0] * 8)[:8]
    idle = fields[3] + fields[4]
    total = sum(fields)
    return total - idle, total


def memory_percent(proc: Path = PROC) -> float:
    values: dict[str, int] = {}
    with open(proc / "meminfo") as meminfo:
        for line in meminfo:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0])
    total, available = values.get("MemTotal", 0), values.get("MemAvailable", 0)
    if total <= 0:
        return 0.0
    return _clamp(100.0 * (1 - available / total))


def health(command: str, timeout: float) -> str:
    """The operator's verdict: exit 0 ok, exit 1 degraded, anything else (or a timeout) failed."""
    if not command:
        return "ok"
    outcome = runner.run(command, timeout)
    if outcome.ok:
        return "ok"
    return "degraded" if outcome.returncode == 1 else "failed"


def _clamp(value: float) -> float:
    return round(min(100.0, max(0.0, value)), 2)


class Collector:
    """Keeps the previous /proc/stat sample, so CPU % covers the time since the last record."""

    def __init__(self, proc: Path = PROC) -> None:
        self.proc = proc
        self._last = cpu_times(proc)

    def cpu_percent(self) -> float:
        busy, total = cpu_times(self.proc)
        last_busy, last_total = self._last
        self._last = (busy, total)
        if total <= last_total:
            return 0.0
        return _clamp(100.0 * (busy - last_busy) / (total - last_total))

    def sample(self, robot_id: str, boot: str, app_dir: Path, health_cmd: str, health_timeout: float) -> dict:
        # Health first: it may take seconds, and the CPU window should end at `ts`.
        verdict = health(health_cmd, health_timeout)
        return {
            "robot_id": robot_id,
            "boot_id": boot,
            "ts": rfc3339(time.time()),
            "type": "metric",
            "cpu": self.cpu_percent(),
            "mem": memory_percent(self.proc),
            "version": AppDir(app_dir).target("CURRENT") or "",
            "health": verdict,
        }
