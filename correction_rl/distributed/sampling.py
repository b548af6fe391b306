"""Where a learner step's pairs come from in each mode.

``async``: the producers fill the buffer on their own; the driver waits (in slices, tending the
producers between them) for a batch. ``sync``: nothing produces between steps; while the buffer
has no batch, the driver runs one lockstep round — every rollout worker generates one batch, the
teachers correct them, the pairs are stored — at most ``MAX_COLLECTION_ROUNDS`` rounds
(``sample_or_collect``, shared with the in-process loop).
"""

from __future__ import annotations

import time
from typing import Callable

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.actors import RestartedWorker
from correction_rl.distributed.calls import get_within
from correction_rl.distributed.health import ActorHealth
from correction_rl.distributed.producers import Producers, Recovery
from correction_rl.run.state import sample_or_collect
from correction_rl.types import CorrectionPair


class BatchSource:
    """The next learner batch at the learner's current version (``current_version()``)."""

    def __init__(self, cfg: RunConfig, cluster, health: ActorHealth, producers: Producers,
                 recovery: Recovery, current_version: Callable[[], int]) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.health = health
        self.producers = producers
        self.recovery = recovery
        self.current_version = current_version
        self.timeout = cfg.resources.call_timeout_s
        self.batch_pairs = cfg.learner.micro_batch_pairs * cfg.learner.grad_accum * len(cluster.learners)

    def next_batch(self) -> list[CorrectionPair]:
        if self.cfg.mode == "async":
            self.producers.revive()
            return self.wait_for_batch()
        version = self.current_version()
        return sample_or_collect(
            lambda: get_within(self.cluster.buffer.sample.remote(self.batch_pairs, version, 0.0),
                               self.timeout, "buffer sample"),
            self.collect_lockstep,
            what=f"{self.batch_pairs} admissible pairs at learner version {version} (sync mode)",
            hint="check buffer.max_staleness against the rollout workers' policy versions and the "
                 "teacher's rejection counters",
        ).pairs

    def wait_for_batch(self) -> list[CorrectionPair]:
        """Async mode: wait (in slices of at most 5 s, tending the producers between them so dead
        ones are noticed and restarted) up to ``call_timeout_s`` for a learner batch."""
        n, version = self.batch_pairs, self.current_version()
        deadline = time.monotonic() + self.timeout
        pairs = None
        while pairs is None and time.monotonic() < deadline:
            wait = max(0.0, min(5.0, deadline - time.monotonic()))
            pairs = get_within(self.cluster.buffer.sample.remote(n, version, wait), wait + 60, "buffer sample")
            if pairs is None:
                self.producers.tend()
        if pairs is None:
            raise TimeoutError(
                f"no batch of {n} admissible pairs within {self.timeout:.0f} s: the producers "
                "stalled (see teacher/skipped/* and rollout idle fractions)"
            )
        return pairs

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
