"""Weight sync seconds vs a raw memory copy of the same bytes, into the HF and the vLLM engine.

Prints one JSON line per (model size, engine) with ``ratio`` = median sync seconds / median
``copy_`` seconds of the same bytes into preallocated tensors, measured in the same run
(target <= 1.5 on CPU), the export (bucketing) seconds apart, GB/s, the vLLM stages
(shared-memory write, worker reload RPC, prefix-cache reset; ``transport_ratio`` = the
shared-memory write alone over the raw copy), and the messages per sync
(buckets + 1 metadata message: must not grow with the parameter count). Every sync carries a
new version, as in training. Usage:
``python benchmarks/bench_weight_sync.py [--sizes tiny small] [--repeats N] [--no-vllm] [--ray-workers N]``.
With ``--ray-workers N`` it also measures the distributed system's Ray object-store transport.
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
from correction_rl.sync import InProcessSync, flatten_to_buckets


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


def bench_ray(size: str, repeats: int, bucket_mb: int, workers: int, root: Path) -> None:
    """The Ray path of the distributed system: one object put in the object store, then every
    rollout worker actor (HF engine) maps it and copies it into its model
    (``ObjectStoreSync``). ``ratio`` compares the whole publish with one raw copy of the same
    bytes, as above; ``per_worker_ratio`` divides by the number of workers that each made a copy."""
    import ray

    from correction_rl.config import config_from_dict
    from correction_rl.distributed.actors import RolloutWorker
    from correction_rl.distributed.weights import ObjectStoreSync
    from correction_rl.tasks import make_prompts

    path = make_model(root / f"ray-{size}", size, seed=0)
    learner = load_model(path)
    cfg = config_from_dict({"model": {"path": str(path)}, "rollout": {"engine": "hf"}})
    ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False)
    try:
        prompts = make_prompts(["addition"], {}, 4, "train", 0)
        actors = [ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg, i, prompts) for i in range(workers)]
        sync = ObjectStoreSync(actors, timeout_s=600)
        update = flatten_to_buckets(learner.named_parameters(), 1, bucket_mb * 2**20)
        dst = [torch.empty_like(b).copy_(b) for b in update.buckets]
        reports, copies = [], []
        for version in range(1, repeats + 2):
            update.version = version
            copies.append(raw_copy_seconds(update, dst))
            reports.append(sync.publish(update))
        sync_s = statistics.median(r.seconds for r in reports[1:])
        copy_s = statistics.median(copies[1:])
        print(json.dumps({
            "bench": "weight_sync", "engine": "hf", "transport": "ray_object_store", "size": size,
            "workers": workers, "params": count_parameters(learner), "bytes": update.num_bytes,
            "num_messages": reports[0].num_messages, "num_tensors": len(update.layout),
            "sync_s": round(sync_s, 5), "raw_copy_s": round(copy_s, 5),
            "ratio": round(sync_s / copy_s, 2), "per_worker_ratio": round(sync_s / copy_s / workers, 2),
            "target": 1.5, "gb_per_s": round(update.num_bytes * workers / sync_s / 1e9, 3),
            "repeats": repeats,
        }), flush=True)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--ray-workers", type=int, default=1,
                        help="rollout worker actors for the Ray object-store transport (0: skip it)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of this (learner-side) process. 1 by default: on a shared 2-core "
        "machine every multi-threaded op waits for a descheduled OpenMP thread (~15 ms each), "
        "which swamps the copies being measured",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            bench_size(size, args.repeats, args.bucket_mb, not args.no_vllm, Path(tmp))
        if args.ray_workers:
            for size in args.sizes:
                bench_ray(size, args.repeats, args.bucket_mb, args.ray_workers, Path(tmp))


if __name__ == "__main__":
    main()
