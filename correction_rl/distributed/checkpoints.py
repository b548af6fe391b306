"""Checkpoint and restore of a Ray run, in the one state layout both drivers share
(``RunState``, ``run/state.py``; docs/reliability.md).

What is special under Ray is where the state lives: the learner's files are written by every
rank (DeepSpeed: each its ZeRO shard); the buffer and, in async mode, each rollout worker's
stream position after its last hand-off live in the buffer actor and are snapshotted together
(``BufferActor.checkpoint_state``); in sync mode nothing is in flight between lockstep rounds
and each round reported the positions (``ActorHealth.stream_states``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from correction_rl.config import RunConfig, to_dict
from correction_rl.distributed.calls import get_within
from correction_rl.distributed.health import ActorHealth
from correction_rl.distributed.records import BufferRestore, BufferSnapshot, WorkerState
from correction_rl.run.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from correction_rl.run.state import ResumeReport, RunState


class Checkpointer:
    """Writes and restores the checkpoints of one Ray run."""

    def __init__(self, cfg: RunConfig, cluster, health: ActorHealth) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.health = health
        self.timeout = cfg.resources.call_timeout_s
        self.trained_through: Callable[[], int | None] = lambda: None
        """The last lent batch the learner trained (the driver's ``BatchSource``): a batch
        sampled after it (a prefetch) goes into the checkpoint as unsampled pairs."""

    def snapshot(self, timeout: float) -> BufferSnapshot:
        c = self.cluster
        if self.cfg.mode == "async":  # producers run on: their hand-offs, snapshotted with the pairs
            return get_within(c.buffer.checkpoint_state.remote(len(c.rollout_workers), self.trained_through()), timeout,
                              "buffer and hand-off state for a checkpoint")
        # between lockstep rounds nothing is in flight; each round reported the positions
        return BufferSnapshot(
            buffer=get_within(c.buffer.state_dict.remote(), timeout, "buffer state for a checkpoint"),
            rollout_workers=[self.health.stream_states.get(i) for i in range(len(c.rollout_workers))],
        )

    def write(self, version: int, pairs_trained: int, wandb_run_id: str | None,
              timeout: float | None = None) -> Path:
        """Learner state from every rank, the buffer state, each rollout worker's prompt-stream
        position, the driver's counters; atomic (``save_checkpoint``)."""
        timeout = timeout or self.timeout
        snap = self.snapshot(timeout)
        state = RunState(
            version=version, buffer=snap.buffer, pairs_trained=pairs_trained, wandb_run_id=wandb_run_id,
            streams=[None if s is None else s.as_dict() for s in snap.rollout_workers],
        )
        learners = self.cluster.learners

        def learner_files(directory: Path) -> None:
            get_within([r.save_state.remote(str(directory / "learner")) for r in learners], timeout,
                       "learner ranks saving a checkpoint")

        return save_checkpoint(self.cfg.run_dir, version, state.to_json(), to_dict(self.cfg),
                               write_files=learner_files, keep=self.cfg.checkpoint.keep)

    def restore(self, ckpt: Checkpoint) -> tuple[RunState, ResumeReport]:
        """Load ``ckpt`` into freshly started actors (the caller then pushes the restored
        weights out). Rollout workers get their stream positions back unless the number of
        workers changed (then they start fresh streams)."""
        c, state = self.cluster, RunState.of(ckpt)
        versions = get_within([r.load_state.remote(str(ckpt.path / "learner")) for r in c.learners],
                              self.timeout, "learner ranks loading a checkpoint")
        if set(versions) != {state.version}:
            raise CheckpointError(f"{ckpt.path}: learner ranks restored versions {versions}, "
                                  f"expected {state.version}")
        after: BufferRestore = get_within(c.buffer.load_state_dict.remote(state.buffer), self.timeout,
                                          "buffer restore")
        restored: list[WorkerState] = []
        if len(state.streams) == len(c.rollout_workers):
            saved = [WorkerState.from_dict(s) for s in state.streams]
            restored = get_within([w.load_state_dict.remote(s, list(after.prompts_logged_after))
                                   for w, s in zip(c.rollout_workers, saved)], self.timeout, "rollout worker restore")
            if self.cfg.mode == "async":  # positions until each producer's first hand-off
                get_within(c.buffer.seed_stream_positions.remote(restored), self.timeout, "stream positions")
            else:
                self.health.stream_states = dict(enumerate(restored))
        return state, ResumeReport(
            from_step=ckpt.step,
            pairs_logged_after_checkpoint=after.logged,
            pairs_admitted_after_checkpoint=after.admitted,
            buffer_size=after.size,
            # prompts drawn after the checkpoint whose pairs were logged before the crash, passed
            # over; prompts in flight at the checkpoint, drawn again first (docs/reliability.md)
            prompts_skipped=sum(s.prompts_skipped for s in restored),
            prompts_replayed=sum(s.prompts_replayed for s in restored),
        )
