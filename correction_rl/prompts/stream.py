"""An endless, seeded, resumable stream of training prompts.

The loop asks for ``next_batch(n)``; the stream walks a shuffled permutation of the training
prompts and reshuffles each epoch. Its state is ``(epoch, position)``, which is what a checkpoint
needs to continue with exactly the prompts a crashed run would have drawn next, plus two
corrections for the Ray modes, where batches are still with a teacher when a checkpoint is
written (docs/reliability.md, "Prompts in flight"):

* ``replay``: prompt ids drawn first, before the permutation continues — batches that were
  handed to a teacher before the checkpoint and whose corrections never reached the log;
* ``skip``: prompt ids passed over the next time the permutation reaches them — drawn after the
  checkpoint, and corrected and logged before the crash (the resumed buffer has those pairs).

What the stream holds of its prompts is a ``PromptSet``: a list (``PromptList``: built-in tasks,
prompt files) or ``indexed.DatasetPrompts``, which keeps row numbers and reads a prompt from
the memory-mapped dataset when it is drawn, so a million-row set is not held in memory. The
permutation is a compact ``array`` of positions (8 bytes each) shuffled exactly as the list of
positions was, so every set draws the same prompts at the same state as before.
"""

from __future__ import annotations

import random
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

from correction_rl.types import Prompt


@dataclass
class StreamState:
    epoch: int = 0
    position: int = 0
    replay: list[str] = field(default_factory=list)
    skip: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class PromptSet(Protocol):
    """What the stream needs of its prompts: how many, the ``k``-th, and one by id (None: not
    in this set, e.g. another worker's shard)."""

    def __len__(self) -> int: ...

    def __getitem__(self, k: int) -> Prompt: ...

    def find(self, prompt_id: str) -> Prompt | None: ...


class PromptList:
    """A ``PromptSet`` held in memory: the prompts and a map from id to prompt."""

    def __init__(self, prompts: Sequence[Prompt]):
        self.prompts = list(prompts)
        self.by_id = {p.prompt_id: p for p in self.prompts}

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, k: int) -> Prompt:
        return self.prompts[k]

    def find(self, prompt_id: str) -> Prompt | None:
        return self.by_id.get(prompt_id)


class PromptStream:
    def __init__(self, prompts: Sequence[Prompt] | PromptSet, seed: int):
        """``prompts``: a list of prompts, or a ``PromptSet`` read as it is drawn (a dataset's
        ``DatasetPrompts``, kept as it is: the stream never copies it into a list)."""
        self.prompts: PromptSet = prompts if isinstance(prompts, PromptSet) else PromptList(prompts)
        if not len(self.prompts):
            raise ValueError("the training prompt set is empty (task.num_train or task.prompts_file)")
        self.seed = seed
        self.state = StreamState()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> array:
        """Positions in draw order for ``epoch``. ``random.shuffle`` swaps elements by index, so
        shuffling this array gives the order it gives a list of the same positions."""
        order = array("q", range(len(self.prompts)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _held(self, prompt_id: str) -> bool:
        return self.prompts.find(prompt_id) is not None

    def next_batch(self, n: int) -> list[Prompt]:
        batch: list[Prompt] = []
        state = self.state
        while len(batch) < n:
            if state.replay:
                batch.append(self.prompts.find(state.replay.pop(0)))
                continue
            if state.position == len(self._order):
                self.state = state = StreamState(state.epoch + 1, 0, [], state.skip)
                self._order = self._permutation(state.epoch)
            prompt = self.prompts[self._order[state.position]]
            state.position += 1
            if state.skip.get(prompt.prompt_id, 0) > 0:
                state.skip[prompt.prompt_id] -= 1
                if not state.skip[prompt.prompt_id]:
                    del state.skip[prompt.prompt_id]
                continue
            batch.append(prompt)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.state.epoch, "position": self.state.position,
                "replay": list(self.state.replay), "skip": dict(self.state.skip)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state from ``state_dict`` (checkpoints written before ``replay``/``skip`` existed
        load as having none). Ids of prompts this stream does not hold are dropped: a worker's
        stream holds its own shard only."""
        replay = [i for i in state.get("replay", []) if self._held(i)]
        skip = {i: int(n) for i, n in state.get("skip", {}).items() if int(n) > 0 and self._held(i)}
        self.state = StreamState(int(state["epoch"]), int(state["position"]), replay, skip)
        self._order = self._permutation(self.state.epoch)

    def account_for_logged(self, prompt_ids: Iterable[str]) -> None:
        """Prompts whose corrections were logged after the checkpoint this stream was restored
        from: each occurrence cancels one pending replay of that prompt, or else is skipped once
        when the permutation reaches it — so no prompt goes to the teacher twice."""
        for prompt_id, n in Counter(i for i in prompt_ids if self._held(i)).items():
            while n and prompt_id in self.state.replay:
                self.state.replay.remove(prompt_id)
                n -= 1
            if n:
                self.state.skip[prompt_id] = self.state.skip.get(prompt_id, 0) + n


def with_replay(stream_state: dict[str, Any], prompt_ids: Sequence[str]) -> dict[str, Any]:
    """``stream_state`` that draws ``prompt_ids`` (drawn earlier, still with a teacher) again
    first, before its own pending replays."""
    return {**stream_state, "replay": [*prompt_ids, *stream_state.get("replay", [])]}
