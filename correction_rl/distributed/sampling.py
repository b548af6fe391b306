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
from typing import Any, Callable

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.actors import RestartedWorker
from correction_rl.distributed.batches import BatchInfo, ShardRef, shards
from correction_rl.distributed.calls import get_within
from correction_rl.distributed.health import ActorHealth
from correction_rl.distributed.producers import Producers, Recovery
from correction_rl.run.state import sample_or_collect
from correction_rl.types import CorrectionPair


SAMPLE_WAIT_S = 5.0
"""How long one ``sample_batch`` request waits in the buffer actor for admissible pairs: the
slice between two checks of the producers while the learner waits for a batch."""


@dataclass
class Batch:
    """One learner step's batch: its summary and one shard per learner rank (a ``ShardRef``
    the rank fetches itself in async mode, the pairs in sync mode)."""

    info: BatchInfo | None
    """None until ``resolve`` for the batch of a step issued ahead (``BatchSource.ahead``)."""
    shards: list
    info_ref: Any = None
    """A step issued ahead: the reference of its ``BatchInfo``, read once the step returned."""

    def resolve(self, timeout: float) -> BatchInfo | None:
        """The summary; None when the buffer had no batch ready within its request's wait (the
        learner ranks then trained nothing)."""
        if self.info is None and self.info_ref is not None:
            self.info = get_within(self.info_ref, timeout, "buffer sample")
        return self.info

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
        self.told_version = -1
        """The newest learner version a sample request told the buffer actor."""
        self.starved_since: float | None = None
        """Since when the steps issued ahead have found no batch (``missed``)."""

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

    def ahead(self, version: int) -> Batch:
        """Async mode: the batch of the step the driver issues ahead, which trains from
        ``version`` once the step under way is done: the prefetch when one is under way, else a
        new request. Nothing waits here: the learner ranks get the shards' references and wait for
        the pairs themselves; the summary is read when the step has returned (``resolve``).

        The caller has read the summary of the batch before (``Driver.issue_ahead``): one
        request at a time, since the buffer actor serves requests concurrently, and two waiting at
        once could lend in the other order, or sample at a version older than the other's."""
        self.producers.revive()
        request = self.pending or self._request(version)
        self.pending = None
        return Batch(None, [ShardRef(ref) for ref in request.refs[1:]], request.refs[0])

    def missed(self) -> None:
        """A step issued ahead found no batch within its request's wait: tend the producers as
        between two slices of ``wait_for_batch``, and stop the run with its error when no batch
        came for ``call_timeout_s``."""
        now = time.monotonic()
        if self.starved_since is None:
            self.starved_since = now - SAMPLE_WAIT_S  # the request waited that long already
        if now - self.starved_since >= self.timeout:
            raise self.starved()
        self.producers.tend()

    def trained(self, batch: Batch) -> None:
        self.starved_since = None
        if batch.info.batch_id >= 0:
            self.trained_through = batch.info.batch_id

    def starved(self) -> TimeoutError:
        return TimeoutError(
            f"no batch of {self.batch_pairs} admissible pairs within {self.timeout:.0f} s: the "
            "producers stalled (see teacher/skipped/* and rollout idle fractions)"
        )

    def _request(self, version: int, wait: float | None = None) -> SampleRequest:
        wait = SAMPLE_WAIT_S if wait is None else wait  # read when called: a test shortens it
        refs = self.cluster.buffer.sample_batch.options(num_returns=self.ranks + 1).remote(
            self.batch_pairs, version, wait, self.ranks, self.trained_through)
        self.told_version = max(self.told_version, version)
        return SampleRequest(version, refs, wait)

    def wait_for_batch(self) -> Batch:
        """Async mode: the prefetched request, or a new one; asked again in slices of at most
        5 s, tending the producers between them so dead ones are noticed and restarted, up to
        ``call_timeout_s`` for a learner batch."""
        deadline = time.monotonic() + self.timeout
        while True:
            request = self.pending or self._request(self.current_version(),
                                                    max(0.0, min(SAMPLE_WAIT_S, deadline - time.monotonic())))
            self.pending = None
            info = get_within(request.refs[0], request.wait + 60, "buffer sample")
            if info is not None:
                return Batch(info, [ShardRef(ref) for ref in request.refs[1:]])
            if time.monotonic() >= deadline:
                raise self.starved()
            self.producers.tend()
            self.pending = self._request(max(request.version, self.current_version()),
                                         max(0.0, min(SAMPLE_WAIT_S, deadline - time.monotonic())))

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
