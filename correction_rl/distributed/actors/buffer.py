"""The buffer actor: the replay buffer, its durable correction log and the async hand-off
ledger, in one actor that lives as long as the run (Ray never restarts it)."""

from __future__ import annotations

import threading
from typing import Any, Sequence

from correction_rl.buffer.correction_log import CorrectionLog
from correction_rl.buffer.replay import ReplayBuffer
from correction_rl.config import RunConfig
from correction_rl.distributed.batches import BatchInfo, LentBatches, shards
from correction_rl.distributed.records import BufferRestore, BufferSnapshot, ProducerRoom, WorkerState
from correction_rl.prompts.handoffs import BatchKey, HandoffLedger
from correction_rl.run.components import buffer_config
from correction_rl.types import CorrectionPair


class BufferActor:
    """The replay buffer and its durable correction log, in one actor (threaded: producers may
    block in ``wait_for_room`` while the learner samples)."""

    def __init__(self, cfg: RunConfig, log_path: str):
        self.buffer = ReplayBuffer(buffer_config(cfg), CorrectionLog(log_path, meta={"run": cfg.name}))
        self.handoffs = HandoffLedger()
        """Async mode: where each producer's stream stood after its last hand-off, and which
        prompts are with a teacher. Kept here because the buffer actor lives as long as the run
        and Ray never restarts it, so a restarted rollout worker can continue where its
        predecessor stopped, and because pairs and hand-offs must be snapshotted together."""
        self.lock = threading.Lock()
        """Orders ``add`` against ``checkpoint_state`` (this actor is threaded)."""
        self.changed = threading.Condition(self.lock)
        """Notified when pairs arrive or leave (``room``)."""
        self.max_staleness = cfg.buffer.max_staleness
        self.lent = LentBatches()
        """Batches sampled for the learner and not yet trained (a prefetch): a checkpoint holds
        them as unsampled (``distributed/batches.py``)."""
        self.learner_version = 0
        self.sampled_version: int | None = None
        """The learner version of the last sample: the next one is at least one version later."""
        self.waiting: list[int] = []
        """Versions of sample calls waiting for pairs now."""
        self.late_pairs_dropped = 0
        """Pairs that arrived for a batch requeued meanwhile (``requeue_in_flight``)."""

    def add(self, pairs: list[CorrectionPair], batch_key: BatchKey | None = None) -> int:
        with self.lock:
            if not self.handoffs.resolve(batch_key):  # requeued: its prompts are drawn again
                self.late_pairs_dropped += len(pairs)
                return 0
            admitted = self.buffer.add(pairs).admitted
            self.changed.notify_all()
        return admitted

    def requeue_in_flight(self, worker_id: int) -> int:
        """A restarted producer's batches still with a teacher go back to its stream (drawn
        again first) and stop holding room (``HandoffLedger.requeue``). Returns the prompts
        requeued; the driver then gives the worker its position (``stream_position``)."""
        with self.lock:
            n = self.handoffs.requeue(worker_id)
            self.changed.notify_all()
        return n

    def wait_for_room(self, timeout: float) -> bool:
        return self.buffer.wait_for_room(timeout)

    def room(self, timeout: float) -> int | None:
        """Async producers: wait up to ``timeout`` for room, then return the oldest policy
        version whose pairs the next learner sample can still admit (None: no room). Room
        counts the batches still at a teacher as pending: a producer that did not would draw
        one more batch while its last one is being corrected, a batch the learner never takes
        before it goes stale. A worker holding weights older than the answer waits for the load
        under way instead of generating (measured: one wasted batch per step without either,
        docs/benchmarks.md)."""
        with self.changed:
            if not self.changed.wait_for(lambda: self._room() > 0, timeout):
                return None
            if self.waiting:
                upcoming = min(self.waiting)
            elif self.sampled_version is not None and self.sampled_version >= self.learner_version:
                upcoming = self.sampled_version + 1
            else:
                upcoming = self.learner_version
        return upcoming - self.max_staleness

    def _room(self) -> int:
        return self.buffer.room() - self.handoffs.prompts_in_flight

    def producer_room(self) -> ProducerRoom:
        """What holds the producers back now (a stalled run names it)."""
        with self.lock:
            stats = self.buffer.stats()
            return ProducerRoom(unsampled_pairs=stats.pending, max_pending=stats.max_pending,
                                in_flight_batches=len(self.handoffs.in_flight),
                                in_flight_prompts=self.handoffs.prompts_in_flight,
                                learner_version=stats.learner_version, admissible_pairs=stats.admissible)

    def note_handoff(self, worker_id: int, state: WorkerState, prompt_ids: list[str]) -> BatchKey:
        """A producer's state after drawing a batch it is about to hand to a teacher, and that
        batch's prompts; returns the batch key the teacher passes back to ``add``."""
        with self.lock:
            return self.handoffs.note(worker_id, state.as_dict(), prompt_ids)

    def stream_position(self, worker_id: int) -> WorkerState | None:
        with self.lock:
            return WorkerState.from_dict(self.handoffs.position(worker_id))

    def seed_stream_positions(self, states: Sequence[WorkerState | None]) -> None:
        """A resumed run's restored worker states: positions until each worker hands off."""
        with self.lock:
            for worker_id, state in enumerate(states):
                self.handoffs.seed(worker_id, None if state is None else state.as_dict())

    def checkpoint_state(self, num_workers: int, trained_through: int | None = None) -> BufferSnapshot:
        """Async mode: the buffer and the workers' states in one snapshot — every prompt drawn
        before a worker's position is either in the buffer's log up to ``log_records`` or drawn
        again first on resume (``HandoffLedger.checkpoint_states``); a batch lent to the learner
        after ``trained_through`` (a prefetch not trained yet) is in it as unsampled pairs."""
        with self.lock:
            self.lent.release(trained_through)
            return BufferSnapshot(
                buffer=self.lent.fold_into(self.buffer.state_dict()),
                rollout_workers=[WorkerState.from_dict(s) for s in self.handoffs.checkpoint_states(num_workers)],
            )

    def sample(self, n: int, learner_version: int, timeout: float) -> list[CorrectionPair] | None:
        """Wait up to ``timeout`` for ``n`` admissible pairs, then sample them (None if not)."""
        if not self.buffer.wait_until_ready(n, learner_version, timeout):
            return None
        with self.lock:
            pairs = self.buffer.sample(n, learner_version)
            if pairs is not None:
                self._sampled_at(learner_version)
                self.changed.notify_all()
        return pairs

    def sample_batch(self, n: int, learner_version: int, timeout: float, ranks: int,
                     trained_through: int | None) -> list:
        """``sample``, lent and split into ``ranks`` shards; call with ``num_returns=ranks + 1``:
        ``[BatchInfo | None, shard_0, ..., shard_{ranks-1}]``. The driver reads only the info and
        hands each shard's reference to its learner rank, so the pairs never pass through the
        driver. ``trained_through``: the last batch id the learner has trained (released here)."""
        with self.lock:
            self.lent.release(trained_through)
            self.waiting.append(learner_version)
            self.learner_version = max(self.learner_version, learner_version)
            # every later sample is at this version or newer: pairs already too stale for it go
            # now, or they would hold the producers' room while this call waits for admissible ones
            self.buffer.set_learner_version(learner_version)
            self.changed.notify_all()
        try:
            ready = self.buffer.wait_until_ready(n, learner_version, timeout)
        finally:
            with self.lock:
                self.waiting.remove(learner_version)
        with self.lock:  # sampled and lent at once: a checkpoint sees the pairs in one or the other
            pairs = self.buffer.sample(n, learner_version) if ready else None
            if pairs is None:
                return [None] + [[] for _ in range(ranks)]
            self._sampled_at(learner_version)
            info: BatchInfo = self.lent.lend(pairs, learner_version)
            self.changed.notify_all()
        return [info, *shards(pairs, ranks)]

    def _sampled_at(self, version: int) -> None:
        self.learner_version = max(self.learner_version, version)
        self.sampled_version = max(self.sampled_version or 0, version)

    def set_learner_version(self, version: int) -> int:
        with self.lock:
            self.learner_version = max(self.learner_version, version)
            evicted = self.buffer.set_learner_version(version)
            self.changed.notify_all()
        return evicted

    def metrics(self) -> dict[str, float]:
        return {**self.buffer.stats().as_metrics(), "buffer/lent_pairs": float(len(self.lent)),
                "buffer/late_pairs_dropped": float(self.late_pairs_dropped)}

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> BufferRestore:
        """Restore a checkpointed buffer; pairs logged after the checkpoint are admitted too,
        and their prompt ids are returned (the rollout workers do not draw those again)."""
        result = self.buffer.load_state_dict(state)
        with self.lock:
            self.learner_version = int(state.get("learner_version", 0))
        return BufferRestore(logged=result.logged, admitted=result.admitted, size=len(self.buffer),
                             prompts_logged_after=tuple(result.prompts_logged_after))

    def close(self) -> None:
        self.buffer.close()
