"""Starting (or joining) Ray, placing the actors, and tearing them down.

Resources come from ``cfg.resources``: CPUs / GPUs per role, and optionally a custom resource
per role (``resources.rollout_resource`` ...) that a cluster's nodes advertise (``ray start
--resources='{"rollout": 1}'``) and/or node labels per role (``resources.rollout_labels``,
matched against ``ray start --labels``) to pin roles to nodes. Every actor of a role gets a bundle
in one placement group. Before asking Ray, the request is checked against the cluster: a total
the cluster lacks, or a bundle that fits on no single node, fails at once naming the resource;
otherwise the group must be placeable within ``resources.placement_timeout_s`` (the cluster may be
busy) or the run stops with a message, instead of waiting forever. docs/cluster.md shows the
recipes, docs/scaling.md the sizing.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from correction_rl.config import ResourcesConfig, RunConfig
from correction_rl.distributed.actors import (
    DRILL_LOAD_DELAY_ENV,
    DRILL_TEACHER_DELAY_ENV,
    BufferActor,
    LearnerRank,
    RolloutWorker,
    TeacherWorker,
)
from correction_rl.distributed.actors.start_errors import reporting_start_errors
from correction_rl.distributed.weights import PUBLISH_GROUP
from correction_rl.types import Prompt
from correction_rl.errors import UserError


def learner_rank_class():
    """``LearnerRank`` as a Ray actor class, with the ``publish`` concurrency group its
    object-store weight sync puts the weights from (``distributed/weights.py``)."""
    return ray.remote(concurrency_groups={PUBLISH_GROUP: 1})(reporting_start_errors(LearnerRank))


class PlacementError(RuntimeError, UserError):
    """The cluster cannot host the requested actors."""


def init_ray(cfg: RunConfig) -> None:
    """Join ``resources.ray_address`` / ``RAY_ADDRESS``, or start a local Ray sized for the run."""
    if ray.is_initialized():
        return
    address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": _driver_env_vars(cfg)}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    needed = sum(b.get("CPU", 0) for b in role_bundles(cfg.resources)[1])
    store_mb = cfg.resources.object_store_mb
    ray.init(
        num_cpus=max(int(needed + 0.999), os.cpu_count() or 1),
        object_store_memory=store_mb * 2**20 if store_mb else None,
        include_dashboard=False,
        runtime_env=env,
        log_to_driver=True,
    )


def _driver_env_vars(cfg: RunConfig) -> dict[str, str]:
    """Environment every actor gets, minus keys a submitted job's runtime_env already sets:
    Ray refuses to merge a job's and a driver's runtime_env that set the same variable.

    The teacher's secrets (``teacher.http.api_key_env``, ``teacher.human.tokens_env``) are read
    by the teacher actors, which on a running cluster do not inherit the driver's environment:
    they travel with the job when set where ``correction-rl train`` runs."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    for name in (cfg.teacher.http.api_key_env, cfg.teacher.human.tokens_env):
        if name and os.environ.get(name):
            env[name] = os.environ[name]
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by `ray job submit` for the entrypoint
    if job:
        try:
            taken = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            taken = {}
        env = {k: v for k, v in env.items() if k not in taken}
    return env


def _drill_env(name: str) -> dict[str, Any]:
    """A fault-drill hook (``actors/drills.py``, not a config field) travels from the driver's
    environment to the actors it concerns; nothing is added when it is unset."""
    value = os.environ.get(name)
    return {"runtime_env": {"env_vars": {name: value}}} if value else {}


ROLES = ("learner", "rollout", "teacher")


def _bundle(cpus: float, gpus: float, custom: str | None, amount: float) -> dict[str, float]:
    bundle = {"CPU": cpus}
    if gpus:
        bundle["GPU"] = gpus
    if custom:
        bundle[custom] = amount
    return bundle


def _role_specs(res: ResourcesConfig):
    return (
        ("learner", res.num_learner_ranks, res.cpus_per_learner_rank, res.gpus_per_learner_rank,
         res.learner_resource, res.learner_labels),
        ("rollout", res.num_rollout_workers, res.cpus_per_rollout_worker, res.gpus_per_rollout_worker,
         res.rollout_resource, res.rollout_labels),
        ("teacher", res.num_teacher_workers, res.cpus_per_teacher_worker, res.gpus_per_teacher_worker,
         res.teacher_resource, res.teacher_labels),
    )


def role_bundles(res: ResourcesConfig) -> tuple[list[str], list[dict[str, float]]]:
    """One (role, bundle) per actor, in creation order: learners, rollout workers, teachers."""
    roles, bundles = [], []
    for role, count, cpus, gpus, custom, _labels in _role_specs(res):
        for _ in range(count):
            roles.append(role)
            bundles.append(_bundle(cpus, gpus, custom, res.custom_resource_amount))
    return roles, bundles


def role_label_selectors(res: ResourcesConfig) -> list[dict[str, str]]:
    """The node-label selector of each bundle, in the order of ``role_bundles``."""
    return [dict(labels) for _, count, *_rest, labels in _role_specs(res) for _ in range(count)]


def _check_amount(res: ResourcesConfig) -> None:
    amount = res.custom_resource_amount
    if not (amount > 0 and (amount < 1 or float(amount).is_integer())):
        raise PlacementError(
            f"resources.custom_resource_amount={amount!r}: Ray accepts a fraction in (0, 1) or a "
            "whole number"
        )


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


_SYSTEM_RESOURCES = ("memory", "object_store_memory")


def _node_summary(node: dict[str, Any]) -> str:
    resources = {k: v for k, v in node["Resources"].items()
                 if k not in _SYSTEM_RESOURCES and not k.startswith("node:")}
    labels = user_labels(node)
    name, ip = node.get("NodeName") or node["NodeManagerAddress"], node["NodeManagerAddress"]
    where = f"{name} ({ip}, {node['NodeID'][:8]})" if name != ip else f"{ip} ({node['NodeID'][:8]})"
    return f"node {where} {_fmt(resources)}{' labels ' + _fmt(labels) if labels else ''}"


def _fmt(mapping: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}"
                           for k, v in sorted(mapping.items())) + "}"


def user_labels(node: dict[str, Any]) -> dict[str, str]:
    """A node's labels without the ones Ray sets itself (``ray.io/...``)."""
    return {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}


def _label_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label-selector syntax: ``v`` (equals), ``!v`` (differs or absent), ``in(a,b)``,
    ``!in(a,b)``."""
    for key, want in selector.items():
        want = want.strip()
        negate = want.startswith("!")
        body = want[1:].strip() if negate else want
        if body.startswith("in(") and body.endswith(")"):
            allowed = {v.strip() for v in body[3:-1].split(",")}
        else:
            allowed = {body}
        if (labels.get(key) in allowed) == negate:
            return False
    return True


def _unfittable(roles: list[str], bundles: list[dict[str, float]],
                selectors: list[dict[str, str]]) -> list[str]:
    """Bundles that no single alive node can ever hold (a bundle never spans nodes): e.g. a
    learner rank asking for 8 GPUs on a cluster of 4-GPU nodes, or a custom resource and a label
    that no one node has together. Ray would wait for such a node forever."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    problems, seen = [], set()
    for role, bundle, selector in zip(roles, bundles, selectors):
        key = (role, tuple(sorted(bundle.items())), tuple(sorted(selector.items())))
        if key in seen:
            continue
        seen.add(key)
        fits = []
        for node in nodes:
            enough = all(node["Resources"].get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())
            fits.append(enough and _label_matches(selector, user_labels(node)))
        if not any(fits):
            wanted = _fmt(bundle) + (f" with node labels {_fmt(selector)}" if selector else "")
            problems.append(f"one {role} actor needs {wanted} on a single node, and no node has it")
    if problems:
        problems.append("nodes: " + "; ".join(_node_summary(n) for n in nodes))
    return problems


def reserve(cfg: RunConfig):
    """One placement group, one bundle per actor; fails fast (``PlacementError``) when the cluster
    can never host it, and after ``resources.placement_timeout_s`` when it cannot host it now."""
    res = cfg.resources
    _check_amount(res)
    roles, bundles = role_bundles(res)
    selectors = role_label_selectors(res)
    missing = _missing_resources(bundles)
    if missing:
        raise PlacementError("the Ray cluster cannot host this run: " + "; ".join(missing))
    unfittable = _unfittable(roles, bundles, selectors)
    if unfittable:
        raise PlacementError("the Ray cluster cannot host this run: " + "; ".join(unfittable))
    strategy = "SPREAD" if res.placement == "spread" else "PACK"
    extra = {"bundle_label_selector": selectors} if any(selectors) else {}
    group = placement_group(bundles, strategy=strategy, **extra)
    try:
        ray.get(group.ready(), timeout=res.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise PlacementError(
            f"placement of {len(bundles)} actors ({', '.join(sorted(set(roles)))}) not possible "
            f"within {res.placement_timeout_s:.0f} s: no node (or set of nodes) has "
            f"room for the bundles {bundles}"
            + (f" with labels {selectors}" if any(selectors) else "")
            + f" (other jobs may hold them); cluster resources: {ray.cluster_resources()}"
        ) from None
    return group, roles, bundles


def _where(actor) -> tuple[int, str, str]:
    """Runs inside an actor (``__ray_call__``): its pid, node id and node IP, as it sees them."""
    return os.getpid(), ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def describe_placement(cluster: "Cluster", timeout_s: float = 60.0) -> dict[str, list[dict[str, Any]]]:
    """Where every actor runs, as each actor itself reports it, joined with what its bundle
    requested and what its node advertises (``roles.json``; the multi-node tests read it)."""
    nodes = {n["NodeID"]: n for n in ray.nodes()}
    actors = [*cluster.learners, *cluster.rollout_workers, *cluster.teachers]
    pad = lambda items, fill: [*items, *[fill] * (len(actors) - len(items))][: len(actors)]  # noqa: E731
    roles = [*pad(cluster.roles, "?"), "buffer"]
    bundles = [*pad(cluster.bundles, {}), {}]
    selectors = [*pad(cluster.label_selectors, {}), {}]
    reports = ray.get([a.__ray_call__.remote(_where) for a in [*actors, cluster.buffer]], timeout=timeout_s)
    out: dict[str, list[dict[str, Any]]] = {role: [] for role in (*ROLES, "buffer")}
    for index, (role, bundle, selector, (pid, node_id, node_ip)) in enumerate(
        zip(roles, bundles, selectors, reports)
    ):
        node = nodes.get(node_id, {})
        resources = node.get("Resources", {})
        out.setdefault(role, []).append({
            "pid": pid,
            "bundle_index": index if role != "buffer" else None,
            "bundle": bundle,
            "label_selector": selector,
            "node_id": node_id,
            "node_ip": node_ip,
            "node_custom_resources": {
                k: v for k, v in resources.items()
                if k not in ("CPU", "GPU", *_SYSTEM_RESOURCES) and not k.startswith("node:")
            },
            "node_labels": user_labels(node) if node else {},
        })
    return out


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
    bundles: list[dict[str, float]] = field(default_factory=list)
    """The placement-group bundle of each learner / rollout / teacher actor, in that order."""
    label_selectors: list[dict[str, str]] = field(default_factory=list)
    constructor_args: list = field(default_factory=list)
    """Object refs of the restartable actors' constructor arguments (the prompt shards), held
    for the run: Ray re-runs a restarted actor's constructor with them, so they must not go
    out of scope (ray-project/ray#53727)."""

    @property
    def all_actors(self) -> list:
        return [*self.learners, *self.rollout_workers, *self.teachers, self.buffer]

    def shutdown(self) -> None:
        for worker in [*self.rollout_workers, *self.teachers]:  # engines own child processes
            try:
                ray.get(worker.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        for actor in self.all_actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)


def start_cluster(cfg: RunConfig, train_prompts: Sequence[Prompt]) -> Cluster:
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
        actor_cls = learner_rank_class().options(**options(index, max_restarts=0))
        learners.append(actor_cls.remote(cfg, rank, res.num_learner_ranks, master[0], master[1]))
        index += 1
    # a list of prompts, or a dataset's row numbers (prompts/indexed.py: each worker reads its rows)
    shards = [ray.put(train_prompts[i :: res.num_rollout_workers]) for i in range(res.num_rollout_workers)]
    rollout_workers = []
    drill = _drill_env(DRILL_LOAD_DELAY_ENV)
    for worker_id in range(res.num_rollout_workers):
        actor_cls = ray.remote(reporting_start_errors(RolloutWorker)).options(
            **options(index, max_concurrency=4, max_restarts=res.max_actor_restarts, **drill)
        )
        rollout_workers.append(actor_cls.remote(cfg, worker_id, shards[worker_id]))
        index += 1
    teachers = []
    for worker_id in range(res.num_teacher_workers):
        actor_cls = ray.remote(reporting_start_errors(TeacherWorker)).options(
            **options(index, max_concurrency=2, max_restarts=res.max_actor_restarts, max_task_retries=2,
                      **_drill_env(DRILL_TEACHER_DELAY_ENV))
        )
        teachers.append(actor_cls.remote(cfg, worker_id))
        index += 1
    buffer = ray.remote(BufferActor).options(num_cpus=0, max_concurrency=16).remote(
        cfg, str(cfg.run_dir / "corrections.jsonl")
    )
    cluster = Cluster(cfg, group, learners, rollout_workers, teachers, buffer, roles, bundles,
                      role_label_selectors(res), constructor_args=shards)
    # Constructors run concurrently (the learner ranks rendezvous with each other in theirs).
    try:
        ray.get([a.pid.remote() for a in cluster.all_actors if a is not buffer], timeout=res.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        cluster.shutdown()
        raise TimeoutError(
            f"actors did not start within resources.start_timeout_s={res.start_timeout_s:.0f} s "
            "(engine start-up, learner rendezvous or model loading hung)"
        ) from None
    except ray.exceptions.RayError:  # a constructor failed: its error (start_errors.py) propagates
        cluster.shutdown()
        raise
    return cluster
