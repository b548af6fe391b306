"""The cluster/ recipes, checked offline: the launcher YAML against Ray's cluster config schema
(shipped in the installed ray package), the RayJob manifest against KubeRay's RayJob CRD schema
(vendored in cluster/schemas/, made strict), the runtime_env recipe against Ray's RuntimeEnv, the
SLURM script's syntax, every example run config against the config schema, and — the check that
catches real mistakes — that the nodes each recipe brings up can host the actors of the run
config it launches, bundle by bundle, with the same rules as the placement code."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from correction_rl.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"

# vCPUs and GPUs of the instance types cluster/aws.yaml uses (AWS documentation); Ray fills
# CPU/GPU from the instance type when `resources` leaves them out.
AWS_INSTANCES = {"m6i.4xlarge": (16, 0), "p5.48xlarge": (192, 8), "g6e.12xlarge": (48, 4)}


def load_yaml(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


# -- schemas ---------------------------------------------------------------------------------------


def ray_cluster_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_yaml_matches_rays_cluster_schema():
    from ray.autoscaler._private.util import validate_config

    config = load_yaml("aws.yaml")
    jsonschema.validate(config, ray_cluster_schema())
    validate_config(config)  # the schema + Ray's own cross-field checks (head type, min_workers)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert any(AWS_INSTANCES[t["node_config"]["InstanceType"]][1] for t in types.values())
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "correction_rl[gpu]" in setup


def test_ray_schema_rejects_a_misspelled_launcher_field():
    """The validation above can fail: a typo in a node type is an error, not ignored."""
    config = load_yaml("aws.yaml")
    config["available_node_types"]["gpu_learner"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, ray_cluster_schema())


def strict(schema):
    """KubeRay's CRD schema as `kubectl apply --validate=strict` reads it: an unknown field is an
    error wherever the schema lists properties and does not preserve unknown fields (plain JSON
    Schema would accept any extra key)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    vendored = json.loads((CLUSTER / "schemas" / "kuberay-v1.7.0-rayjob-v1.json").read_text())
    return strict(vendored["openAPIV3Schema"])


def test_rayjob_manifest_matches_the_kuberay_crd_schema(rayjob_schema):
    manifest = load_yaml("rayjob.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    jsonschema.validate(manifest, rayjob_schema)
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("correction-rl train --config /app/configs/")
    assert (REPO / spec["entrypoint"].split("--config /app/")[1].split()[0]).exists()
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HOME"].startswith("/mnt/shared")


@pytest.mark.parametrize("path, value, complaint", [
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replica"), 1, "replica"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "minReplicas"), "one", "one"),
    (("spec", "shutdownAfterJobFinishes"), "yes", "yes"),
])
def test_crd_schema_rejects_broken_manifests(rayjob_schema, path, value, complaint):
    manifest = copy.deepcopy(load_yaml("rayjob.yaml"))
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError, match=complaint):
        jsonschema.validate(manifest, rayjob_schema)


def test_runtime_env_recipe_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    recipe = load_yaml("runtime_env.yaml")
    env = RuntimeEnv(**recipe)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    assert {".venv", ".git", "runs"} <= set(recipe["excludes"])
    assert all(isinstance(v, str) for v in recipe["env_vars"].values())
    assert "WANDB_API_KEY" not in recipe["env_vars"]  # secrets come from the cluster, not the repo


def test_slurm_script_parses_and_submits_with_ray_job_submit():
    script = (CLUSTER / "slurm.sh").read_text()
    subprocess.run(["bash", "-n", str(CLUSTER / "slurm.sh")], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(CLUSTER / "slurm.sh")], check=True)
    assert "ray start --head" in script and "ray job submit" in script
    assert "trap cleanup EXIT" in script


# -- the recipes can host the runs they launch -------------------------------------------------


def _bundles(config_path: Path) -> list[tuple[str, dict[str, float]]]:
    """(role, bundle) per actor, as correction_rl.distributed.cluster builds them."""
    from correction_rl.distributed.cluster import role_bundles

    cfg = load_config(config_path)
    roles, bundles = role_bundles(cfg.resources)
    return list(zip(roles, bundles))


def _pack(bundles: list[tuple[str, dict[str, float]]], nodes: list[dict[str, float]]) -> list[str]:
    """First-fit-decreasing of the bundles onto the nodes (a bundle never spans nodes); returns
    the bundles that found no room."""
    free = [dict(n) for n in nodes]
    unplaced = []
    for role, bundle in sorted(bundles, key=lambda rb: -sum(rb[1].values())):
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] -= v
                break
        else:
            unplaced.append(f"{role} {bundle}")
    return unplaced


def aws_nodes() -> list[dict[str, float]]:
    config = load_yaml("aws.yaml")
    nodes = []
    for name, kind in config["available_node_types"].items():
        cpus, gpus = AWS_INSTANCES[kind["node_config"]["InstanceType"]]
        count = 1 if name == config["head_node_type"] else kind.get("min_workers", 0)
        resources = {"CPU": cpus, "GPU": gpus, **kind["resources"]}
        if name == config["head_node_type"] and "--num-gpus=0" in " ".join(config["head_start_ray_commands"]):
            resources["GPU"] = 0
        nodes += [dict(resources) for _ in range(count)]
    return nodes


def _quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def rayjob_nodes() -> list[dict[str, float]]:
    spec = load_yaml("rayjob.yaml")["spec"]["rayClusterSpec"]
    groups = [(spec["headGroupSpec"], 1)] + [(g, g["replicas"]) for g in spec["workerGroupSpecs"]]
    nodes = []
    for group, replicas in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        start = group.get("rayStartParams", {})
        resources = {
            "CPU": float(start.get("num-cpus", _quantity(limits["cpu"]))),
            "GPU": float(start.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
            **{k: float(v) for k, v in group.get("resources", {}).items()},
        }
        nodes += [dict(resources) for _ in range(replicas)]
    return nodes


def slurm_nodes() -> list[dict[str, float]]:
    script = (CLUSTER / "slurm.sh").read_text()
    count = int(re.search(r"#SBATCH --nodes=(\d+)", script).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", script).group(1))
    cpus = int(re.search(r"#SBATCH --cpus-per-task=(\d+)", script).group(1))
    head = json.loads(re.search(r"HEAD_RESOURCES=\$\{HEAD_RESOURCES:-'(.*)'\}", script).group(1))
    kinds = [json.loads(k) for k in
             re.search(r"WORKER_RESOURCES=\$\{WORKER_RESOURCES:-'(.*)'\}", script).group(1).split(";")]
    nodes = [{"CPU": cpus, "GPU": gpus, **head}]
    nodes += [{"CPU": cpus, "GPU": gpus, **kinds[(i - 1) % len(kinds)]} for i in range(1, count)]
    return nodes


@pytest.mark.parametrize("recipe, nodes", [("aws.yaml", aws_nodes), ("rayjob.yaml", rayjob_nodes),
                                           ("slurm.sh", slurm_nodes)])
def test_each_recipe_can_host_the_multinode_config(recipe, nodes):
    bundles = _bundles(REPO / "configs" / "multinode.yaml")
    assert {role for role, _ in bundles} == {"learner", "rollout", "teacher"}
    assert all("_node" in "".join(b) for _, b in bundles)  # every role is pinned
    assert _pack(bundles, nodes()) == [], f"{recipe} cannot host configs/multinode.yaml"


def test_the_packing_check_finds_a_recipe_too_small():
    bundles = _bundles(REPO / "configs" / "multinode.yaml")
    nodes = aws_nodes()
    for node in nodes:
        node.pop("teacher_node", None)
    assert any(b.startswith("teacher") for b in _pack(bundles, nodes))


def test_example_configs_load_and_size_as_documented():
    gpu1 = load_config(REPO / "configs" / "gpu_1.yaml")
    gpu8 = load_config(REPO / "configs" / "gpu_8.yaml")
    multi = load_config(REPO / "configs" / "multinode.yaml")

    def gpus(cfg, role=None):
        return sum(b.get("GPU", 0) for r, b in zip(*__import__(
            "correction_rl.distributed.cluster", fromlist=["role_bundles"]).role_bundles(cfg.resources))
            if role in (None, r))

    assert gpus(gpu1) == 1.0
    assert gpus(gpu8) == 8 and gpus(gpu8, "teacher") == 2 and gpus(gpu8, "learner") == 4
    assert gpu8.teacher.kind == "vllm" and gpu8.teacher.vllm.model_path != gpu8.model.path
    assert gpu8.learner.zero_stage == 2 and multi.learner.zero_stage == 3 and gpus(multi, "learner") == 8
    assert multi.output_dir.startswith("/mnt/shared")
    assert _pack(_bundles(REPO / "configs" / "gpu_8.yaml"), [{"CPU": 96, "GPU": 8}]) == []


def test_the_seed_setting_fits_one_gpu_with_lora():
    """configs/seed_3b_7b.yaml (docs/models.md): policy, engine and 7B teacher on ONE GPU, LoRA on,
    reference-free objective, the teacher measures held-out correction, object-store sync."""
    cfg = load_config(REPO / "configs" / "seed_3b_7b.yaml")
    assert _pack(_bundles(REPO / "configs" / "seed_3b_7b.yaml"), [{"CPU": 16, "GPU": 1}]) == []
    assert cfg.learner.lora.enabled and cfg.sync.transport == "object_store"
    assert cfg.teacher.kind == "vllm" and cfg.eval.teacher == "run" and cfg.task.dataset
    assert cfg.objective.form == "logistic" and cfg.objective.anchor_weight > 0
    engines = cfg.rollout.vllm_gpu_memory_utilization + cfg.teacher.vllm.gpu_memory_utilization
    assert engines <= cfg.resources.gpus_per_rollout_worker + cfg.resources.gpus_per_teacher_worker


# -- placement rules (pure parts of correction_rl.distributed.cluster) ------------------------------


@pytest.mark.parametrize("selector, labels, expected", [
    ({"pool": "train"}, {"pool": "train"}, True),
    ({"pool": "train"}, {"pool": "gen"}, False),
    ({"pool": "train"}, {}, False),
    ({"pool": "!train"}, {"pool": "gen"}, True),
    ({"pool": "!train"}, {}, True),
    ({"pool": "!train"}, {"pool": "train"}, False),
    ({"pool": "in(train, gen)"}, {"pool": "gen"}, True),
    ({"pool": "in(train,gen)"}, {"pool": "head"}, False),
    ({"pool": "!in(train,gen)"}, {"pool": "head"}, True),
    ({"pool": "!in(train,gen)"}, {"pool": "train"}, False),
    ({"pool": "train", "zone": "a"}, {"pool": "train", "zone": "b"}, False),
])
def test_label_selectors_follow_rays_syntax(selector, labels, expected):
    from correction_rl.distributed.cluster import _label_matches

    assert _label_matches(selector, labels) is expected


def test_bundles_carry_the_custom_resource_amount_and_selectors_follow_roles():
    from correction_rl.config import config_from_dict
    from correction_rl.distributed.cluster import role_bundles, role_label_selectors

    cfg = config_from_dict({"resources": {
        "num_learner_ranks": 2, "num_rollout_workers": 1, "num_teacher_workers": 1,
        "gpus_per_learner_rank": 1, "learner_resource": "learner_node", "custom_resource_amount": 1,
        "rollout_labels": {"pool": "gen"},
    }})
    roles, bundles = role_bundles(cfg.resources)
    assert roles == ["learner", "learner", "rollout", "teacher"]
    assert bundles[0] == {"CPU": 1.0, "GPU": 1.0, "learner_node": 1}
    assert bundles[2] == {"CPU": 1.0} and bundles[3] == {"CPU": 0.5}
    assert role_label_selectors(cfg.resources) == [{}, {}, {"pool": "gen"}, {}]


# -- pure parts of the driver and the actor records ----------------------------------------------


def test_step_plan_syncs_evaluates_and_checkpoints_on_schedule():
    from correction_rl.config import config_from_dict
    from correction_rl.distributed.driver import StepPlan

    cfg = config_from_dict({"total_steps": 6, "sync": {"every_steps": 2}, "eval": {"every_steps": 3},
                            "checkpoint": {"every_steps": 4}})
    plans = {v: StepPlan.after(cfg, v, stop_requested=False) for v in range(1, 7)}
    assert [v for v, p in plans.items() if p.sync] == [2, 4, 6]  # and always the last step
    assert [v for v, p in plans.items() if p.evaluate] == [3]  # the final evaluation is the lifecycle's
    assert [v for v, p in plans.items() if p.checkpoint] == [4]
    assert [v for v, p in plans.items() if p.engines_needed] == [3, 4, 6]  # no background sync there
    stop = StepPlan.after(cfg, 1, stop_requested=True)
    assert stop.stop and stop.checkpoint and not StepPlan.after(cfg, 6, stop_requested=True).stop


def test_worker_state_round_trips_through_a_checkpoint_dict():
    from correction_rl.distributed.records import WorkerState

    state = WorkerState(stream={"epoch": 1, "position": 7, "replay": ["a", "b"], "skip": {"c": 1, "d": 2}},
                        calls=3, tokens=40)
    assert WorkerState.from_dict(state.as_dict()) == state and WorkerState.from_dict(None) is None
    assert WorkerState.from_dict({"stream": {}, "calls": 2}).tokens == 0  # older states had no tokens
    assert state.prompts_replayed == 2 and state.prompts_skipped == 3


def test_the_drill_hooks_reach_their_actors_only_when_set(monkeypatch):
    from correction_rl.distributed.actors import DRILL_LOAD_DELAY_ENV, DRILL_TEACHER_DELAY_ENV
    from correction_rl.distributed.cluster import _drill_env

    monkeypatch.delenv(DRILL_LOAD_DELAY_ENV, raising=False)
    monkeypatch.delenv(DRILL_TEACHER_DELAY_ENV, raising=False)
    assert _drill_env(DRILL_LOAD_DELAY_ENV) == {} and _drill_env(DRILL_TEACHER_DELAY_ENV) == {}
    monkeypatch.setenv(DRILL_LOAD_DELAY_ENV, "40")
    assert _drill_env(DRILL_LOAD_DELAY_ENV) == {"runtime_env": {"env_vars": {DRILL_LOAD_DELAY_ENV: "40"}}}
    assert _drill_env(DRILL_TEACHER_DELAY_ENV) == {}  # each hook goes only where it is set
