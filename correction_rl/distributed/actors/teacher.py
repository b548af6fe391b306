"""The teacher worker actor: one teacher and the ingest step next to it (corrections -> pairs ->
reference log-probs -> buffer, ``pairs/ingest.py``): the same route as in-process, so the pairs
reach the buffer actor complete and no learner rank needs a reference model."""

from __future__ import annotations

import os
import time
from typing import Any, Protocol, Sequence, runtime_checkable

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.actors.clock import BusyClock
from correction_rl.distributed.actors.drills import DRILL_TEACHER_DELAY_ENV, drill_delay
from correction_rl.pairs.ingest import Ingest, IngestResult
from correction_rl.rollout.base import Closeable
from correction_rl.run.components import build_teacher
from correction_rl.types import CorrectionPair, Rollout


@runtime_checkable
class ReportsMetrics(Protocol):
    """LLM teachers count latency, tokens and rejections by reason (``teachers/metrics.py``)."""

    def metrics(self) -> dict[str, float]: ...


class RemoteBuffer:
    """The buffer actor as the ingest step's ``PairSink``: one bounded call per batch; the
    buffer marks the hand-off ``batch_key`` done in the same call (``HandoffLedger``)."""

    def __init__(self, buffer: Any, timeout_s: float) -> None:
        self.buffer = buffer
        self.timeout_s = timeout_s

    def add(self, pairs: list[CorrectionPair], batch_key: Any = None) -> int:
        return ray.get(self.buffer.add.remote(pairs, batch_key), timeout=self.timeout_s)


class TeacherWorker:
    """Holds one teacher; turns rollouts into pairs (with reference log-probs when needed)."""

    def __init__(self, cfg: RunConfig, worker_id: int):
        from correction_rl.models import load_tokenizer

        self.cfg = cfg
        self.worker_id = worker_id
        self.teacher = build_teacher(cfg)
        # pi_ref on this worker's own device: a GPU only if its bundle holds one (Ray may one day
        # stop hiding the node's GPUs from actors that asked for none). Built outside an actor
        # (tests use the class as a plain object) it must not start a Ray instance: get_gpu_ids
        # would connect one with the machine's own CPU count.
        device = "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"
        self.ingest = Ingest.from_config(cfg, load_tokenizer(cfg.model.path), device=device)
        """The one owner of pi_ref in a Ray run (one per teacher worker)."""
        self.clock = BusyClock()
        self.skipped: dict[str, int] = {}
        self.pairs = 0

    def pid(self) -> int:
        return os.getpid()

    def correct(self, rollouts: Sequence[Rollout]) -> list[CorrectionPair]:
        """Sync mode: the pairs of ``rollouts``, returned to the driver (which stores them)."""
        start = time.perf_counter()
        drill_delay(DRILL_TEACHER_DELAY_ENV)
        pairs, skipped = self.ingest.prepare(self.teacher.correct(rollouts))
        self._count(IngestResult(pairs, skipped), start)
        return pairs

    def correct_and_store(self, rollouts: Sequence[Rollout], buffer, batch_key=None) -> int:
        """Async mode: correct, then push straight into the buffer actor (no driver hop)."""
        start = time.perf_counter()
        drill_delay(DRILL_TEACHER_DELAY_ENV)
        sink = RemoteBuffer(buffer, self.cfg.resources.call_timeout_s)
        result = self.ingest(self.teacher.correct(rollouts), sink, batch_key)
        self._count(result, start)
        return len(result.pairs)

    def _count(self, result: IngestResult, start: float) -> None:
        for reason, n in result.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.pairs += len(result.pairs)
        self.clock.add(time.perf_counter() - start)

    def metrics(self) -> dict[str, float]:
        out = {
            f"teacher/worker{self.worker_id}/idle_fraction": self.clock.idle_fraction(),
            f"teacher/worker{self.worker_id}/pairs": float(self.pairs),
        }
        out.update({f"teacher/skipped/{k}": float(v) for k, v in self.skipped.items()})
        if isinstance(self.teacher, ReportsMetrics):  # LLM teachers: latency, tokens, rejections
            out.update(self.teacher.metrics())
        return out

    def close(self) -> None:
        self.ingest.close()
        if isinstance(self.teacher, Closeable):
            self.teacher.close()
