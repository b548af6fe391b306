"""The one interface every rollout engine implements."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from correction_rl.types import Prompt, Rollout, Sampling, WeightUpdate


@runtime_checkable
class Generator(Protocol):
    """Samples responses y ~ pi(.|x) and accepts new weights from the learner.

    ``policy_version`` is stamped on every ``Rollout`` so the buffer can bound staleness; it only
    changes through ``load_weights``.
    """

    policy_version: int

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        """One ``Rollout`` per prompt, in order, with engine-side log-probs."""
        ...

    def load_weights(self, update: WeightUpdate) -> None:
        """Replace the engine's weights with ``update`` and adopt ``update.version``."""
        ...


class EngineUnhealthy(RuntimeError):
    """An engine that can no longer serve (its process died, ``check_health`` says why). The
    Ray driver replaces the rollout worker that raised it (docs/reliability.md)."""
