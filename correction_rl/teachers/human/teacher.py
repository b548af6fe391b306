"""``HumanTeacher``: the ``Teacher`` whose corrections come from people through the queue.

``correct(rollouts)`` enqueues the batch and collects corrections as annotators save them,
waiting at most ``wait_s``. What did not arrive by then is withdrawn from the queue (so nobody
spends effort on a rollout the run no longer waits for) and either handed to a ``fallback``
teacher (the run keeps going with another teacher) or returned as a rejection with reason
``timeout`` (counted like any teacher's rejection, docs/teachers.md). Withdrawal and saving are
both single SQLite transactions, so a correction saved at the deadline is either used or was
never saved — never both, never lost.
"""

from __future__ import annotations

import time
from typing import Sequence

from correction_rl.teachers.base import Teacher
from correction_rl.teachers.human.queue import CorrectionQueue
from correction_rl.types import Correction, Rollout

PREFIX = "teacher/human/"


class HumanTeacher:
    """Corrections from annotators (web app or offline JSONL import) via a ``CorrectionQueue``."""

    def __init__(
        self,
        queue: CorrectionQueue,
        wait_s: float = 600.0,
        poll_s: float = 0.2,
        fallback: Teacher | None = None,
        server=None,
        name: str = "human",
    ) -> None:
        if wait_s < 0:
            raise ValueError(f"wait_s={wait_s}: must be >= 0")
        self.name = name
        self.queue = queue
        self.wait_s = float(wait_s)
        self.poll_s = float(poll_s)
        self.fallback = fallback
        self.server = server
        """This process's share of the web app (``host.HostLease``, or an ``app.Server``) when the
        teacher was built with one; released by ``close`` (the app moves to another process)."""

    @property
    def url(self) -> str | None:
        """The web app's address (the serving process may be another one), or None."""
        return self.server.url if self.server is not None else None

    def correct(self, rollouts: Sequence[Rollout]) -> list[Correction]:
        if not rollouts:
            return []
        ids = self.queue.enqueue(rollouts)
        deadline = time.monotonic() + self.wait_s
        while True:
            items = self.queue.items(ids)
            done = {i: item for i, item in items.items() if item.state == "done"}
            if len(done) == len(ids) or time.monotonic() >= deadline:
                break
            if any(item.state == "cancelled" for item in items.values()):
                # another caller waiting for the same rollout (same content id) gave up on it
                self.queue.enqueue(rollouts)
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        late = [i for i in ids if i not in done]
        if late:
            self.queue.cancel(late)
            done = self.queue.done(ids)  # a save that won the race against the cancel counts
        out: list[Correction | None] = []
        missing: list[int] = []
        for k, (item_id, rollout) in enumerate(zip(ids, rollouts)):
            item = done.get(item_id)
            if item is None:
                missing.append(k)
                out.append(Correction(rollout=rollout, corrected_text=None, teacher=self.name,
                                      rejection="timeout", latency_s=self.wait_s))
                continue
            wait = float(item.done_at - item.enqueued_at)
            out.append(Correction(rollout=rollout, corrected_text=item.corrected, teacher=self.name, latency_s=wait))
        if missing and self.fallback is not None:
            backup = self.fallback.correct([rollouts[k] for k in missing])
            for k, correction in zip(missing, backup):
                out[k] = correction
        return out  # type: ignore[return-value]

    def metrics(self) -> dict[str, float]:
        """``teacher/human/...``: queue depth, time to correct, edit distance per annotator.

        All of them are counted over the whole queue file, not this process: in the Ray modes
        several teacher workers share one queue and the driver merges their metric dicts key by
        key, so every worker must report the same, complete numbers. A withdrawn (cancelled)
        item is exactly a ``timeout`` — only ``correct()`` withdraws items."""
        counts = self.queue.counts()
        withdrawn = float(counts["cancelled"])
        out = {
            f"{PREFIX}queue_depth": float(counts["pending"] + counts["leased"]),
            f"{PREFIX}queue_leased": float(counts["leased"]),
            f"{PREFIX}rollouts": float(sum(counts.values())),
            f"{PREFIX}accepted": float(counts["done"]),
            f"{PREFIX}rejected/timeout": withdrawn,
            f"{PREFIX}fallback": withdrawn if self.fallback is not None else 0.0,
            f"{PREFIX}wait_s_mean": self.queue.wait_s_mean(),
        }
        for who, stats in self.queue.annotator_stats().items():
            for key, value in stats.items():
                out[f"{PREFIX}{key}/{who}"] = value
        fallback_metrics = getattr(self.fallback, "metrics", None)
        if callable(fallback_metrics):
            out.update(fallback_metrics())
        return out

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        close_fallback = getattr(self.fallback, "close", None)
        if callable(close_fallback):
            close_fallback()
