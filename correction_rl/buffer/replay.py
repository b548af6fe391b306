"""Replay buffer of correction pairs: durable first, bounded staleness, back-pressure.

Why it works the way it does (docs/buffer.md has the long form):

* **Durable first.** ``add`` appends the batch to the ``CorrectionLog`` (flushed + fsync'ed)
  before the pairs enter memory, so no teacher work is lost whatever happens to them later.
* **Staleness is bounded by admission control, not by silent drops.** A pair's staleness is
  ``learner_version - pair.policy_version``; only pairs with staleness <= ``max_staleness`` are
  sampled. Dropping old pairs quietly biases training toward whatever arrives fast (short
  responses, easy prompts), so the buffer prevents staleness upstream instead: producers ask
  ``has_room()`` / ``wait_for_room()`` before generating and pause while ``max_pending``
  unsampled pairs are waiting, and FIFO sampling consumes the oldest admissible pairs first.
  A pair that still goes stale (the learner outran a slow teacher) leaves memory with a counted
  reason (``stale`` / ``stale_on_arrival``), stays in the durable log, and the mean length of
  such pairs is reported next to the mean length of sampled ones so a length bias is visible.
* **Each pair is sampled at most ``max_reuse`` times** (default once), then leaves memory.
* **Capacity** evicts the oldest pairs (closest to going stale), counted as ``capacity``.

Thread safe (one lock + condition), so the same object serves rollout/teacher threads and the
learner, or sits inside a Ray actor (use a threaded actor if callers block in the ``wait_*``
methods).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from correction_rl.config import BufferConfig
from correction_rl.buffer.correction_log import CorrectionLog, read
from correction_rl.buffer.stats import BufferStats, BufferCounters
from correction_rl.types import CorrectionPair
from correction_rl.errors import UserError

STATE_FORMAT = 1
EVICTION_REASONS = ("stale", "stale_on_arrival", "capacity", "noop")


class BufferStateError(ValueError, UserError):
    """A checkpointed buffer state that does not match the durable log it is restored from."""


@dataclass(frozen=True)
class AddResult:
    """What happened to one ``add`` batch (every pair lands in exactly one bucket)."""

    admitted: int
    """Entered memory and can be sampled."""
    duplicates: int
    """Pair id already seen (in the log or the buffer): ignored, not logged twice."""
    stale_on_arrival: int
    """Logged, but already past ``max_staleness`` when it arrived: not admitted (counted)."""
    noops_not_admitted: int
    """Logged no-op pairs kept out of memory because ``admit_noops`` is False."""
    evicted_for_capacity: int
    """Older pairs evicted to make room for this batch."""

    @property
    def logged(self) -> int:
        return self.admitted + self.stale_on_arrival + self.noops_not_admitted


@dataclass(frozen=True)
class RestoreResult(AddResult):
    """``load_state_dict``: what happened to the pairs logged after the checkpoint."""

    prompts_logged_after: tuple[str, ...] = ()
    """Their prompt ids, in log order: a resumed run's prompt streams pass over them
    (``PromptStream.account_for_logged``) since their pairs are back in the buffer."""


@dataclass
class _Entry:
    pair: CorrectionPair
    seq: int
    uses: int = 0


class ReplayBuffer:
    """Versioned store of ``CorrectionPair``s between the teachers and the learner."""

    def __init__(self, cfg: BufferConfig, log: CorrectionLog | str | Path | None = None, seed: int = 0):
        """``log``: an open ``CorrectionLog``, or a path to open one here (what a Ray actor
        passes, since an open log cannot be pickled), or None for a memory-only buffer.
        ``seed``: the buffer's own sampling RNG (used when ``sample`` gets no ``rng``, e.g.
        across a Ray call where a passed RNG's advance would be lost; checkpointed)."""
        max_pending = cfg.capacity if cfg.max_pending is None else cfg.max_pending
        for name, value, low in (("capacity", cfg.capacity, 1), ("max_staleness", cfg.max_staleness, 0),
                                 ("max_pending", max_pending, 1), ("max_reuse", cfg.max_reuse, 1),
                                 ("min_fresh_pairs", cfg.min_fresh_pairs, 0)):
            if value < low:
                raise ValueError(f"buffer.{name} must be >= {low}, got {value}")
        if max_pending > cfg.capacity:
            raise ValueError(f"buffer.max_pending ({max_pending}) must not exceed buffer.capacity ({cfg.capacity})")
        self.cfg = cfg
        self.log = CorrectionLog(log) if isinstance(log, (str, Path)) else log
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._seen: set[str] = set()  # dedupe when no log is attached
        self._seq = 0
        self._learner_version = 0
        self._counters = BufferCounters()
        self._rng = random.Random(seed)
        self._closed = False

    # ------------------------------------------------------------------ producers
    def add(self, pairs: Iterable[CorrectionPair]) -> AddResult:
        """Log the pairs durably (one fsync per batch), then admit the fresh ones to memory.
        Never refuses teacher work: back-pressure is the producers' job (``wait_for_room``)."""
        pairs = list(pairs)
        with self._cond:
            if self.log is not None:
                fresh = self.log.append(pairs)
            else:
                fresh, ids = [], set()
                for p in pairs:
                    if p.pair_id not in self._seen and p.pair_id not in ids:
                        ids.add(p.pair_id)
                        fresh.append(p)
                self._seen.update(ids)
            result = self._admit(fresh)
            result = AddResult(result.admitted, len(pairs) - len(fresh), result.stale_on_arrival,
                               result.noops_not_admitted, result.evicted_for_capacity)
            self._counters.duplicates += result.duplicates
            self._cond.notify_all()
            return result

    def _admit(self, fresh: list[CorrectionPair]) -> AddResult:
        admitted = stale = noops = 0
        c = self._counters
        for pair in fresh:
            c.added += 1
            c.noop_added += pair.is_noop
            if self._learner_version - pair.policy_version > self.cfg.max_staleness:
                stale += 1
                self._evict_count("stale_on_arrival", pair)
            elif pair.is_noop and not self.cfg.admit_noops:
                noops += 1
                c.evicted["noop"] += 1
            else:
                self._entries[pair.pair_id] = _Entry(pair, self._seq)
                self._seq += 1
                admitted += 1
        evicted = 0
        while len(self._entries) > self.cfg.capacity:
            oldest = min(self._entries.values(), key=lambda e: (e.uses == 0, e.pair.policy_version, e.seq))
            del self._entries[oldest.pair.pair_id]
            self._evict_count("capacity", oldest.pair)
            evicted += 1
        return AddResult(admitted, 0, stale, noops, evicted)

    def _evict_count(self, reason: str, pair: CorrectionPair) -> None:
        self._counters.evicted[reason] += 1
        if reason.startswith("stale"):
            self._counters.tokens_stale += len(pair.rejected_ids)

    def _pending(self) -> int:
        return sum(1 for e in self._entries.values() if e.uses == 0)

    def has_room(self) -> bool:
        """True while fewer than ``max_pending`` unsampled pairs wait: producers may go on."""
        with self._cond:
            return self._pending() < self.max_pending

    def room(self) -> int:
        """How many more pairs producers may bring before they should pause."""
        with self._cond:
            return max(0, self.max_pending - self._pending())

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Block until ``has_room()`` (True) or the timeout / ``close()`` (False)."""
        with self._cond:
            t0 = time.perf_counter()
            ok = self._cond.wait_for(lambda: self._closed or self._pending() < self.max_pending, timeout)
            self._counters.producer_wait_s += time.perf_counter() - t0
            return ok and not self._closed

    # ------------------------------------------------------------------ learner
    def set_learner_version(self, version: int) -> int:
        """Tell the buffer the learner's version; evicts (and counts) pairs now too stale.
        Returns the number evicted. Versions never go back."""
        with self._cond:
            n = self._advance(version)
            self._cond.notify_all()
            return n

    def _advance(self, version: int) -> int:
        if version < self._learner_version:
            raise ValueError(
                f"learner version went back from {self._learner_version} to {version} "
                "(a resumed learner must restore its version before using the buffer)"
            )
        self._learner_version = version
        stale = [e for e in self._entries.values()
                 if version - e.pair.policy_version > self.cfg.max_staleness]
        for e in stale:
            del self._entries[e.pair.pair_id]
            self._evict_count("stale", e.pair)
        return len(stale)

    def ready(self, n: int, learner_version: int) -> bool:
        """Whether ``sample(n, learner_version)`` would return a batch now."""
        with self._cond:
            return self._admissible(learner_version) >= max(n, self.cfg.min_fresh_pairs)

    def wait_until_ready(self, n: int, learner_version: int, timeout: float | None = None) -> bool:
        with self._cond:
            t0 = time.perf_counter()
            ok = self._cond.wait_for(
                lambda: self._closed or self._admissible(learner_version) >= max(n, self.cfg.min_fresh_pairs),
                timeout,
            )
            self._counters.learner_wait_s += time.perf_counter() - t0
            return ok and not self._closed

    def _admissible(self, version: int) -> int:
        return sum(1 for e in self._entries.values()
                   if version - e.pair.policy_version <= self.cfg.max_staleness)

    def sample(self, n: int, learner_version: int, rng: Any = None) -> list[CorrectionPair] | None:
        """``n`` distinct admissible pairs (FIFO: oldest version first; or uniform), or None
        while fewer than ``max(n, min_fresh_pairs)`` are admissible. ``rng``: a
        ``random.Random`` or ``numpy.random.Generator`` (uniform mode; default: the buffer's)."""
        if n < 1:
            raise ValueError(f"sample size must be >= 1, got {n}")
        with self._cond:
            self._advance(learner_version)
            candidates = list(self._entries.values())
            if len(candidates) < max(n, self.cfg.min_fresh_pairs):
                return None
            if self.cfg.sampling == "fifo":
                # Fewest uses first (with max_reuse > 1 every pair is used once before any is
                # used twice), then the oldest version (closest to going stale), then arrival.
                candidates.sort(key=lambda e: (e.uses, e.pair.policy_version, e.seq))
                chosen = candidates[:n]
            else:
                chosen = [candidates[i] for i in _choose(rng or self._rng, len(candidates), n)]
            c = self._counters
            c.last_batch_staleness = [learner_version - e.pair.policy_version for e in chosen]
            for e, staleness in zip(chosen, c.last_batch_staleness):
                e.uses += 1
                c.sampled += 1
                c.sampled_staleness[max(0, staleness)] += 1
                c.tokens_sampled += len(e.pair.rejected_ids)
                if e.uses >= self.cfg.max_reuse:
                    del self._entries[e.pair.pair_id]
            self._cond.notify_all()
            return [e.pair for e in chosen]

    def close(self) -> None:
        """Shutdown: wake every waiter (they return False) and close the attached log (which
        releases its writer lock, so a resumed run in this process can reopen it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self.log is not None:
                self.log.close()

    # ------------------------------------------------------------------ observability
    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def stats(self) -> BufferStats:
        with self._cond:
            c, v = self._counters, self._learner_version
            hist = Counter(max(0, v - e.pair.policy_version) for e in self._entries.values())
            last = c.last_batch_staleness
            stale_n = c.evicted["stale"] + c.evicted["stale_on_arrival"]
            return BufferStats(
                size=len(self._entries), admissible=self._admissible(v), pending=self._pending(),
                max_pending=self.max_pending, learner_version=v,
                staleness_hist={k: hist.get(k, 0) for k in range(self.cfg.max_staleness + 1)},
                sampled_staleness_hist=dict(sorted(c.sampled_staleness.items())),
                added=c.added, duplicates=c.duplicates, sampled=c.sampled,
                evicted={r: c.evicted.get(r, 0) for r in EVICTION_REASONS}, noop_added=c.noop_added,
                last_batch_staleness_mean=sum(last) / len(last) if last else 0.0,
                last_batch_staleness_max=max(last) if last else 0,
                mean_len_sampled=c.tokens_sampled / c.sampled if c.sampled else 0.0,
                mean_len_stale=c.tokens_stale / stale_n if stale_n else 0.0,
                producer_wait_s=c.producer_wait_s, learner_wait_s=c.learner_wait_s,
            )

    def metrics(self) -> dict[str, float]:
        """``stats()`` flattened with the ``buffer/`` prefix (for any ``MetricSink``)."""
        return self.stats().as_metrics()

    # ------------------------------------------------------------------ checkpoint / resume
    def state_dict(self) -> dict[str, Any]:
        """Pair ids in memory (with their use counts), counters and the log position; the
        pairs themselves live in the durable log. JSON-serializable."""
        with self._cond:
            entries = sorted(self._entries.values(), key=lambda e: e.seq)
            version, internal, gauss = self._rng.getstate()
            return {
                "format": STATE_FORMAT,
                "learner_version": self._learner_version,
                "entries": [[e.pair.pair_id, e.uses] for e in entries],
                "log_records": self.log.num_records if self.log is not None else None,
                "counters": self._counters.to_dict(),
                "rng": [version, list(internal), gauss],
            }

    def load_state_dict(self, state: dict[str, Any], log_path: str | Path | None = None) -> RestoreResult:
        """Restore a checkpointed buffer exactly, reading the pairs from the durable log
        (``log_path`` or the attached log's path). Pairs logged AFTER the checkpoint (teacher
        work done before a crash) are admitted too, subject to staleness; pairs sampled or
        evicted before the checkpoint stay out."""
        if state.get("format") != STATE_FORMAT:
            raise BufferStateError(f"buffer state format {state.get('format')!r}; expected {STATE_FORMAT}")
        path = self._log_path(log_path)
        uses = {pid: int(u) for pid, u in state["entries"]}
        cut = state.get("log_records")
        with self._cond:
            self._entries.clear()
            self._counters = BufferCounters.from_dict(state["counters"])
            self._learner_version = int(state["learner_version"])
            v, internal, gauss = state["rng"]
            self._rng.setstate((v, tuple(internal), gauss))
            kept, new, found = [], [], set()
            for i, pair in enumerate(read(path)):
                self._seen.add(pair.pair_id)
                if pair.pair_id in uses:
                    kept.append(pair)
                    found.add(pair.pair_id)
                elif cut is not None and i >= cut:
                    new.append(pair)
            missing = [pid for pid in uses if pid not in found]
            if missing:
                raise BufferStateError(
                    f"{path}: {len(missing)} pair(s) of the checkpointed buffer are not in the log "
                    f"(first: {missing[:3]}); is this the run's own correction log?"
                )
            for pair in kept:  # restored pairs were already counted as added
                self._entries[pair.pair_id] = _Entry(pair, self._seq, uses[pair.pair_id])
                self._seq += 1
            result = self._admit(new)
            self._cond.notify_all()
            return RestoreResult(**dataclasses.asdict(result), prompts_logged_after=tuple(p.prompt_id for p in new))

    def restore_from_log(self, path: str | Path | None = None, learner_version: int | None = None) -> AddResult:
        """Rebuild memory from the durable log alone (no checkpoint state): every logged pair
        that is fresh enough for ``learner_version`` is admitted (which ones were already
        sampled is unknown without a state, so prefer ``load_state_dict`` when one exists)."""
        path = self._log_path(path)
        with self._cond:
            if learner_version is not None:
                self._advance(learner_version)
            pairs = [p for p in read(path) if p.pair_id not in self._entries]
            self._seen.update(p.pair_id for p in pairs)
            result = self._admit(pairs)
            self._cond.notify_all()
            return result

    def _log_path(self, path: str | Path | None) -> Path:
        if path is not None:
            return Path(path)
        if self.log is None:
            raise BufferStateError("no correction log attached and no log path given")
        return self.log.path


def _choose(rng: Any, k: int, n: int) -> list[int]:
    if isinstance(rng, random.Random):
        return rng.sample(range(k), n)
    return [int(i) for i in rng.choice(k, size=n, replace=False)]  # numpy Generator


def suggested_max_pending(pairs_per_step: int, max_staleness: int) -> int:
    """A ``max_pending`` under which FIFO consumes waiting pairs before they go stale: the
    learner uses ``pairs_per_step`` per version, and a pair may wait ``max_staleness`` versions
    (plus the batch being trained on)."""
    return max(1, pairs_per_step * (max_staleness + 1))
