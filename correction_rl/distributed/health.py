"""Which actors Ray restarted, which rollout engines are dead or stalled, and putting a
restarted rollout worker back where its predecessor stopped (docs/reliability.md).

Kept apart from the driver's step loop: the loop asks (``note_restarts`` with the pids its
telemetry brought, ``check_engines`` before a sync or while starved of batches) and this keeps
the bookkeeping — the counters logged as ``faults/*``, the pids seen, the pids already replaced
(answers collected a step late may still name them), the stream positions.
"""

from __future__ import annotations

import time

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.calls import get_within, while_restarting
from correction_rl.distributed.records import EngineHealth, WorkerState


class ActorHealth:
    """The driver's view of its actors' processes and engines (one per run)."""

    def __init__(self, cfg: RunConfig, cluster) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.timeout = cfg.resources.call_timeout_s
        self.faults: dict[str, float] = {}
        """Restart and replacement counters (``faults/*`` metrics)."""
        self.retired_pids: set[int] = set()
        """Processes Ray replaced (telemetry is collected a step late: it may still name them)."""
        self.stream_states: dict[int, WorkerState | None] = {}
        """Sync mode: each rollout worker's stream state after the last lockstep round, or from
        the checkpoint a run resumed from (async mode keeps them in the buffer actor's
        hand-off ledger)."""
        self.pids = self.actor_pids()

    def count(self, key: str, n: float = 1) -> float:
        self.faults[key] = self.faults.get(key, 0) + n
        return self.faults[key]

    def actor_pids(self) -> dict[str, list[int]]:
        return while_restarting(self._actor_pids, "actor pids", self.cfg.resources.start_timeout_s)

    def _actor_pids(self) -> dict[str, list[int]]:
        c = self.cluster
        return {
            "rollout": get_within([w.pid.remote() for w in c.rollout_workers], self.timeout, "rollout worker pids"),
            "teacher": get_within([t.pid.remote() for t in c.teachers], self.timeout, "teacher pids"),
        }

    def count_restarts(self) -> int:
        return self.note_restarts(self.actor_pids())

    def note_restarts(self, pids: dict[str, list[int]]) -> int:
        """A changed process id means Ray restarted that actor (``max_actor_restarts``). A
        restarted rollout worker continues its prompt stream where its predecessor was.
        Returns how many rollout workers were restarted (their engines need the weights)."""
        rollout_restarts = 0
        for role, now in pids.items():
            for i, (old, new) in enumerate(zip(self.pids[role], now)):
                if new in self.retired_pids:  # a late answer from before the restart
                    now[i] = old
                elif old != new:
                    self.retired_pids.add(old)
                    self.count(f"faults/{role}_restarts")
                    print(f"warning: {role} worker {i} was restarted (pid {old} -> {new})", flush=True)
                    if role == "rollout":
                        self.restore_stream(i)
                        rollout_restarts += 1
        self.pids = pids
        return rollout_restarts

    def restore_stream(self, i: int, counted: bool = True) -> None:
        """Put restarted rollout worker ``i`` back at its last known prompt-stream position:
        the one its producer reported after its last handed-off batch (async: kept by the buffer
        actor, seeded with the checkpoint's on resume), or the one after the last lockstep round
        (sync, likewise), so the lost batch is redone and no prompt is drawn twice. Also gives a
        worker that lives on the prompts requeued from its ended producer (``counted=False``:
        that is no restored stream)."""
        if self.cfg.mode == "async":
            state = get_within(self.cluster.buffer.stream_position.remote(i), self.timeout, "stream position")
        else:
            state = self.stream_states.get(i)
        while_restarting(lambda: get_within(self.cluster.rollout_workers[i].load_state_dict.remote(state),
                                            self.timeout, "rollout worker stream restore"),
                         "rollout worker stream restore", self.cfg.resources.start_timeout_s)
        if state is not None and counted:
            self.count("faults/streams_restored")

    def check_engines(self) -> int:
        """Before a sync: a dead engine leaves its worker's generation blocked with the worker's
        lock held, so the sync would wait for it until ``sync.timeout_s``; replace it first.
        Returns the number of workers replaced."""
        workers = self.cluster.rollout_workers
        health = while_restarting(
            lambda: get_within([w.health.remote() for w in workers], self.timeout, "rollout worker health"),
            "rollout worker health", self.cfg.resources.start_timeout_s)
        replaced = self.replace_unhealthy(dict(enumerate(health)))
        if replaced:
            self.count_restarts()
        return replaced

    def replace_unhealthy(self, health: dict[int, EngineHealth]) -> int:
        """Engine health check (``RolloutWorker.health`` by worker index): a worker whose engine
        died or whose current engine call has run past ``resources.engine_stall_timeout_s`` is
        killed, and this waits (bounded) until Ray has restarted it with a new engine;
        ``revive_producers`` then gives it the weights, its stream and a new producer."""
        limit = self.cfg.resources.engine_stall_timeout_s
        replaced = 0
        for i, h in health.items():
            if h.pid in self.retired_pids:  # a late answer about a process already replaced
                continue
            problem = h.problem or (
                f"its engine call has run {h.busy_for_s:.0f} s (> resources.engine_stall_timeout_s={limit:.0f})"
                if h.busy_for_s > limit else None)
            if problem is None:
                continue
            self.count("faults/unhealthy_engines")
            print(f"warning: rollout worker {i} is unhealthy ({problem}); restarting it", flush=True)
            worker = self.cluster.rollout_workers[i]
            ray.kill(worker, no_restart=False)
            deadline = time.monotonic() + self.cfg.resources.start_timeout_s
            while True:  # calls fail while the old process dies and the new one starts
                try:
                    if get_within(worker.pid.remote(), self.timeout, "rollout worker pid") != h.pid:
                        break
                except ray.exceptions.RayActorError:  # ActorUnavailableError included
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rollout worker {i} was not restarted within "
                                       f"resources.start_timeout_s={self.cfg.resources.start_timeout_s:.0f} s")
                time.sleep(0.5)
            replaced += 1
        return replaced
