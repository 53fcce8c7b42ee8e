"""The dashboard power-cut loop's two drivers (tests/powercut_dashboard.py).

`PublishWatch`: inotify on OTA_DIR through the mount, naming the publish's step as it
happens and freezing the publisher (SIGSTOP) on the step a cut is armed on, so the cut
lands at that instant. `Poster`: a gateway's forwarder as the dashboard sees it.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import random
import signal
import subprocess
import threading
import warnings
from collections.abc import Callable

import requests

from fleet import GATEWAY_TOKEN, metric

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # pyinotify imports asyncore
    import pyinotify


class PublishWatch:
    """inotify on OTA_DIR through the mount: the publish's steps as they happen, and a cut armed on one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.roles: dict[str, str] = {}
        self.last = "publish starting"
        self.target: tuple[str, str] | None = None
        self.victim: int | None = None
        self.fired = threading.Event()
        self.notifier = None

    def start(self, folder: Path) -> None:
        manager = pyinotify.WatchManager()
        manager.add_watch(str(folder), pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO)
        logging.getLogger("pyinotify").handlers.clear()
        self.notifier = pyinotify.ThreadedNotifier(manager, self._event)
        self.notifier.daemon = True
        self.notifier.start()

    def stop(self) -> None:
        if self.notifier is not None:
            self.notifier.stop()
            self.notifier = None

    def arm(self, roles: dict[str, str], target: tuple[str, str] | None, victim: int | None) -> None:
        with self.lock:
            self.roles, self.target, self.victim = roles, target, victim
            self.last = "publish starting"
            self.fired.clear()

    def _event(self, event) -> None:
        kind = "create" if event.mask & pyinotify.IN_CREATE else "moved"
        name = event.name or ""
        if kind == "create" and name.startswith(".") and name.endswith(".tmp"):
            name = name[1:-4].rsplit(".", 1)[0]  # fsutil's temp file beside NAME: .NAME.XXXXXX.tmp
        role = self.roles.get(name, name)
        with self.lock:
            if self.victim is None:
                return
            self.last = f"{'copying' if kind == 'create' else 'renamed'} {role}"
            if self.target == (kind, role) and not self.fired.is_set():
                os.kill(self.victim, signal.SIGSTOP)  # the power goes at this instant
                self.fired.set()


class Killable:
    """A plain process as PowerLayer.cut kills its daemons."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Poster(threading.Thread):
    """A gateway's forwarder as the dashboard sees it: numbered rows in batches, resent until acknowledged."""

    def __init__(self, url: Callable[[], str], buffer_id: str, robot: str, seed: int) -> None:
        super().__init__(daemon=True, name=f"poster-{robot}")
        self.url, self.buffer_id, self.robot = url, buffer_id, robot
        self.rng = random.Random(seed)
        self.acked = 0  # the highest row the dashboard acknowledged with a 2xx
        self.refusals: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            first = self.acked + 1
            rows = range(first, first + self.rng.randint(1, 20))
            payload = {"gateway_id": "gw", "buffer_id": self.buffer_id, "backlog": 0, "quarantined": 0,
                       "records": [{"id": row, "received": 1.0, "record": metric(self.robot, row)} for row in rows]}
            body = gzip.compress(json.dumps(payload, separators=(",", ":")).encode())
            headers = {"Authorization": f"Bearer {GATEWAY_TOKEN}", "Content-Type": "application/json",
                       "Content-Encoding": "gzip"}
            try:
                answer = requests.post(f"{self.url()}/metrics", data=body, headers=headers, timeout=5)
            except requests.RequestException:
                self.stopping.wait(0.05)  # the dashboard is down: retry, as the forwarder does
                continue
            if answer.status_code == 200:
                self.acked = max(self.acked, answer.json()["acked"])
            elif answer.status_code < 500:
                self.refusals.append(f"{self.robot}: HTTP {answer.status_code} {answer.text.strip()[:200]}")
                return
            self.stopping.wait(self.rng.uniform(0.0, 0.1))
