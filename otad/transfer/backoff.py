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


class RejectedManifests:
    """Manifests whose release failed verification, held back so that a bad
    release does not cost a download every poll. Only the latest is remembered:
    once the server publishes anything else, that is looked at at once."""

    def __init__(self, base: float = 600.0, cap: float = 6 * 3600.0) -> None:
        self._base, self._cap = base, cap
        self._digest: str | None = None
        self._until = 0.0
        self._backoff = Backoff(base, cap)

    def held(self, digest: str, now: float) -> bool:
        return digest == self._digest and now < self._until

    def reject(self, digest: str, now: float) -> None:
        if digest != self._digest:
            self._digest, self._backoff = digest, Backoff(self._base, self._cap)
        self._until = now + self._backoff.failure()
