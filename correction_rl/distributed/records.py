"""Typed records that cross actor boundaries inside the Ray system.

Actor calls return these instead of dicts read by string keys, so a renamed field fails where it
is read, in a test, not as a ``KeyError`` deep in a fault path. They stay in ``distributed/``:
nothing outside the Ray system sends or receives them. What a checkpoint stores is plain JSON
(``as_dict`` / ``from_dict``), because checkpoints outlive the code that wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class EngineHealth:
    """One rollout worker's lock-free answer (``RolloutWorker.health``)."""

    pid: int
    """Its process id: a new one means Ray restarted the actor."""
    problem: str | None
    """The engine's own verdict (``ChecksHealth.check_health``): None while it can serve."""
    busy_for_s: float
    """How long the current engine call (generation, weight load) has run; 0 when idle."""


@dataclass(frozen=True)
class ProducerRoom:
    """What holds async producers back, seen by the buffer actor (``BufferActor.producer_room``):
    the figures a stalled run's error names, so a stall says whether the buffer was full, the
    teachers held the room, or the pairs went stale."""

    unsampled_pairs: int
    max_pending: int
    in_flight_batches: int
    """Batches handed to a teacher whose pairs are not stored yet."""
    in_flight_prompts: int
    learner_version: int
    admissible_pairs: int
    """Unsampled pairs the learner may still take at ``learner_version``."""

    def describe(self) -> str:
        return (f"buffer: {self.unsampled_pairs} unsampled pairs ({self.admissible_pairs} admissible at "
                f"learner version {self.learner_version}) of buffer.max_pending={self.max_pending}; "
                f"at the teachers: {self.in_flight_batches} batch(es), {self.in_flight_prompts} prompts")


@dataclass(frozen=True)
class WorkerState:
    """Where a rollout worker's prompt stream stands, and its sampling-call and token counts:
    what a checkpoint stores per worker and what a restarted worker is given back."""

    stream: dict[str, Any]
    """``PromptStream.state_dict()`` (with the prompts to draw again first, ``replay``)."""
    calls: int
    tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "calls": self.calls, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, state: dict[str, Any] | None) -> "WorkerState | None":
        if state is None:
            return None
        return cls(stream=state["stream"], calls=int(state["calls"]), tokens=int(state.get("tokens", 0)))

    @property
    def prompts_replayed(self) -> int:
        """Prompts in flight at a checkpoint, drawn again first on resume."""
        return len(self.stream.get("replay", []))

    @property
    def prompts_skipped(self) -> int:
        """Prompts drawn after a checkpoint whose pairs were logged before a crash, passed over."""
        return sum(self.stream.get("skip", {}).values())


@dataclass(frozen=True)
class BufferRestore:
    """What restoring the buffer actor from a checkpoint found (``BufferActor.load_state_dict``)."""

    logged: int
    """Pairs the correction log holds after the checkpoint (a crash lost them from the buffer)."""
    admitted: int
    """Of those, the ones admitted again."""
    size: int
    """Pairs in the buffer after the restore."""
    prompts_logged_after: tuple[str, ...]
    """Prompt ids of the pairs logged after the checkpoint: the rollout workers skip them."""


@dataclass(frozen=True)
class BufferSnapshot:
    """The buffer and every rollout worker's state, taken together (a checkpoint's data part):
    in async mode one snapshot of the buffer actor, so every prompt drawn before a worker's
    position is in the log or drawn again first on resume."""

    buffer: dict[str, Any]
    rollout_workers: Sequence[WorkerState | None]
