"""What the replay buffer counts and reports: its cumulative counters (checkpointed with its
state) and the ``BufferStats`` snapshot that becomes the ``buffer/*`` metrics.

Kept apart from ``replay.py`` so the buffer's rules (admission, staleness, sampling, restore)
read without the bookkeeping around them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BufferStats:
    """A snapshot of the buffer for metrics and health checks."""

    size: int
    admissible: int
    pending: int
    """Pairs never sampled yet (what back-pressure counts)."""
    max_pending: int
    learner_version: int
    staleness_hist: dict[int, int]
    """Pairs in memory by staleness (learner version minus the version of y)."""
    sampled_staleness_hist: dict[int, int]
    """All pairs ever sampled, by staleness at sampling time."""
    added: int
    duplicates: int
    sampled: int
    evicted: dict[str, int]
    noop_added: int
    last_batch_staleness_mean: float
    last_batch_staleness_max: int
    mean_len_sampled: float
    """Mean length of y over sampled pairs (compare with ``mean_len_stale``)."""
    mean_len_stale: float
    """Mean length of y over pairs evicted as stale: a gap to the above is a length bias."""
    producer_wait_s: float = 0.0
    """Total seconds producers spent blocked in ``wait_for_room`` (back-pressure at work)."""
    learner_wait_s: float = 0.0
    """Total seconds the learner spent blocked in ``wait_until_ready`` (starved of pairs)."""

    @property
    def noop_rate(self) -> float:
        return self.noop_added / self.added if self.added else 0.0

    def as_metrics(self, prefix: str = "buffer/") -> dict[str, float]:
        out = {
            "size": self.size, "admissible": self.admissible, "pending": self.pending,
            "room": max(0, self.max_pending - self.pending), "learner_version": self.learner_version,
            "added": self.added, "duplicates": self.duplicates, "sampled": self.sampled,
            "noop_rate": self.noop_rate, "evicted_total": sum(self.evicted.values()),
            "last_batch_staleness_mean": self.last_batch_staleness_mean,
            "last_batch_staleness_max": self.last_batch_staleness_max,
            "mean_len_sampled": self.mean_len_sampled, "mean_len_stale": self.mean_len_stale,
            "producer_wait_s": self.producer_wait_s, "learner_wait_s": self.learner_wait_s,
        }
        n = sum(self.sampled_staleness_hist.values())
        out["sampled_staleness_mean"] = (
            sum(k * v for k, v in self.sampled_staleness_hist.items()) / n if n else 0.0
        )
        out.update({f"evicted/{k}": v for k, v in self.evicted.items()})
        out.update({f"staleness/{k}": v for k, v in sorted(self.staleness_hist.items())})
        return {f"{prefix}{k}": float(v) for k, v in out.items()}



@dataclass
class BufferCounters:
    """Cumulative counts since the run began (saved in the buffer state, so they survive a resume)."""

    added: int = 0
    duplicates: int = 0
    sampled: int = 0
    noop_added: int = 0
    evicted: Counter = field(default_factory=Counter)
    sampled_staleness: Counter = field(default_factory=Counter)
    tokens_sampled: int = 0
    tokens_stale: int = 0
    producer_wait_s: float = 0.0
    learner_wait_s: float = 0.0
    last_batch_staleness: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["evicted"] = dict(self.evicted)
        out["sampled_staleness"] = {str(k): v for k, v in self.sampled_staleness.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BufferCounters":
        d = dict(d)
        d["evicted"] = Counter(d.get("evicted", {}))
        d["sampled_staleness"] = Counter({int(k): v for k, v in d.get("sampled_staleness", {}).items()})
        return cls(**d)
