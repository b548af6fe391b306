"""The buffer actor: the replay buffer, its durable correction log and the async hand-off
ledger, in one actor that lives as long as the run (Ray never restarts it)."""

from __future__ import annotations

import threading
from typing import Any, Sequence

from correction_rl.buffer.correction_log import CorrectionLog
from correction_rl.buffer.replay import ReplayBuffer
from correction_rl.config import RunConfig
from correction_rl.distributed.records import BufferRestore, BufferSnapshot, WorkerState
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

    def add(self, pairs: list[CorrectionPair], batch_key: BatchKey | None = None) -> int:
        with self.lock:
            admitted = self.buffer.add(pairs).admitted
            self.handoffs.resolve(batch_key)
        return admitted

    def wait_for_room(self, timeout: float) -> bool:
        return self.buffer.wait_for_room(timeout)

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

    def checkpoint_state(self, num_workers: int) -> BufferSnapshot:
        """Async mode: the buffer and the workers' states in one snapshot — every prompt drawn
        before a worker's position is either in the buffer's log up to ``log_records`` or drawn
        again first on resume (``HandoffLedger.checkpoint_states``)."""
        with self.lock:
            return BufferSnapshot(
                buffer=self.buffer.state_dict(),
                rollout_workers=[WorkerState.from_dict(s) for s in self.handoffs.checkpoint_states(num_workers)],
            )

    def sample(self, n: int, learner_version: int, timeout: float) -> list[CorrectionPair] | None:
        """Wait up to ``timeout`` for ``n`` admissible pairs, then sample them (None if not)."""
        if not self.buffer.wait_until_ready(n, learner_version, timeout):
            return None
        return self.buffer.sample(n, learner_version)

    def set_learner_version(self, version: int) -> int:
        return self.buffer.set_learner_version(version)

    def metrics(self) -> dict[str, float]:
        return self.buffer.stats().as_metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> BufferRestore:
        """Restore a checkpointed buffer; pairs logged after the checkpoint are admitted too,
        and their prompt ids are returned (the rollout workers do not draw those again)."""
        result = self.buffer.load_state_dict(state)
        return BufferRestore(logged=result.logged, admitted=result.admitted, size=len(self.buffer),
                             prompts_logged_after=tuple(result.prompts_logged_after))

    def close(self) -> None:
        self.buffer.close()
