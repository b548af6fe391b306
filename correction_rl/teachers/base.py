"""The one interface every teacher implements (oracle, vLLM, HTTP, human)."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from correction_rl.types import Correction, Rollout


@runtime_checkable
class Teacher(Protocol):
    """Returns, for each rollout, the minimal correction y' (y' == y when y is already right).

    A teacher never raises for one bad sample: a failure becomes a ``Correction`` with
    ``corrected_text=None`` and a counted ``rejection`` reason, so one bad answer cannot stop a
    run (docs/teachers.md).
    """

    name: str

    def correct(self, rollouts: Sequence[Rollout]) -> list[Correction]:
        """One ``Correction`` per rollout, in order."""
        ...
