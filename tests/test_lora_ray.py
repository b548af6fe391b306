"""LoRA under Ray (issue 18): the adapter-only update goes through both Ray transports (object
store, gloo collective) unchanged, and every rollout worker ends on the learner's greedy policy.

Sync mode, 1 DeepSpeed ZeRO-2 learner rank, 1 HF rollout worker, 3 steps; the learner's adapter
is exported (``learner.lora.export: adapter``) and loaded with peft over the base, which is the
exact arithmetic the worker's engine runs. ``slow`` (~1-2 min per transport)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_adapter_sync_through_the_ray_transports(tmp_path, ray_local, warm_policy_dir, transport):
    import ray
    from peft import PeftModel

    from correction_rl.distributed.cluster import start_cluster
    from correction_rl.distributed.driver import Driver
    from correction_rl.models import load_model, load_tokenizer
    from correction_rl.observe.metrics import JsonlSink, read_jsonl_metrics
    from correction_rl.prompts.split import train_and_held_out
    from correction_rl.rollout.hf import HFGenerator
    from correction_rl.types import Sampling

    from test_distributed import system_config

    cfg = system_config(
        tmp_path, warm_policy_dir, f"lora-{transport}", mode="sync", total_steps=3,
        sync__transport=transport, learner__lr=1e-2, eval__every_steps=0,
        learner__lora={"enabled": True, "rank": 8, "alpha": 16.0, "export": "adapter"},
    )
    train, held_out = train_and_held_out(cfg)
    cluster = start_cluster(cfg, train)
    metrics_path = tmp_path / "metrics.jsonl"
    try:
        driver = Driver(cfg, cluster, held_out)
        sink = JsonlSink(metrics_path)
        driver.train(sink)
        sink.close()
        assert driver.version == 3
        rows = [r for r in read_jsonl_metrics(metrics_path) if "sync/version" in r]
        assert [r["sync/version"] for r in rows] == [1, 2, 3]
        full_bytes = sum(p.numel() * p.element_size() for p in load_model(warm_policy_dir).parameters())
        assert all(0 < r["sync/bytes"] * 20 <= full_bytes for r in rows)  # only the adapter travelled

        ray.get(cluster.learners[0].save_pretrained.remote(str(tmp_path / "adapter")))
        tokenizer = load_tokenizer(warm_policy_dir)
        learner_policy = PeftModel.from_pretrained(load_model(warm_policy_dir), str(tmp_path / "adapter"))
        prompts = held_out[:16]
        greedy = Sampling(max_new_tokens=6, temperature=0.0)
        expected = [r.response_text for r in HFGenerator(learner_policy.eval(), tokenizer).generate(prompts, greedy)]
        before = [r.response_text for r in HFGenerator(load_model(warm_policy_dir), tokenizer).generate(prompts, greedy)]
        assert expected != before  # three steps really changed the policy
        for worker in cluster.rollout_workers:
            assert ray.get(worker.greedy.remote(prompts, 6)) == expected
    finally:
        cluster.shutdown()
