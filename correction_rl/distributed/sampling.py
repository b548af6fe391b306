"""Where a learner step's pairs come from in each mode.

``async``: the producers fill the buffer on their own; the driver asks for step k+1's batch
while step k trains (a prefetch), and waits (in slices, tending the producers between them) for
it. The pairs go from the buffer actor to the learner ranks by reference, never through the
driver, and stay *lent* until trained (a checkpoint holds them as unsampled,
``distributed/batches.py``). ``sync``: nothing produces between steps; while the buffer
has no batch, the driver runs one lockstep round — every rollout worker generates one batch, the
teachers correct them, the pairs are stored — at most ``MAX_COLLECTION_ROUNDS`` rounds
(``sample_or_collect``, shared with the in-process loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.actors import RestartedWorker
from correction_rl.distributed.batches import BatchInfo, ShardRef, shards
from correction_rl.distributed.calls import get_within
from correction_rl.distributed.health import ActorHealth
from correction_rl.distributed.producers import Producers, Recovery
from correction_rl.run.state import sample_or_collect
from correction_rl.types import CorrectionPair


@dataclass
class Batch:
    """One learner step's batch: its summary and one shard per learner rank (a ``ShardRef``
    the rank fetches itself in async mode, the pairs in sync mode)."""

    info: BatchInfo
    shards: list

    def pairs(self, timeout: float) -> list[CorrectionPair]:
        """The pairs themselves (only for a W&B corrections table: fetched on that step only)."""
        parts = [get_within(s.ref, timeout, "batch for a corrections table") if isinstance(s, ShardRef) else s
                 for s in self.shards]
        return [p for part in parts for p in part]


@dataclass
class SampleRequest:
    """A ``BufferActor.sample_batch`` call under way (the prefetch of the next step's batch)."""

    version: int
    refs: list
    """``[BatchInfo | None, shard_0, ...]``."""
    wait: float


class BatchSource:
    """The next learner batch at the learner's current version (``current_version()``).

    Async mode prefetches (``prefetch``): the request for step k+1's batch waits in the buffer
    actor while step k trains, and its pairs go to the learner ranks by reference."""

    def __init__(self, cfg: RunConfig, cluster, health: ActorHealth, producers: Producers,
                 recovery: Recovery, current_version: Callable[[], int]) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.health = health
        self.producers = producers
        self.recovery = recovery
        self.current_version = current_version
        self.timeout = cfg.resources.call_timeout_s
        self.ranks = len(cluster.learners)
        self.batch_pairs = cfg.learner.micro_batch_pairs * cfg.learner.grad_accum * self.ranks
        self.pending: SampleRequest | None = None
        """The prefetch under way (async mode)."""
        self.trained_through: int | None = None
        """The id of the last lent batch the learner trained (told to the buffer actor with the
        next sample or checkpoint: it stops counting that batch as lent)."""

    def next_batch(self) -> Batch:
        if self.cfg.mode == "async":
            self.producers.revive()
            return self.wait_for_batch()
        version = self.current_version()
        pairs = sample_or_collect(
            lambda: get_within(self.cluster.buffer.sample.remote(self.batch_pairs, version, 0.0),
                               self.timeout, "buffer sample"),
            self.collect_lockstep,
            what=f"{self.batch_pairs} admissible pairs at learner version {version} (sync mode)",
            hint="check buffer.max_staleness against the rollout workers' policy versions and the "
                 "teacher's rejection counters",
        ).pairs
        return Batch(BatchInfo(-1, version, tuple(p.policy_version for p in pairs)), shards(pairs, self.ranks))

    def prefetch(self, version: int) -> None:
        """Async mode: ask the buffer now for the batch of the step that will start from
        ``version`` (its staleness is checked at that version), while the current step trains."""
        if self.cfg.mode == "async" and self.pending is None:
            self.pending = self._request(version)

    def trained(self, batch: Batch) -> None:
        if batch.info.batch_id >= 0:
            self.trained_through = batch.info.batch_id

    def _request(self, version: int, wait: float = 5.0) -> SampleRequest:
        refs = self.cluster.buffer.sample_batch.options(num_returns=self.ranks + 1).remote(
            self.batch_pairs, version, wait, self.ranks, self.trained_through)
        return SampleRequest(version, refs, wait)

    def wait_for_batch(self) -> Batch:
        """Async mode: the prefetched request, or a new one; asked again in slices of at most
        5 s, tending the producers between them so dead ones are noticed and restarted, up to
        ``call_timeout_s`` for a learner batch."""
        deadline = time.monotonic() + self.timeout
        while True:
            request = self.pending or self._request(self.current_version(),
                                                    max(0.0, min(5.0, deadline - time.monotonic())))
            self.pending = None
            info = get_within(request.refs[0], request.wait + 60, "buffer sample")
            if info is not None:
                return Batch(info, [ShardRef(ref) for ref in request.refs[1:]])
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no batch of {self.batch_pairs} admissible pairs within {self.timeout:.0f} s: the "
                    f"producers stalled ({self._room_now()}; see teacher/skipped/* and rollout idle "
                    "fractions)"
                )
            self.producers.tend()
            self.pending = self._request(max(request.version, self.current_version()),
                                         max(0.0, min(5.0, deadline - time.monotonic())))

    def _room_now(self) -> str:
        """The buffer's view of the stall, for its error (bounded: the error must not wait)."""
        try:
            return get_within(self.cluster.buffer.producer_room.remote(), 30, "buffer room").describe()
        except Exception as exc:  # noqa: BLE001 - the stall is the error; this only adds to it
            return f"buffer state unknown: {type(exc).__name__}"

    def collect_lockstep(self) -> None:
        """Sync mode: every worker generates one batch; teachers correct; pairs are stored. A
        rollout worker that dies during the round is restarted by Ray: its stream and the
        current weights are restored into it and its batch repeated (bounded by
        ``resources.max_actor_restarts``; teacher calls are retried by Ray itself)."""
        workers = self.cluster.rollout_workers
        calls = {i: w.generate_round.remote() for i, w in enumerate(workers)}
        batches: dict[int, list] = {}
        for attempt in range(self.cfg.resources.max_actor_restarts + 1):
            failed = []
            for i, ref in calls.items():
                try:  # the position after the batch comes with it: a later kill cannot lose it
                    batches[i], self.health.stream_states[i] = get_within(ref, self.timeout, "generation")
                except (ray.exceptions.RayActorError, RestartedWorker):  # died, or restarted while idle
                    failed.append(i)
            if not failed:
                break
            if attempt == self.cfg.resources.max_actor_restarts:
                raise RuntimeError(f"rollout workers {failed} failed generating {attempt + 1} times in a "
                                   "row; more than resources.max_actor_restarts allows")
            print(f"warning: rollout workers {failed} were restarted; repeating their batch once their "
                  "streams are restored", flush=True)
            self.recovery.restore()
            calls = {i: workers[i].generate_round.remote() for i in failed}
        teachers = self.cluster.teachers
        pair_lists = get_within(
            [teachers[i % len(teachers)].correct.remote(batches[i]) for i in range(len(workers))],
            self.timeout,
            "correction",
        )
        pairs = [p for lst in pair_lists for p in lst]
        get_within(self.cluster.buffer.add.remote(pairs), self.timeout, "buffer add")
