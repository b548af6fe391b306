"""Weight sync seconds vs a raw memory copy of the same bytes, into the HF and the vLLM engine.

Prints one JSON line per (model size, engine) with ``ratio`` = median sync seconds / median
``copy_`` seconds of the same bytes into preallocated tensors, measured in the same run
(target <= 1.5 on CPU), the export (bucketing) seconds apart, GB/s, the vLLM stages
(shared-memory write, worker reload RPC, prefix-cache reset; ``transport_ratio`` = the
shared-memory write alone over the raw copy), and the messages per sync
(buckets + 1 metadata message: must not grow with the parameter count). Every sync carries a
new version, as in training. Usage:
``python benchmarks/bench_weight_sync.py [--sizes tiny small] [--repeats N] [--no-vllm] [--ray-workers N]
[--no-collective] [--lora RANK]``.
With ``--lora RANK`` it measures instead, in one run and interleaved, a whole in-process sync
(export inside ``start`` + load into the engine) of a full-fine-tuning learner and of a LoRA
learner of rank RANK (adapter-only sync, ``learner.lora``), into the HF engine and (unless
``--no-vllm``) the vLLM engine (a versioned ``LoRARequest``), one JSON line per size and engine with bytes,
seconds and messages per sync for both and their ratios (targets for r=16 on ``small``: bytes
<= 1/20, seconds <= 1/5; docs/lora.md).
With ``--ray-workers N`` it also measures the distributed system's two Ray transports side by
side, interleaved, into the same N rollout worker actors (HF engines): the object store
(``ObjectStoreSync``) and the collective broadcast over a gloo weight group (``CollectiveSync``,
``sync.transport: collective``; ``--no-collective`` skips it), one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

# vLLM logs to stdout by default; keep stdout for the JSON lines
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from correction_rl.models import count_parameters, load_model, make_model
from correction_rl.rollout.hf import HFGenerator
from correction_rl.weights.sync import InProcessSync, flatten_to_buckets


def raw_copy_seconds(update, dst: list[torch.Tensor]) -> float:
    """Seconds of copying the buckets' bytes into preallocated, already-touched tensors."""
    start = time.perf_counter()
    for d, b in zip(dst, update.buckets):
        d.copy_(b)
    return time.perf_counter() - start


def bench_size(size: str, repeats: int, bucket_mb: int, with_vllm: bool, root: Path) -> None:
    path = make_model(root / size, size, seed=0)
    learner = load_model(path)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(1e-3)
    export_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        update = flatten_to_buckets(learner.named_parameters(), 1, bucket_mb * 2**20)
        export_times.append(time.perf_counter() - start)
    dst = [torch.empty_like(b).copy_(b) for b in update.buckets]  # pages touched once

    engines = [("hf", HFGenerator(path))]
    if with_vllm:
        from correction_rl.rollout.vllm import VLLMGenerator

        engines.append(("vllm", VLLMGenerator(path, max_model_len=256, kv_cache_gb=1)))
    try:
        for name, engine in engines:
            sync = InProcessSync([engine], timeout_s=600)
            reports, breakdown, copies = [], [], []
            for version in range(1, repeats + 2):  # interleaved: machine noise hits both alike
                update.version = version
                copies.append(raw_copy_seconds(update, dst))
                reports.append(sync.publish(update))
                breakdown.append(dict(getattr(engine, "last_sync_seconds", {})))
            reports, breakdown = reports[1:], breakdown[1:]  # the first sync maps the pages
            sync_s = statistics.median(r.seconds for r in reports)
            copy_s = statistics.median(copies[1:])
            stages = {k: round(statistics.median(b[k] for b in breakdown), 5) for k in breakdown[0]}
            if "shm_write_s" in stages:  # the transport alone, without vLLM's reload/repack
                stages["transport_ratio"] = round(stages["shm_write_s"] / copy_s, 2)
            print(json.dumps({
                "bench": "weight_sync", "engine": name, "size": size,
                "params": count_parameters(learner), "bytes": update.num_bytes,
                "bucket_mb": bucket_mb, "num_messages": reports[0].num_messages,
                "num_tensors": len(update.layout),
                "sync_s": round(sync_s, 5), "raw_copy_s": round(copy_s, 5),
                "ratio": round(sync_s / copy_s, 2), "target": 1.5,
                "gb_per_s": round(update.num_bytes / sync_s / 1e9, 3),
                "export_s": round(statistics.median(export_times), 5),
                "repeats": repeats, "threads": torch.get_num_threads(), **stages,
            }), flush=True)
    finally:
        for _, engine in engines:
            engine.close()


class BenchSender:
    """Learner rank 0 of the collective transport without DeepSpeed (a Ray actor here): it holds
    the bucketed update and broadcasts it exactly as ``LearnerRank.collective_send`` does, minus
    the gather and bucketing, which the object-store line excludes too (``export_s`` above)."""

    def __init__(self, model_path: str, bucket_mb: int):
        torch.set_num_threads(1)
        learner = load_model(model_path)
        with torch.no_grad():
            for p in learner.parameters():
                p.add_(1e-3)
        self.update = flatten_to_buckets(learner.named_parameters(), 1, bucket_mb * 2**20)
        self.group = None

    def collective_layout(self):
        from correction_rl.weights.group import WeightLayout

        return WeightLayout.of(self.update)

    def collective_join(self, address, layout, timeout_s: float) -> int:
        from correction_rl.weights.group import WeightGroup

        self.collective_leave()
        self.group = WeightGroup.join(address, 0, timeout_s)
        return address.generation

    def collective_send(self, version: int, timeout_s: float):
        from correction_rl.weights.group import TransferReport

        self.update.version = version
        seconds = self.group.send(self.update, timeout_s)
        return TransferReport(version, seconds, seconds, self.update.num_bytes)

    def collective_leave(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def bench_ray(size: str, repeats: int, bucket_mb: int, workers: int, root: Path, collective: bool) -> None:
    """The Ray paths of the distributed system, into the same rollout worker actors (HF engine),
    interleaved so machine noise hits both alike. Object store: one object put, then every
    worker maps it and adopts the buckets (``ObjectStoreSync``). Collective: a sender actor
    broadcasts the buckets over a gloo weight group, every worker receives them into fresh
    buckets and adopts them (``CollectiveSync``; one tiny membership check per worker first).
    ``ratio`` compares the whole publish with one raw copy of the same bytes, as above;
    ``per_worker_ratio`` divides by the number of workers that each received a copy."""
    import ray

    from correction_rl.config import config_from_dict
    from correction_rl.distributed.actors import RolloutWorker
    from correction_rl.distributed.collective import CollectiveSync
    from correction_rl.distributed.weights import load_on_workers, to_transport
    from correction_rl.tasks import make_prompts
    from correction_rl.weights.transport import sync

    path = make_model(root / f"ray-{size}", size, seed=0)
    learner = load_model(path)
    cfg = config_from_dict({"model": {"path": str(path)}, "rollout": {"engine": "hf"}})
    ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False)
    try:
        prompts = make_prompts(["addition"], {}, 4, "train", 0)
        actors = [ray.remote(RolloutWorker).options(num_cpus=1, max_concurrency=4).remote(cfg, i, prompts)
                  for i in range(workers)]
        update = flatten_to_buckets(learner.named_parameters(), 1, bucket_mb * 2**20)
        dst = [torch.empty_like(b).copy_(b) for b in update.buckets]
        coll = None
        if collective:
            sender = ray.remote(BenchSender).options(num_cpus=0).remote(str(path), bucket_mb)
            coll = CollectiveSync([sender], actors, "gloo", timeout_s=600)
        reports, copies, coll_reports = [], [], []
        for i in range(repeats + 1):
            update.version = 2 * i + 1
            copies.append(raw_copy_seconds(update, dst))
            # ObjectStoreSync's delivery half (its export is measured apart, as ``export_s`` above)
            ref = ray.put(to_transport(update))
            reports.append(load_on_workers(actors, ref, update.version, update.num_bytes, len(update.buckets),
                                           timeout_s=600))
            if coll is not None:
                coll_reports.append(sync(coll, 2 * i + 2))  # the first one also builds the group
        sync_s = statistics.median(r.seconds for r in reports[1:])
        copy_s = statistics.median(copies[1:])
        line = {
            "bench": "weight_sync", "engine": "hf", "transport": "ray_object_store", "size": size,
            "workers": workers, "params": count_parameters(learner), "bytes": update.num_bytes,
            "num_messages": reports[0].num_messages, "num_tensors": len(update.layout),
            "sync_s": round(sync_s, 5), "raw_copy_s": round(copy_s, 5),
            "ratio": round(sync_s / copy_s, 2), "per_worker_ratio": round(sync_s / copy_s / workers, 2),
            "target": 1.5, "gb_per_s": round(update.num_bytes * workers / sync_s / 1e9, 3),
            "repeats": repeats,
        }
        if coll_reports:
            steady = coll_reports[1:]
            coll_s = statistics.median(r.seconds for r in steady)
            line.update({
                "collective_backend": "gloo",
                "collective_sync_s": round(coll_s, 5),
                "collective_broadcast_s": round(statistics.median(r.broadcast_seconds for r in steady), 5),
                "collective_setup_s": round(coll_reports[0].setup_seconds, 4),
                "collective_ratio": round(coll_s / copy_s, 2),
                "collective_per_worker_ratio": round(coll_s / copy_s / workers, 2),
                "collective_gb_per_s": round(update.num_bytes * workers / coll_s / 1e9, 3),
                "collective_num_messages": steady[0].num_messages,
                "collective_over_object_store": round(coll_s / sync_s, 2),
            })
            coll.close()
        print(json.dumps(line), flush=True)
    finally:
        ray.shutdown()


def bench_lora(size: str, rank: int, repeats: int, bucket_mb: int, root: Path, with_vllm: bool) -> None:
    """Adapter-only vs full sync of the same model, through the same in-process transport, into
    the HF engine and (unless ``--no-vllm``) the vLLM engine: one JSON line per engine."""
    from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
    from correction_rl.config.sections import LoRAConfig
    from correction_rl.learner.backends import load_policy
    from correction_rl.learner.learner import Learner

    path = make_model(root / f"lora-{size}", size, seed=0)
    lora = LoRAConfig(enabled=True, rank=rank, alpha=2.0 * rank)
    learners = {}
    for kind, cfg in (("full", LearnerConfig(backend="torch")),
                      ("adapter", LearnerConfig(backend="torch", lora=lora))):
        learner = Learner(load_policy(path, cfg, torch.float32), pad_id=0, learner_cfg=cfg,
                          objective_cfg=ObjectiveConfig(), model_cfg=ModelConfig(), total_steps=1)
        with torch.no_grad():  # moved weights, as after a step (LoRA's B starts at 0)
            for p in learner.model.parameters():
                if p.requires_grad:
                    p.add_(1e-3)
        learners[kind] = learner

    def make_engine(name: str, kind: str):
        adapter = lora if kind == "adapter" else None
        if name == "hf":
            return HFGenerator(path, lora=adapter)
        from correction_rl.rollout.vllm import VLLMGenerator

        return VLLMGenerator(path, max_model_len=256, kv_cache_gb=1, lora=adapter, lora_keep=3)

    for name in ["hf"] + (["vllm"] if with_vllm else []):
        runs = {}
        try:
            for kind, learner in learners.items():
                engine = make_engine(name, kind)
                runs[kind] = (learner, engine, InProcessSync([engine], timeout_s=600, source=learner,
                                                              bucket_bytes=bucket_mb * 2**20), [])
            for version in range(1, repeats + 2):  # interleaved: machine noise hits both alike
                for kind, (learner, engine, sync, reports) in runs.items():
                    reports.append(sync.start(version).wait())
            line = {"bench": "weight_sync_lora", "size": size, "rank": rank, "engine": name,
                    "transport": "in_process", "bucket_mb": bucket_mb, "repeats": repeats,
                    "threads": torch.get_num_threads()}
            for kind, (learner, engine, sync, reports) in runs.items():
                steady = reports[1:]  # the first sync re-homes the engine's parameters
                line[f"{kind}_bytes"] = steady[0].num_bytes
                line[f"{kind}_sync_s"] = round(statistics.median(r.seconds for r in steady), 5)
                line[f"{kind}_num_messages"] = steady[0].num_messages
                line[f"{kind}_num_tensors"] = len(list(learner.named_weights()))
                line[f"{kind}_trainable_params"] = sum(p.numel() for p in learner.model.parameters()
                                                       if p.requires_grad)
        finally:
            for _, engine, _, _ in runs.values():
                engine.close()
        line["bytes_ratio"] = round(line["adapter_bytes"] / line["full_bytes"], 4)
        line["time_ratio"] = round(line["adapter_sync_s"] / line["full_sync_s"], 4)
        line["targets"] = {"bytes_ratio": 1 / 20, "time_ratio": 1 / 5}
        line["meets_targets"] = line["bytes_ratio"] <= 1 / 20 and line["time_ratio"] <= 1 / 5
        print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--ray-workers", type=int, default=1,
                        help="rollout worker actors for the Ray transports (0: skip them)")
    parser.add_argument("--no-collective", action="store_true",
                        help="measure only the object store, not the collective (gloo) transport")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of this (learner-side) process. 1 by default: on a shared 2-core "
        "machine every multi-threaded op waits for a descheduled OpenMP thread (~15 ms each), "
        "which swamps the copies being measured",
    )
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="compare an adapter-only sync of rank RANK with a full sync (and nothing else)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.lora:
            for size in args.sizes:
                bench_lora(size, args.lora, args.repeats, args.bucket_mb, Path(tmp), not args.no_vllm)
            return
        for size in args.sizes:
            bench_size(size, args.repeats, args.bucket_mb, not args.no_vllm, Path(tmp))
        if args.ray_workers:
            for size in args.sizes:
                bench_ray(size, args.repeats, args.bucket_mb, args.ray_workers, Path(tmp),
                          not args.no_collective)


if __name__ == "__main__":
    main()
