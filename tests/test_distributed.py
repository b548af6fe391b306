"""The Ray actor-learner system on Ray's local cluster: real actors, DeepSpeed learner ranks,
HF and vLLM (CPU build) rollouts, the oracle teacher, W&B offline read back."""

from __future__ import annotations

import json

import pytest
import torch

from correction_rl.observe.metrics import read_jsonl_metrics, read_offline_run

pytestmark = pytest.mark.slow


def system_config(tmp_path, policy_dir, name: str, **overrides):
    """A short Ray-mode run; ``section__field=value`` overrides (see ``system_config_dict``)."""
    from correction_rl.config import config_from_dict

    return config_from_dict(system_config_dict(tmp_path, policy_dir, name, **overrides))


def system_config_dict(tmp_path, policy_dir, name: str, **overrides) -> dict:
    """The base config of the system tests as a dict, ``a__b=v`` setting field ``a.b``."""
    base = {
        "name": name,
        "output_dir": str(tmp_path),
        "mode": "async",
        "total_steps": 4,
        "model": {"path": str(policy_dir)},
        "task": {"names": ["addition"], "num_train": 400, "num_eval": 16},
        "rollout": {"engine": "hf", "batch_size": 16, "max_new_tokens": 6},
        "objective": {"form": "dpo", "beta": 0.1},
        "learner": {"backend": "deepspeed", "zero_stage": 2, "lr": 1e-4, "micro_batch_pairs": 8},
        "buffer": {"min_fresh_pairs": 8, "max_staleness": 2},
        "sync": {"every_steps": 1, "timeout_s": 60},
        "eval": {"every_steps": 2, "num_prompts": 16},
        "metrics": {"wandb_mode": "offline", "console_every_steps": 1},
        "resources": {"num_rollout_workers": 1, "num_teacher_workers": 1, "num_learner_ranks": 1,
                      "call_timeout_s": 300, "start_timeout_s": 400},
    }
    for dotted, value in overrides.items():
        node = base
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return base


def test_async_run_writes_metrics_to_wandb_and_the_correction_log(tmp_path, ray_local, warm_policy_dir):
    from correction_rl.buffer.correction_log import read
    from correction_rl.distributed.driver import run

    cfg = system_config(tmp_path, warm_policy_dir, "async", metrics__table_every_steps=2)
    result = run(cfg)
    assert result.steps == cfg.total_steps

    rows = read_jsonl_metrics(result.run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == [1, 2, 3, 4]
    history = read_offline_run(result.run_dir)
    logged = {key for row in history for key in row}
    for key in ("train/loss", "train/margin", "sync/seconds", "sync/gb_per_s",
                "eval/greedy/correction_rate", "buffer/size", "buffer/batch_staleness_mean",
                "system/pairs_per_s", "system/rollout_idle_fraction", "system/teacher_idle_fraction",
                "teacher/corrections"):
        assert key in logged, f"{key} missing from the W&B offline run"
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    staleness = [r["buffer/batch_staleness_max"] for r in rows if "buffer/batch_staleness_max" in r]
    assert max(staleness) <= cfg.buffer.max_staleness
    # the next step is issued right after the export it must follow: each row's sync (in the
    # background, its row held until it ended) carries that step's own version
    assert [r["sync/version"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]

    pairs = list(read(result.run_dir / "corrections.jsonl"))
    assert len(pairs) >= 4 * cfg.learner.micro_batch_pairs
    assert len({p.pair_id for p in pairs}) == len(pairs)
    assert all(p.ref_logps is not None for p in pairs)  # computed once, at ingestion
    assert json.loads((result.run_dir / "eval_after.json").read_text())["modes"]["greedy"]["num_prompts"] == 16


def test_two_learner_ranks_in_sync_mode_keep_every_worker_on_the_learner_policy(
    tmp_path, ray_local, warm_policy_dir
):
    import ray

    from correction_rl.prompts.split import train_and_held_out
    from correction_rl.distributed.cluster import start_cluster
    from correction_rl.distributed.driver import Driver
    from correction_rl.observe.metrics import MultiSink
    from correction_rl.models import load_model, load_tokenizer
    from correction_rl.rollout.hf import HFGenerator
    from correction_rl.types import Sampling

    cfg = system_config(
        tmp_path, warm_policy_dir, "ranks", mode="sync", total_steps=3,
        resources__num_learner_ranks=2, resources__num_rollout_workers=2,
        learner__lr=1e-3, eval__every_steps=0,
    )
    train, held_out = train_and_held_out(cfg)
    cluster = start_cluster(cfg, train)
    try:
        driver = Driver(cfg, cluster, held_out)
        driver.train(MultiSink([]))
        assert driver.version == 3
        assert ray.get([r.version.remote() for r in cluster.learners]) == [3, 3]
        assert ray.get([w.policy_version.remote() for w in cluster.rollout_workers]) == [3, 3]
        # The learner's weights, as rank 0 publishes them, decoded greedily in this process...
        ray.get(cluster.learners[0].save_pretrained.remote(str(tmp_path / "learner")))
        tokenizer = load_tokenizer(warm_policy_dir)
        learner = HFGenerator(load_model(tmp_path / "learner"), tokenizer)
        prompts = held_out[:16]
        expected = [r.response_text for r in learner.generate(prompts, Sampling(max_new_tokens=6, temperature=0.0))]
        initial = HFGenerator(load_model(warm_policy_dir), tokenizer)
        before = [r.response_text for r in initial.generate(prompts, Sampling(max_new_tokens=6, temperature=0.0))]
        # ...equal every rollout worker's greedy outputs after the sync.
        for worker in cluster.rollout_workers:
            assert ray.get(worker.greedy.remote(prompts, 6)) == expected
        assert expected != before  # three lr-1e-3 steps really changed the policy
    finally:
        cluster.shutdown()


def test_async_run_with_vllm_rollouts(tmp_path, ray_local, warm_policy_dir):
    pytest.importorskip("vllm")
    from correction_rl.distributed.driver import run

    cfg = system_config(
        tmp_path, warm_policy_dir, "vllm", total_steps=3, rollout__engine="vllm",
        eval__every_steps=0, eval__sampled=False, metrics__wandb_mode="disabled",
    )
    result = run(cfg)
    assert result.steps == 3
    rows = read_jsonl_metrics(result.run_dir / "metrics.jsonl")
    versions = [r["sync/version"] for r in rows if "sync/version" in r]
    assert versions == [1, 2, 3]
    assert result.after.modes["greedy"].num_prompts == 16


def test_unsatisfiable_request_fails_fast_naming_the_resource(tmp_path, ray_local, warm_policy_dir):
    from correction_rl.distributed.cluster import PlacementError, reserve

    cfg = system_config(tmp_path, warm_policy_dir, "nogpu", resources__gpus_per_learner_rank=1.0)
    with pytest.raises(PlacementError, match="GPU: requested 1"):
        reserve(cfg)
    cfg = system_config(tmp_path, warm_policy_dir, "nolabel", resources__teacher_resource="teacher_node")
    with pytest.raises(PlacementError, match="teacher_node"):
        reserve(cfg)
