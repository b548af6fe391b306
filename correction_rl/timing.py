"""``PhaseClock``: seconds per named phase of one step, the one timer the learner
(``train/phase/<name>_s``) and the Ray driver (``driver/<name>_s``) report with.

Why one: "where does a step's time go" is asked on both sides of the pipeline (docs/benchmarks.md,
issue 19), and the two answers must be measured the same way to be compared. On CUDA a phase
only ends when its kernels have run, so the learner passes ``torch.cuda.synchronize`` as
``synchronize``; a kernel launch returns before the work is done.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable


class PhaseClock:
    def __init__(self, phases: Iterable[str] = (), synchronize: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(phases, 0.0)
        """Seconds per phase; phases named up front are reported even when they never ran."""
        self.started = time.perf_counter()
        self.synchronize = synchronize

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        """Seconds since the clock was made (the phases leave out what ran between them)."""
        return time.perf_counter() - self.started

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}<phase>_s`` per phase."""
        return {f"{prefix}{name}_s": value for name, value in self.seconds.items()}
