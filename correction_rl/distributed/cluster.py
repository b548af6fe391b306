"""Starting (or joining) Ray, placing the actors, and tearing them down.

Resources come from ``cfg.resources``: CPUs / GPUs per role, and optionally a custom resource
per role (``resources.rollout_resource`` ...) that a cluster's nodes advertise (``ray start
--resources='{"rollout": 1}'``) to pin roles to nodes. Every actor of a role gets a bundle in one
placement group; the group must be placeable within ``resources.placement_timeout_s`` or the
run stops with a message naming what the cluster lacks, instead of waiting forever.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from correction_rl.config import ResourcesConfig, RunConfig
from correction_rl.distributed.actors import BufferActor, LearnerRank, RolloutWorker, TeacherWorker
from correction_rl.types import Prompt


class PlacementError(RuntimeError):
    """The cluster cannot host the requested actors."""


def init_ray(cfg: RunConfig) -> None:
    """Join ``resources.ray_address`` / ``RAY_ADDRESS``, or start a local Ray sized for the run."""
    if ray.is_initialized():
        return
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    needed = sum(b.get("CPU", 0) for b in role_bundles(cfg.resources)[1])
    ray.init(
        num_cpus=max(int(needed + 0.999), os.cpu_count() or 1),
        include_dashboard=False,
        runtime_env=env,
        log_to_driver=True,
    )


def _bundle(cpus: float, gpus: float, custom: str | None) -> dict[str, float]:
    bundle = {"CPU": cpus}
    if gpus:
        bundle["GPU"] = gpus
    if custom:
        bundle[custom] = 0.01
    return bundle


def role_bundles(res: ResourcesConfig) -> tuple[list[str], list[dict[str, float]]]:
    """One (role, bundle) per actor, in creation order: learners, rollout workers, teachers."""
    roles, bundles = [], []
    for role, count, cpus, gpus, custom in (
        ("learner", res.num_learner_ranks, res.cpus_per_learner_rank, res.gpus_per_learner_rank, res.learner_resource),
        ("rollout", res.num_rollout_workers, res.cpus_per_rollout_worker, res.gpus_per_rollout_worker, res.rollout_resource),
        ("teacher", res.num_teacher_workers, res.cpus_per_teacher_worker, res.gpus_per_teacher_worker, res.teacher_resource),
    ):
        for _ in range(count):
            roles.append(role)
            bundles.append(_bundle(cpus, gpus, custom))
    return roles, bundles


def _missing_resources(bundles: list[dict[str, float]]) -> list[str]:
    """What the cluster lacks in total for these bundles (per-node packing aside)."""
    total = ray.cluster_resources()
    want: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            want[key] = want.get(key, 0.0) + value
    return [
        f"{key}: requested {value:g}, cluster has {total.get(key, 0.0):g}"
        for key, value in sorted(want.items())
        if value > total.get(key, 0.0) + 1e-9
    ]


def reserve(cfg: RunConfig):
    roles, bundles = role_bundles(cfg.resources)
    missing = _missing_resources(bundles)
    if missing:
        raise PlacementError("the Ray cluster cannot host this run: " + "; ".join(missing))
    strategy = "SPREAD" if cfg.resources.placement == "spread" else "PACK"
    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=cfg.resources.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise PlacementError(
            f"placement of {len(bundles)} actors ({', '.join(sorted(set(roles)))}) not possible "
            f"within {cfg.resources.placement_timeout_s:.0f} s: no node (or set of nodes) has "
            f"room for the bundles {bundles}; cluster resources: {ray.cluster_resources()}"
        ) from None
    return group, roles, bundles


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Runs in learner rank 0's bundle: that node's address and a free port on it."""
    return ray.util.get_node_ip_address(), _free_port()


@dataclass
class Cluster:
    """Handles to every actor of a run."""

    cfg: RunConfig
    group: Any
    learners: list
    rollout_workers: list
    teachers: list
    buffer: Any
    roles: list[str] = field(default_factory=list)

    @property
    def all_actors(self) -> list:
        return [*self.learners, *self.rollout_workers, *self.teachers, self.buffer]

    def shutdown(self) -> None:
        for worker in self.rollout_workers:
            try:
                ray.get(worker.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        for actor in self.all_actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)


def start_cluster(cfg: RunConfig, train_prompts: list[Prompt]) -> Cluster:
    """Reserve resources, create every actor, and wait until all are constructed."""
    res = cfg.resources
    group, roles, bundles = reserve(cfg)

    def strategy(index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)

    def options(index: int, **extra) -> dict:
        bundle = bundles[index]
        return dict(
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=strategy(index),
            **extra,
        )

    index = 0
    master = ray.get(
        _rendezvous_address.options(scheduling_strategy=strategy(0)).remote(), timeout=res.call_timeout_s
    )
    learners = []
    for rank in range(res.num_learner_ranks):
        actor_cls = ray.remote(LearnerRank).options(**options(index, max_restarts=0))
        learners.append(actor_cls.remote(cfg, rank, res.num_learner_ranks, master[0], master[1]))
        index += 1
    shards = [train_prompts[i :: res.num_rollout_workers] for i in range(res.num_rollout_workers)]
    rollout_workers = []
    for worker_id in range(res.num_rollout_workers):
        actor_cls = ray.remote(RolloutWorker).options(
            **options(index, max_concurrency=4, max_restarts=res.max_actor_restarts)
        )
        rollout_workers.append(actor_cls.remote(cfg, worker_id, shards[worker_id]))
        index += 1
    teachers = []
    for worker_id in range(res.num_teacher_workers):
        actor_cls = ray.remote(TeacherWorker).options(
            **options(index, max_concurrency=2, max_restarts=res.max_actor_restarts, max_task_retries=2)
        )
        teachers.append(actor_cls.remote(cfg, worker_id))
        index += 1
    buffer = ray.remote(BufferActor).options(num_cpus=0, max_concurrency=16).remote(
        cfg, str(cfg.run_dir / "corrections.jsonl")
    )
    cluster = Cluster(cfg, group, learners, rollout_workers, teachers, buffer, roles)
    # Constructors run concurrently (the learner ranks rendezvous with each other in theirs).
    try:
        ray.get([a.pid.remote() for a in cluster.all_actors if a is not buffer], timeout=res.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        cluster.shutdown()
        raise TimeoutError(
            f"actors did not start within resources.start_timeout_s={res.start_timeout_s:.0f} s "
            "(engine start-up, learner rendezvous or model loading hung)"
        ) from None
    return cluster
