"""Typed records of the run lifecycle shared by both drivers (re-exported by ``run/lifecycle.py``).

* ``RunState``: the ONE checkpoint state layout (``state.json``). Both drivers write and read it,
  so a checkpoint says the same things whatever mode wrote it, and a state of the wrong shape is
  refused with a ``CheckpointError`` naming the field (the lifecycle then tries an older one).
* ``ResumeReport``: what a restore found; ``as_metrics()`` gives the ``resume/*`` keys.
* ``StopSignals`` / ``RunInterrupted``: SIGINT/SIGTERM stop a run after the current step with a
  checkpoint.
* ``sample_or_collect``: a learner step's pairs, collecting more first when the buffer has too
  few, at most ``MAX_COLLECTION_ROUNDS`` rounds, then a readable error instead of a hang.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from correction_rl.run.checkpoint import Checkpoint, CheckpointError
from correction_rl.errors import UserError

T = TypeVar("T")
P = TypeVar("P")
MAX_COLLECTION_ROUNDS = 100


@dataclass
class RunState:
    """What an exact resume needs besides the learner's own files (``<ckpt>/learner``)."""

    version: int
    """Learner steps done (the policy version)."""
    buffer: dict[str, Any]
    """``ReplayBuffer.state_dict()`` (the pairs themselves are in the correction log)."""
    streams: list[dict[str, Any] | None]
    """Per rollout worker, the prompt-stream state its restore takes (in-process: the one
    ``PromptStream.state_dict()``; None: that worker reported none yet)."""
    pairs_trained: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    """The driver's cumulative counters (``teacher/skipped/*``, ``resume/*``, ...)."""
    rng: list[Any] | None = None
    """The driver's ``random.Random`` state as JSON (``[version, internal, gauss]``), if it has one."""
    wandb_run_id: str | None = None
    """The W&B run a resume continues."""
    generator_version: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, ckpt: Checkpoint) -> "RunState":
        """The state of ``ckpt``; ``CheckpointError`` naming the field if it has the wrong shape."""
        raw = ckpt.state
        where = ckpt.path / "state.json"
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: not a JSON object")
        checks = (("version", int, True), ("buffer", dict, True), ("streams", list, True),
                  ("pairs_trained", int, False), ("counters", dict, False), ("rng", list, False),
                  ("wandb_run_id", str, False), ("generator_version", int, False))
        for name, kind, required in checks:
            value = raw.get(name)
            if value is None and not required:
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                raise CheckpointError(f"{where}: {name!r} is {value!r}, expected {kind.__name__} "
                                      "(a state of another layout, or a damaged one)")
        return cls(
            version=raw["version"], buffer=raw["buffer"], streams=list(raw["streams"]),
            pairs_trained=raw.get("pairs_trained") or 0, counters=dict(raw.get("counters") or {}),
            rng=raw.get("rng"), wandb_run_id=raw.get("wandb_run_id"), generator_version=raw.get("generator_version"),
        )


@dataclass(frozen=True)
class ResumeReport:
    """What a restore did; the same keys in every mode."""

    from_step: int
    pairs_logged_after_checkpoint: int
    """Pairs in the correction log written after the checkpoint (teacher work before a crash)."""
    pairs_admitted_after_checkpoint: int
    buffer_size: int
    prompts_skipped: int
    """Prompts drawn after the checkpoint whose pairs were logged: passed over, not drawn again."""
    prompts_replayed: int | None = None
    """Prompts in flight at the checkpoint, drawn again first (Ray modes; None in-process)."""

    def as_metrics(self) -> dict[str, float]:
        out = {f"resume/{k}": float(v) for k, v in asdict(self).items() if v is not None}
        return out

    def summary(self, path: Path) -> str:
        return (f"resumed from {path} at step {self.from_step} ({self.pairs_logged_after_checkpoint} pairs "
                f"logged after it, buffer {self.buffer_size})")


class RunInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after the current step; a checkpoint was written."""

    def __init__(self, signame: str, step: int, checkpoint: Path | None):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        super().__init__(
            f"{signame}: stopped after learner step {step}; checkpoint {checkpoint} "
            f"(resume with `correction-rl train --resume {checkpoint.parent.parent if checkpoint else '<run_dir>'}`)"
        )


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (the first one); a second
    one interrupts at once (KeyboardInterrupt). Installed only in the main thread."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: finishing the current step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class NoBatchError(RuntimeError, UserError):
    """The buffer gave no learner batch after ``MAX_COLLECTION_ROUNDS`` collection rounds."""


@dataclass
class Collected(Generic[P, T]):
    pairs: P
    last_round: T | None
    """What the last collection round returned (None: the buffer had a batch at once)."""
    rounds: int


def sample_or_collect(sample: Callable[[], P | None], collect: Callable[[], T], what: str,
                      hint: str, max_rounds: int = MAX_COLLECTION_ROUNDS) -> Collected[P, T]:
    """``sample()`` until it gives a batch, running ``collect()`` (one collection round) between
    tries, at most ``max_rounds`` rounds; then ``NoBatchError``: "no batch of <what> after N
    collection rounds; <hint>"."""
    last: T | None = None
    for rounds in range(max_rounds + 1):
        pairs = sample()
        if pairs is not None:
            return Collected(pairs, last, rounds)
        if rounds < max_rounds:
            last = collect()
    raise NoBatchError(f"the buffer gave no batch of {what} after {max_rounds} collection rounds; {hint}")
