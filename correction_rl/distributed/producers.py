"""Rollout workers that keep producing: async mode's producer tasks, and putting a restarted
rollout worker back to work (its stream position, the current weights, a new producer).

Ray restarts a dead rollout worker by itself (``resources.max_actor_restarts``); what it cannot
do is give the new process its predecessor's place in the prompt stream and the learner's
current weights. A restarted worker refuses to generate or evaluate until it has both
(``RestartedWorker``), so every path that meets one ends here: ``Recovery.restore`` finds the
restarts (``ActorHealth``), restores the streams and syncs the weights.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.actors import RestartedWorker
from correction_rl.distributed.calls import get_within
from correction_rl.distributed.health import ActorHealth
from correction_rl.distributed.weight_sync import WeightSyncer

T = TypeVar("T")


class Recovery:
    """Bring restarted rollout workers back: streams, then weights."""

    def __init__(self, cfg: RunConfig, health: ActorHealth, syncer: WeightSyncer) -> None:
        self.cfg = cfg
        self.health = health
        self.syncer = syncer

    def restore(self) -> None:
        self.health.count_restarts()  # waits for a restart under way, restores streams
        self.syncer.sync()  # restarted engines start from the initial weights

    def around(self, call: Callable[[], T], what: str) -> T:
        """``call()`` (a call on rollout workers), made again once a worker that died during it,
        or that Ray restarted earlier, has its stream position and the current weights back.
        Bounded by ``resources.max_actor_restarts``; a worker out of restarts raises
        ``ActorDiedError``."""
        for attempt in range(self.cfg.resources.max_actor_restarts + 1):
            try:
                return call()
            except (ray.exceptions.RayActorError, RestartedWorker) as exc:
                if attempt == self.cfg.resources.max_actor_restarts:
                    raise
                print(f"warning: {what} met a restarted rollout worker ({type(exc).__name__}); "
                      "restoring it and asking again", flush=True)
                self.restore()
        raise AssertionError("unreachable")


class Producers:
    """Async mode: one ``RolloutWorker.produce`` task per worker, restarted when it ends early.
    In sync mode there are none and every method is a no-op."""

    def __init__(self, cfg: RunConfig, cluster, health: ActorHealth, syncer: WeightSyncer,
                 recovery: Recovery) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.health = health
        self.syncer = syncer
        self.recovery = recovery
        self.timeout = cfg.resources.call_timeout_s
        self.tasks: list = []
        self.max_restarts = max(1, cfg.resources.max_actor_restarts) * (
            len(cluster.rollout_workers) + len(cluster.teachers))

    def start(self) -> None:
        if self.cfg.mode == "async":
            self.tasks = [self._produce(w) for w in self.cluster.rollout_workers]

    def _produce(self, worker):
        return worker.produce.remote(
            self.cluster.teachers, self.cluster.buffer, self.cfg.resources.max_inflight_batches, self.timeout
        )

    def revive(self) -> None:
        """A producer task ends only when stopped or when its rollout worker (or a teacher it
        waited on, beyond its retries) died. Ray restarts the actor; here its restarted engine
        gets its stream, the current weights and a new producer task."""
        if not self.tasks:
            return
        done, _ = ray.wait(self.tasks, num_returns=len(self.tasks), timeout=0)
        if not done:
            return
        self.syncer.finish_background()  # a pending load must not race the restarted worker's sync
        ended: dict[int, str] = {}
        for ref in done:
            i = self.tasks.index(ref)
            try:
                ray.get(ref, timeout=self.timeout)
                ended[i] = "returned"
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                ended[i] = type(exc).__name__
            restarts = self.health.count("faults/producer_restarts")
            if restarts > self.max_restarts:
                raise RuntimeError(
                    f"rollout producers failed {int(restarts)} times "
                    f"(last: worker {i}, {ended[i]}); more than resources.max_actor_restarts allows"
                )
            print(f"warning: producer of rollout worker {i} ended ({ended[i]}); restarting it", flush=True)
        requeued = self._requeue_in_flight(ended)
        pids_before = list(self.health.pids["rollout"])
        if "RayTaskError" in ended.values():  # the actor lives: was it its engine that failed?
            self.health.check_engines()
        self.recovery.restore()  # a restarted worker gets its position, requeued prompts included
        for i in ended:
            if requeued[i] and self.health.pids["rollout"][i] == pids_before[i]:  # a worker that lived on
                self.health.restore_stream(i, counted=False)
            self.tasks[i] = self._produce(self.cluster.rollout_workers[i])

    def _requeue_in_flight(self, ended: dict[int, str]) -> dict[int, int]:
        """An ended producer's batches still at a teacher may never be stored: a teacher that
        died with them could not retry a call whose caller had died too. Left in the hand-off
        ledger they would hold the producers' room for good (a stalled run), so they go back
        to the worker's stream, drawn again first (``HandoffLedger.requeue``)."""
        requeued = {}
        for i in ended:
            n = get_within(self.cluster.buffer.requeue_in_flight.remote(i), self.timeout, "hand-off requeue")
            if n:
                self.health.count("faults/prompts_requeued", n)
                print(f"warning: rollout worker {i}'s {n} prompts still at a teacher are drawn again", flush=True)
            requeued[i] = n
        return requeued

    def tend(self) -> None:
        """Between the slices of a wait for a batch: a producer whose engine died is blocked
        forever inside vLLM rather than failed, so check the engines (replacing dead ones ends
        their producers), then restart ended producers."""
        if self.tasks:
            self.health.check_engines()
        self.revive()

    def stop(self) -> None:
        """End of the run: stop the producers and wait (bounded) for the batches they handed
        to teachers. One whose rollout worker died since the last step ended with it: Ray
        restarts the worker, and the batches it had handed off are stored by their teachers or
        stay in the hand-off ledger (a later resume draws them again)."""
        for w in self.cluster.rollout_workers:
            w.stop.remote()
        for i, ref in enumerate(self.tasks):
            try:
                get_within(ref, self.timeout, "rollout producers to stop")
            except ray.exceptions.RayActorError as exc:
                print(f"warning: rollout worker {i} died at the end of the run ({type(exc).__name__})", flush=True)

    def abort(self) -> None:
        """A fault or a signal stops the run: stop the producers, waiting only briefly (a
        stalled worker must not turn a fault into a hang)."""
        for w in self.cluster.rollout_workers:
            w.stop.remote()
        if self.tasks:
            ray.wait(self.tasks, num_returns=len(self.tasks), timeout=min(self.timeout, 30))
