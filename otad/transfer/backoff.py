"""Retry pacing: exponential backoff with jitter, and jittered poll intervals.

Jitter keeps a fleet of gateways (or a site of robots) that lost the network
together from hammering the server together when it returns.
"""
from __future__ import annotations

import random


class Backoff:
    def __init__(self, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.failures = 0
        self._rng = rng or random.Random()

    def failure(self) -> float:
        """Record a failure; return how long to wait before the next try."""
        ceiling = min(self.cap, self.base * (2 ** min(self.failures, 32)))
        self.failures += 1
        # "Equal jitter": never less than half the ceiling, so the backoff still grows.
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def success(self) -> None:
        self.failures = 0


def jittered(interval: float, spread: float = 0.1, rng: random.Random | None = None) -> float:
    """interval +/- spread (10% by default)."""
    return interval * (1 + (rng or random).uniform(-spread, spread))


class ManifestPoll:
    """What a poller keeps between two polls of a manifest: the ETag it sends as
    `If-None-Match`, and the hold on a manifest it refused. Shared by the gateway
    (polling the dashboard) and the robot (polling its gateway).

    An ETag stands for "this manifest has been dealt with", so a 304 means "nothing
    to do". A refused manifest has not been dealt with: its ETag is sent only while
    its hold lasts (10 minutes, doubling up to 6 hours while the same manifest keeps
    being refused), so a bad release does not cost a download every poll, yet once
    the hold ends the next poll fetches the manifest whole and tries it again (the
    cause may be gone: a clock set right, a corrupt .part deleted, room made in the
    cache). Any other manifest is looked at at once. `reset()` (SIGHUP: the operator
    may have removed the cause) forgets the ETag and the hold at the next poll.

    Used by one worker thread; only `reset()` is called from another (the main loop).
    """

    def __init__(self, base: float = 600.0, cap: float = 6 * 3600.0) -> None:
        self._base, self._cap = base, cap
        self._reset_requested = False
        self._clear()

    def _clear(self) -> None:
        self._etag: str | None = None
        self._etag_digest: str | None = None
        self._digest: str | None = None  # the refused manifest's sha256
        self._until = 0.0
        self._backoff = Backoff(self._base, self._cap)

    def etag(self, now: float) -> str | None:
        """The If-None-Match for this poll, None for an unconditional GET."""
        if self._reset_requested:
            self._reset_requested = False
            self._clear()
        if self._etag_digest is not None and self._etag_digest == self._digest and now >= self._until:
            return None  # the refused manifest's hold is over: fetch it whole and try it again
        return self._etag

    def seen(self, etag: str | None, digest: str) -> None:
        """A 200: the manifest with this sha256 came with this ETag."""
        self._etag, self._etag_digest = etag, digest

    def forget(self) -> None:
        """Look at the manifest again at the next poll (a cut download, an install to retry)."""
        self._etag = self._etag_digest = None

    def held(self, digest: str, now: float) -> bool:
        return digest == self._digest and now < self._until

    def reject(self, digest: str, now: float) -> float:
        """Hold a refused manifest back; return for how long."""
        if digest != self._digest:
            self._digest, self._backoff = digest, Backoff(self._base, self._cap)
        hold = self._backoff.failure()
        self._until = now + hold
        return hold

    def reset(self) -> None:
        """Forget the ETag and any hold before the next poll (from any thread)."""
        self._reset_requested = True
