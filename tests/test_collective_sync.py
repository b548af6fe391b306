"""The collective weight transport (``sync.transport: collective``).

Ray-free: two real processes join a gloo weight group (``correction_rl.weights.group``); rank 0
broadcasts a real model's buckets, rank 1 receives them bit for bit; a member that never joins or
never receives turns into ``SyncTimeout`` within the limit instead of a hang. Ray (slow): a short
DeepSpeed run with the collective transport leaves every rollout worker on the learner's greedy
policy, logs sync seconds and bytes, and rebuilds the group when a rollout worker was restarted.
GPU (skipped without CUDA): the NCCL backend, still without Ray.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from correction_rl.weights.sync import SyncTimeout, flatten_to_buckets
from correction_rl.weights.group import GroupAddress, WeightGroup, WeightLayout, choose_transport


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _receiver(address: GroupAddress, layout: WeightLayout, versions: list[int], mode: str, out_path: str,
              timeout_s: float) -> None:
    """Rank 1 (a spawned process): join, then receive each version (or, ``mode='idle'``, join and
    never receive), saving what arrived."""
    torch.set_num_threads(1)
    group = WeightGroup.join(address, 1, timeout_s)
    if mode == "idle":
        time.sleep(timeout_s + 3)
        group.close()
        return
    received = {}
    for version in versions:
        update = group.receive(layout, version, timeout_s)
        received[version] = {"layout": update.layout, "buckets": update.buckets}
    torch.save(received, out_path)
    group.close()


def _weights(model_dir, scale: float) -> dict[str, torch.Tensor]:
    from correction_rl.models import load_model

    model = load_model(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gloo_group_delivers_a_real_models_buckets_exactly(tiny_model_dir, tmp_path):
    weights = [_weights(tiny_model_dir, s) for s in (1.0, 0.5)]  # two versions, different bytes
    updates = [flatten_to_buckets(w.items(), v, 1 << 16) for v, w in enumerate(weights, start=1)]
    assert len(updates[0].buckets) > 2  # several broadcasts, not one
    layout = WeightLayout.of(updates[0])
    assert WeightLayout.plan(weights[0].items(), 1 << 16) == layout  # planned on meta == real
    address = GroupAddress("127.0.0.1", _free_port(), 2, "gloo", generation=1)
    out = tmp_path / "received.pt"
    proc = mp.get_context("spawn").Process(target=_receiver, args=(address, layout, [1, 2], "receive", str(out), 60.0))
    proc.start()
    try:
        group = WeightGroup.join(address, 0, timeout_s=60.0)
        for update in updates:
            layout.check(update)
            assert group.send(update, timeout_s=60.0) > 0
        group.close()
        proc.join(60)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
    received = torch.load(out)
    for update in updates:
        got = received[update.version]
        assert got["layout"] == list(layout.layout)
        assert len(got["buckets"]) == len(update.buckets)
        for sent, arrived in zip(update.buckets, got["buckets"]):
            assert arrived.dtype == sent.dtype and torch.equal(arrived, sent)


def test_a_member_that_never_joins_or_never_receives_times_out(tiny_model_dir, tmp_path):
    update = flatten_to_buckets(_weights(tiny_model_dir, 1.0).items(), 1, 1 << 16)
    layout = WeightLayout.of(update)
    # nobody else joins: rank 0's join gives up after its limit
    lonely = GroupAddress("127.0.0.1", _free_port(), 2, "gloo", generation=1)
    start = time.perf_counter()
    with pytest.raises(SyncTimeout, match="joining the gloo weight group"):
        WeightGroup.join(lonely, 0, timeout_s=3.0)
    assert time.perf_counter() - start < 10
    # rank 1 joins but never receives: the send gives up (the group is then broken)
    address = GroupAddress("127.0.0.1", _free_port(), 2, "gloo", generation=2)
    proc = mp.get_context("spawn").Process(target=_receiver, args=(address, layout, [], "idle", "", 5.0))
    proc.start()
    try:
        group = WeightGroup.join(address, 0, timeout_s=60.0)
        start = time.perf_counter()
        with pytest.raises(SyncTimeout, match="gloo broadcast"):
            group.send(update, timeout_s=5.0)
        assert time.perf_counter() - start < 15
        assert group.broken
        with pytest.raises(RuntimeError, match="must be rebuilt"):
            group.send(update, timeout_s=5.0)
        group.close()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def test_choose_transport():
    assert choose_transport("auto", 0, 0, "hf") == ("object_store", None)
    assert choose_transport("auto", 0, 0, "vllm") == ("object_store", None)
    assert choose_transport("auto", 1, 1, "vllm") == ("collective", "nccl")
    assert choose_transport("auto", 0.5, 0.5, "vllm") == ("object_store", None)  # may share a GPU
    assert choose_transport("collective", 0, 0, "hf") == ("collective", "gloo")
    assert choose_transport("collective", 1, 0, "hf") == ("collective", "gloo")
    assert choose_transport("object_store", 1, 1, "vllm") == ("object_store", None)
    with pytest.raises(ValueError, match="NCCL groups only"):
        choose_transport("collective", 0, 0, "vllm")


# --- GPU: the NCCL backend (vLLM's PyNccl communicator), without Ray ----------------------------


def _nccl_receiver(address: GroupAddress, layout: WeightLayout, out_path: str) -> None:
    group = WeightGroup.join(address, 1, 120.0, device="cuda:0")
    update = group.receive(layout, 1, 120.0)
    torch.save([b.cpu() for b in update.buckets], out_path)
    group.close()


@pytest.mark.gpu
def test_nccl_group_delivers_buckets_between_two_processes(tiny_model_dir, tmp_path):
    """Both ranks on one GPU would be refused by NCCL (duplicate device), so this needs two."""
    pytest.importorskip("vllm")
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL refuses two ranks on one device; needs 2 GPUs")
    weights = {n: t.cuda(1) for n, t in _weights(tiny_model_dir, 1.0).items()}
    update = flatten_to_buckets(weights.items(), 1, 1 << 16)
    layout = WeightLayout.of(update)
    address = GroupAddress("127.0.0.1", _free_port(), 2, "nccl", generation=1)
    out = tmp_path / "nccl.pt"
    proc = mp.get_context("spawn").Process(target=_nccl_receiver, args=(address, layout, str(out)))
    proc.start()
    try:
        group = WeightGroup.join(address, 0, timeout_s=120.0, device="cuda:1")
        group.send(update, timeout_s=120.0)
        proc.join(120)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
    for sent, arrived in zip(update.buckets, torch.load(out)):
        assert torch.equal(sent.cpu(), arrived)


@pytest.mark.gpu
def test_nccl_join_without_peers_times_out():
    """One GPU suffices: rank 0 of a 2-member NCCL group whose peer never comes."""
    pytest.importorskip("vllm")
    address = GroupAddress("127.0.0.1", _free_port(), 2, "nccl", generation=1)
    start = time.perf_counter()
    with pytest.raises(SyncTimeout, match="joining the nccl weight group"):
        WeightGroup.join(address, 0, timeout_s=5.0, device="cuda:0")
    assert time.perf_counter() - start < 15


# --- Ray: the collective transport in the actor-learner system ---------------------------------


@pytest.mark.slow
def test_collective_transport_keeps_every_worker_on_the_learner_policy_and_survives_a_restart(
    tmp_path, ray_local, warm_policy_dir
):
    """Sync mode, 2 DeepSpeed learner ranks (both called for every sync, as ZeRO-3 gathers
    need), 2 HF rollout workers, gloo weight group; then a rollout worker is killed, Ray restarts
    it, and the next sync rebuilds the group and brings it back to the learner's weights.
    (ZeRO-2 here: under ZeRO-3 the rank-0-only ``save_pretrained`` this test needs would wait
    forever for rank 1 in the gather.)"""
    import ray

    from correction_rl.prompts.split import train_and_held_out
    from correction_rl.distributed.cluster import start_cluster
    from correction_rl.distributed.collective import CollectiveSync
    from correction_rl.distributed.driver import Driver
    from correction_rl.observe.metrics import JsonlSink, read_jsonl_metrics
    from correction_rl.models import load_model, load_tokenizer
    from correction_rl.rollout.hf import HFGenerator
    from correction_rl.types import Sampling

    from test_distributed import system_config

    cfg = system_config(
        tmp_path, warm_policy_dir, "collective", mode="sync", total_steps=3,
        sync__transport="collective", learner__lr=1e-3, eval__every_steps=0,
        resources__num_learner_ranks=2, resources__num_rollout_workers=2,
    )
    train, held_out = train_and_held_out(cfg)
    cluster = start_cluster(cfg, train)
    metrics_path = tmp_path / "metrics.jsonl"
    try:
        driver = Driver(cfg, cluster, held_out)
        assert isinstance(driver.sync, CollectiveSync) and driver.sync.backend == "gloo"
        sink = JsonlSink(metrics_path)
        driver.train(sink)
        sink.close()
        assert driver.version == 3
        assert ray.get([w.policy_version.remote() for w in cluster.rollout_workers]) == [3, 3]

        rows = [r for r in read_jsonl_metrics(metrics_path) if "sync/version" in r]
        assert [r["sync/version"] for r in rows] == [1, 2, 3]
        for row in rows:
            assert row["sync/collective"] == 1.0
            assert row["sync/seconds"] > 0 and row["sync/bytes"] > 0 and row["sync/gb_per_s"] > 0
            assert row["sync/broadcast_seconds"] > 0
        assert [r["sync/group_builds"] for r in rows] == [1, 1, 1]  # set up once, then reused
        assert rows[0]["sync/setup_seconds"] > 0 and rows[1]["sync/setup_seconds"] == 0

        ray.get(cluster.learners[0].save_pretrained.remote(str(tmp_path / "learner")))
        tokenizer = load_tokenizer(warm_policy_dir)
        prompts = held_out[:16]
        greedy = Sampling(max_new_tokens=6, temperature=0.0)
        expected = [r.response_text for r in HFGenerator(load_model(tmp_path / "learner"), tokenizer).generate(prompts, greedy)]
        before = [r.response_text for r in HFGenerator(load_model(warm_policy_dir), tokenizer).generate(prompts, greedy)]
        assert expected != before  # three lr-1e-3 steps really changed the policy
        for worker in cluster.rollout_workers:
            assert ray.get(worker.greedy.remote(prompts, 6)) == expected

        # restart-and-continue: Ray restarts a killed worker with the initial weights and no group
        victim = cluster.rollout_workers[1]
        old_pid = ray.get(victim.pid.remote())
        ray.kill(victim, no_restart=False)
        deadline = time.monotonic() + 300
        while True:
            try:
                if ray.get(victim.pid.remote(), timeout=60) != old_pid:
                    break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
                pass
            assert time.monotonic() < deadline, "the killed rollout worker was not restarted"
            time.sleep(1.0)
        assert ray.get(victim.collective_generation.remote()) is None
        assert ray.get(victim.greedy.remote(prompts, 6)) == before
        report = driver.sync_weights()
        assert report.group_builds == 2 and report.setup_seconds > 0 and report.version == 3
        for worker in cluster.rollout_workers:
            assert ray.get(worker.greedy.remote(prompts, 6)) == expected
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_a_stalled_receiver_raises_sync_timeout_naming_it(tmp_path, ray_local, warm_policy_dir, monkeypatch):
    """The fault drill (``CORRECTION_RL_DRILL_LOAD_DELAY_S``) on the collective path: the worker sleeps
    inside its receive while holding its lock, so learner rank 0's broadcast cannot finish; the
    driver raises ``SyncTimeout`` after ``sync.timeout_s``, naming the pending members, instead of
    hanging."""
    from correction_rl.prompts.split import train_and_held_out
    from correction_rl.distributed.cluster import start_cluster
    from correction_rl.distributed.actors import DRILL_LOAD_DELAY_ENV
    from correction_rl.distributed.driver import Driver

    from test_distributed import system_config

    monkeypatch.setenv(DRILL_LOAD_DELAY_ENV, "40")  # handed to the rollout actors by start_cluster
    cfg = system_config(tmp_path, warm_policy_dir, "stall", mode="sync", sync__transport="collective",
                        sync__timeout_s=8, learner__zero_stage=0)
    train, held_out = train_and_held_out(cfg)
    cluster = start_cluster(cfg, train)
    try:
        driver = Driver(cfg, cluster, held_out)
        start = time.perf_counter()
        with pytest.raises(SyncTimeout, match=r"broadcast.*no answer from .*rollout worker 0"):
            driver.sync_weights()
        assert time.perf_counter() - start < 8 * 2 + 10  # the group setup + the broadcast stage
        assert driver.sync.joined is False  # the next sync rebuilds the group
    finally:
        cluster.shutdown()
