"""An endless, seeded, resumable stream of training prompts.

The loop asks for ``next_batch(n)``; the stream walks a shuffled permutation of the training
prompts and reshuffles each epoch. Its whole state is ``(epoch, position)``, which is what a
checkpoint needs to continue with exactly the prompts a crashed run would have drawn next.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from correction_rl.types import Prompt


@dataclass
class StreamState:
    epoch: int = 0
    position: int = 0


class PromptStream:
    def __init__(self, prompts: Sequence[Prompt], seed: int):
        if not prompts:
            raise ValueError("the training prompt set is empty (task.num_train or task.prompts_file)")
        self.prompts = list(prompts)
        self.seed = seed
        self.state = StreamState()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        batch: list[Prompt] = []
        while len(batch) < n:
            if self.state.position == len(self._order):
                self.state = StreamState(self.state.epoch + 1, 0)
                self._order = self._permutation(self.state.epoch)
            batch.append(self.prompts[self._order[self.state.position]])
            self.state.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = StreamState(int(state["epoch"]), int(state["position"]))
        self._order = self._permutation(self.state.epoch)
