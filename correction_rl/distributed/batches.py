"""Learner batches that travel around the driver: what the buffer actor lends, what the
learner ranks fetch themselves, and how a lent batch is accounted for at a checkpoint.

Why: in async mode the driver asks the buffer for step k+1's batch while step k trains
(``sampling.BatchSource.prefetch``). The pairs go from the buffer actor straight to the learner
ranks (each rank fetches its shard by reference, ``ShardRef``); the driver only reads the
batch's summary (``BatchInfo``: how many pairs, which policy versions). A batch that was sampled
but not yet trained when a checkpoint is taken must not be lost: the buffer actor keeps it as
*lent* (``LentBatches``) until the driver says it was trained, and a checkpoint's buffer state
holds lent pairs as unsampled, so a resume trains them (docs/reliability.md).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from correction_rl.types import CorrectionPair


@dataclass(frozen=True)
class BatchInfo:
    """The summary of one lent batch, all the driver reads of it."""

    batch_id: int
    """Sequential per buffer actor; ``trained_through`` releases every batch up to it."""
    sampled_at: int
    """The learner version the batch was sampled (and checked for staleness) at."""
    policy_versions: tuple[int, ...]
    """The version that produced each pair's y, in shard order (rank 0's pairs first)."""

    @property
    def num_pairs(self) -> int:
        return len(self.policy_versions)

    def staleness(self, learner_version: int) -> list[int]:
        """Per pair, at the version the step actually trains from (a skipped step trains a
        prefetched batch one version earlier than planned: lower, never higher)."""
        return [learner_version - v for v in self.policy_versions]


@dataclass(frozen=True)
class ShardRef:
    """One learner rank's shard as an object reference, wrapped so that Ray passes the reference
    instead of resolving it: the rank fetches it itself and times the transfer
    (``train/phase/batch_transfer_s``)."""

    ref: Any


def shards(pairs: Sequence[CorrectionPair], ranks: int) -> list[list[CorrectionPair]]:
    """Rank i trains ``pairs[i::ranks]`` (the driver's sharding, one place)."""
    return [list(pairs[i::ranks]) for i in range(ranks)]


class LentBatches:
    """Batches the buffer handed out that the learner has not trained yet (buffer actor side).

    ``release(trained_through)`` drops every batch up to that id (the driver piggybacks it on its
    next sample or checkpoint call, so this costs no round trip); ``fold_into`` writes the rest
    back into a buffer state as unsampled pairs.
    """

    def __init__(self) -> None:
        self.next_id = 0
        self.batches: dict[int, list[CorrectionPair]] = {}
        self.staleness: dict[int, list[int]] = {}

    def lend(self, pairs: list[CorrectionPair], sampled_at: int) -> BatchInfo:
        batch_id = self.next_id
        self.next_id += 1
        self.batches[batch_id] = pairs
        self.staleness[batch_id] = [sampled_at - p.policy_version for p in pairs]
        return BatchInfo(batch_id, sampled_at, tuple(p.policy_version for p in pairs))

    def release(self, trained_through: int | None) -> None:
        if trained_through is None:
            return
        for batch_id in [b for b in self.batches if b <= trained_through]:
            del self.batches[batch_id]
            del self.staleness[batch_id]

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def fold_into(self, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``ReplayBuffer.state_dict()`` with every lent pair unsampled again: its use
        count one lower (back in the entries, first in FIFO order, when sampling had removed
        it), and the sampling counters without it. A resume then samples it like any pending
        pair; its prompt is neither lost nor drawn again."""
        if not self.batches:
            return state
        uses = {pid: int(u) for pid, u in state["entries"]}
        returned: list[list] = []
        counters = dict(state["counters"])
        hist = Counter({int(k): int(v) for k, v in dict(counters.get("sampled_staleness", {})).items()})
        sampled, tokens = int(counters.get("sampled", 0)), int(counters.get("tokens_sampled", 0))
        for batch_id in sorted(self.batches):
            for pair, s in zip(self.batches[batch_id], self.staleness[batch_id]):
                if pair.pair_id in uses:
                    uses[pair.pair_id] = max(0, uses[pair.pair_id] - 1)
                else:
                    returned.append([pair.pair_id, 0])
                sampled -= 1
                tokens -= len(pair.rejected_ids)
                hist[max(0, s)] -= 1
        entries = returned + [[pid, uses[pid]] for pid, _ in state["entries"]]
        if "sampled" in counters:
            counters["sampled"] = max(0, sampled)
        if "tokens_sampled" in counters:
            counters["tokens_sampled"] = max(0, tokens)
        if "sampled_staleness" in counters:
            counters["sampled_staleness"] = {str(k): v for k, v in hist.items() if v > 0}
        return {**state, "entries": entries, "counters": counters}
