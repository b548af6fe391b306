"""Which prompts are with a teacher right now, and where each rollout worker's stream stood
after its last hand-off — the part of an async run's state that lives between two actors.

In async mode a rollout worker hands a batch to a teacher and draws the next one at once, so at
any moment some prompts have left the stream but their pairs are not in the buffer yet. A
checkpoint that stored only the workers' stream positions would skip those prompts on resume
(their corrections never reached the log); one that stored the positions before them would
regenerate prompts whose corrections did arrive. The ledger records both halves in one place,
the buffer actor, which also stores the pairs: a batch stops being "in flight" in the same call
that stores its pairs, so one snapshot of buffer and ledger is consistent (docs/reliability.md,
"Prompts in flight").

A batch can also be lost while the run goes on: a teacher that dies while correcting a batch
whose producer died too (nobody is left to retry the call), or a call that failed beyond Ray's
retries. Its prompts would then stay "in flight" for good, and since they count against the
producers' room, the producers would wait for room forever. So a producer that is restarted
hands its batches still in flight back (``requeue``): their prompts are drawn again first, and
pairs that still arrive for them later are dropped (``resolve`` says so), so no prompt gets two
corrections.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from correction_rl.prompts.stream import with_replay

BatchKey = tuple[int, int]
"""(rollout worker id, that worker's sampling-call count after the batch): unique per batch."""


class HandoffLedger:
    """Per rollout worker: the stream state after its last handed-off batch, and the prompt ids
    of handed-off batches whose pairs have not been stored yet."""

    def __init__(self) -> None:
        self.positions: dict[int, dict[str, Any]] = {}
        self.in_flight: dict[BatchKey, list[str]] = {}
        self.requeued: set[BatchKey] = set()
        """Batches handed back by a restarted producer: their prompts are drawn again, so pairs
        that still arrive for them are not stored."""

    def note(self, worker_id: int, state: dict[str, Any], prompt_ids: Sequence[str]) -> BatchKey:
        """A batch leaves ``worker_id`` for a teacher; ``state`` is the worker's state after
        drawing it. Notes may arrive out of order (a threaded actor): the state with the most
        sampling calls is the position."""
        key = (worker_id, int(state["calls"]))
        self.in_flight[key] = list(prompt_ids)
        self.seed(worker_id, state)
        return key

    def seed(self, worker_id: int, state: dict[str, Any] | None) -> None:
        """A worker's known position without a hand-off (a resumed run's restored state)."""
        known = self.positions.get(worker_id)
        if state is not None and (known is None or state["calls"] >= known["calls"]):
            self.positions[worker_id] = state

    @property
    def prompts_in_flight(self) -> int:
        """Prompts handed to a teacher whose pairs are not stored yet (they hold producer room)."""
        return sum(len(ids) for ids in self.in_flight.values())

    def resolve(self, key: BatchKey | None) -> bool:
        """The batch's pairs arrived: it is no longer in flight. False: the batch was requeued
        and its prompts are drawn again, so these pairs must not be stored."""
        if key is None:
            return True
        if key in self.requeued:
            self.requeued.discard(key)
            return False
        self.in_flight.pop(key, None)
        return True

    def requeue(self, worker_id: int) -> int:
        """``worker_id``'s producer was restarted: nobody may be waiting on its batches still in
        flight any more. Its position draws their prompts again first (oldest first), and they
        stop holding room. Returns the number of prompts requeued."""
        keys = sorted(k for k in self.in_flight if k[0] == worker_id)
        if not keys:
            return 0
        prompts = [pid for key in keys for pid in self.in_flight.pop(key)]
        self.requeued.update(keys)
        self.positions[worker_id] = {**self.positions[worker_id],
                                     "stream": with_replay(self.positions[worker_id]["stream"], prompts)}
        return len(prompts)

    def position(self, worker_id: int) -> dict[str, Any] | None:
        return self.positions.get(worker_id)

    def checkpoint_states(self, num_workers: int) -> list[dict[str, Any] | None]:
        """Each worker's state for a checkpoint: its position after its last hand-off, drawing
        its batches still in flight again first (oldest first). None: a worker that handed off
        nothing yet starts its stream afresh."""
        out: list[dict[str, Any] | None] = []
        for worker_id in range(num_workers):
            state = copy.deepcopy(self.positions.get(worker_id))
            pending = [pid for key in sorted(k for k in self.in_flight if k[0] == worker_id)
                       for pid in self.in_flight[key]]
            if pending:  # a worker with batches in flight has noted its position
                state["stream"] = with_replay(state["stream"], pending)
            out.append(state)
        return out
