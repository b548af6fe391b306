"""What the driver logs besides the learner's numbers: every actor's role metrics, the system
rates, and where each step's wall time went (``driver/<phase>_s``).

Telemetry is requested at the end of one step and collected at the end of the next, so no step
waits for it. The same answers carry the actors' process ids and the rollout engines' health,
which is how the driver notices restarts and dead or stalled engines (``health.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.calls import get_within, while_restarting
from correction_rl.distributed.health import ActorHealth
from correction_rl.distributed.records import EngineHealth


@dataclass
class TelemetryRequest:
    """Outstanding metrics, health and pid calls to every actor (``Telemetry.request``)."""

    metrics: list
    rollout_health: list
    teacher_pids: list


@dataclass(frozen=True)
class TelemetryAnswer:
    metrics: list[dict[str, float]]
    rollout_health: list[EngineHealth]
    teacher_pids: list[int]


class Telemetry:
    """Asks every actor for its metrics (one step ahead) and folds the answers into one row."""

    def __init__(self, cfg: RunConfig, cluster, health: ActorHealth) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.health = health
        self.timeout = cfg.resources.call_timeout_s
        self.started = time.perf_counter()

    def request(self) -> TelemetryRequest:
        """Ask every actor for its metrics and the producers for their process ids, without
        waiting: the driver collects the answers one step later."""
        c = self.cluster
        actors = [*c.rollout_workers, *c.teachers, *c.learners, c.buffer]
        return TelemetryRequest(
            metrics=[a.metrics.remote() for a in actors],
            rollout_health=[w.health.remote() for w in c.rollout_workers],
            teacher_pids=[t.pid.remote() for t in c.teachers],
        )

    def _fetch(self, req: TelemetryRequest) -> TelemetryAnswer:
        return TelemetryAnswer(get_within(req.metrics, self.timeout, "metrics"),
                               get_within(req.rollout_health, self.timeout, "rollout worker health"),
                               get_within(req.teacher_pids, self.timeout, "teacher pids"))

    def collect(self, pairs_trained: int, request: TelemetryRequest | None = None) -> dict[str, float]:
        """Role metrics (``*/idle_fraction``, buffer, teacher counters, ``system/*``) and restart
        counting, from ``request`` (issued a step earlier) or a fresh one. An answer lost with an
        actor that died meanwhile is asked again once Ray has restarted it (bounded)."""
        try:
            answer = self._fetch(request or self.request())
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
            answer = while_restarting(lambda: self._fetch(self.request()), "metrics",
                                      self.cfg.resources.start_timeout_s)
        self.health.note_restarts({"rollout": [h.pid for h in answer.rollout_health],
                                   "teacher": answer.teacher_pids})
        self.health.replace_unhealthy(dict(enumerate(answer.rollout_health)))
        out: dict[str, float] = {}
        for metrics in answer.metrics:
            out.update(metrics)
        wall = time.perf_counter() - self.started
        out["system/pairs_per_s"] = pairs_trained / max(wall, 1e-9)
        for role in ("rollout", "teacher", "train"):
            idle = [v for k, v in out.items() if k.startswith(f"{role}/") and k.endswith("idle_fraction")]
            if idle:
                out[f"system/{role}_idle_fraction"] = sum(idle) / len(idle)
        return out
