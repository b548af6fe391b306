"""Busy-time accounting shared by every actor (the ``*/idle_fraction`` metrics)."""

from __future__ import annotations

import time


class BusyClock:
    """Fraction of wall time a role spent working (``1 - idle fraction``): where a pipeline
    slower than its slowest stage waits."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.busy = 0.0

    def add(self, seconds: float) -> None:
        self.busy += seconds

    def idle_fraction(self) -> float:
        wall = time.perf_counter() - self.started
        return max(0.0, 1.0 - self.busy / wall) if wall > 0 else 0.0
