"""Weight sync seconds vs a raw memory copy of the same bytes, into the HF and the vLLM engine.

Prints one JSON line per (model size, engine) with ``ratio`` = median sync seconds / median
``copy_`` seconds of the same bytes into preallocated tensors, measured in the same run
(target <= 1.5 on CPU), GB/s, the vLLM stages (shared-memory write, worker reload RPC,
prefix-cache reset; ``transport_ratio`` = the shared-memory write alone over the raw copy), and
the messages per sync (buckets + 1 metadata message: must not grow with the parameter count).
Every sync carries a new version, as in training.

The export (the learner's weights into buckets, on the learner's critical path) is measured
beside the sync, from a real ``Learner`` (torch backend, parameters packed: weights/export.py):
``export_s`` is the export the transports run (``WeightExporter``, buckets borrowed from the
learner's flat parameters), ``export_copy_s`` a snapshot copy into reused buffers,
``export_fresh_s`` the old form (``flatten_to_buckets``, fresh buckets), and
``export_sync_ratio`` = (export_s + sync_s) / raw_copy_s (target <= 1.5). Usage:
``python benchmarks/bench_weight_sync.py [--sizes tiny small] [--repeats N] [--no-vllm] [--ray-workers N]
[--no-collective] [--object-store-mb MB] [--lora RANK] [--device cuda]``.
With ``--device cuda`` the learner, the HF engine and the raw copy live on the GPU (timed with
synchronisation); the line adds the export into pinned host buckets (what the object store gets
from a GPU learner) beside a raw device-to-host copy. vLLM and the Ray lines are CPU-only here.
With ``--lora RANK`` it measures instead, in one run and interleaved, a whole in-process sync
(export inside ``start`` + load into the engine) of a full-fine-tuning learner and of a LoRA
learner of rank RANK (adapter-only sync, ``learner.lora``), into the HF engine and (unless
``--no-vllm``) the vLLM engine (a versioned ``LoRARequest``), one JSON line per size and engine with bytes,
seconds and messages per sync for both and their ratios (targets for r=16 on ``small``: bytes
<= 1/20, seconds <= 1/5; docs/lora.md).
With ``--ray-workers N`` it also measures the distributed system's two Ray transports side by
side, interleaved, into the same N rollout worker actors (HF engines): the object store
(``ObjectStoreSync``: ``export_s`` = the borrowed export plus ``ray.put``, whose copy is
``put_s``, as learner rank 0's ``export`` and ``publish`` do; ``learner_path_s`` = the export alone,
the part between two learner steps, since the put runs beside the next step; ``sync_s`` = the
workers' load) and the collective
broadcast over a gloo weight group (``CollectiveSync``, ``sync.transport: collective``, export
included; ``--no-collective`` skips it), one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# vLLM logs to stdout by default; keep stdout for the JSON lines
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from _common import add_device_argument, check_device, device_info, timed  # noqa: E402

from correction_rl.models import count_parameters, load_model, make_model  # noqa: E402
from correction_rl.rollout.hf import HFGenerator  # noqa: E402
from correction_rl.weights.export import WeightExporter, pack_parameters  # noqa: E402
from correction_rl.weights.sync import InProcessSync, flatten_to_buckets  # noqa: E402


def raw_copy_seconds(update, dst: list[torch.Tensor], device: str = "cpu") -> float:
    """Seconds of copying the buckets' bytes into preallocated, already-touched tensors."""
    def copy() -> None:
        for d, b in zip(dst, update.buckets):
            d.copy_(b, non_blocking=True)

    return timed(copy, device)


def make_learner(path: Path, device: str):
    """A torch-backend ``Learner`` of the model at ``path`` (fp32, parameters packed at
    construction as in training), its weights moved as after a step."""
    from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
    from correction_rl.learner.backends import load_policy
    from correction_rl.learner.learner import Learner

    cfg = LearnerConfig(backend="torch", bf16="off")
    learner = Learner(load_policy(path, cfg, torch.float32), pad_id=0, learner_cfg=cfg,
                      objective_cfg=ObjectiveConfig(), model_cfg=ModelConfig(), total_steps=1, device=device)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(1e-3)
    return learner


def export_seconds(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` (one export; its update is dropped before the next one, as a
    transport drops it once delivered), after one untimed warm-up that plans and allocates."""
    times = []
    for _ in range(repeats + 1):
        times.append(timed(fn, device))
    return statistics.median(times[1:])


def bench_size(size: str, repeats: int, bucket_mb: int, with_vllm: bool, root: Path, device: str = "cpu") -> None:
    path = make_model(root / size, size, seed=0)
    learner = make_learner(path, device)
    bucket_bytes = bucket_mb * 2**20
    exporter = WeightExporter(bucket_bytes)  # what the transports use (InProcessSync, LearnerRank)
    snapshot = WeightExporter(bucket_bytes)
    exports = {
        "export_fresh_s": export_seconds(lambda: flatten_to_buckets(learner.named_weights(), 1, bucket_bytes),
                                         repeats, device),
        "export_copy_s": export_seconds(lambda: snapshot.export(learner.named_weights(), 1), repeats, device),
    }
    extra = {}
    update = flatten_to_buckets(learner.named_weights(), 1, bucket_bytes)
    dst = [torch.empty_like(b).copy_(b) for b in update.buckets]  # pages touched once
    if device == "cuda":  # what the object store gets from a GPU learner: pinned host buckets
        host = WeightExporter(bucket_bytes, device="cpu")
        pinned = [torch.empty(b.shape, dtype=b.dtype, pin_memory=True).copy_(b) for b in update.buckets]
        extra = {
            "export_to_host_s": round(export_seconds(lambda: host.export(learner.named_weights(), 1), repeats,
                                                     device), 5),
            "export_to_host_fresh_s": round(export_seconds(  # the old route: fresh buckets, then .cpu()
                lambda: [b.cpu() for b in flatten_to_buckets(learner.named_weights(), 1, bucket_bytes).buckets],
                repeats, device), 5),
            "raw_d2h_copy_s": round(statistics.median(raw_copy_seconds(update, pinned, device)
                                                      for _ in range(repeats)), 5),
        }

    engines = [("hf", HFGenerator(path, device=device))]
    if with_vllm:
        from correction_rl.rollout.vllm import VLLMGenerator

        engines.append(("vllm", VLLMGenerator(path, max_model_len=256, kv_cache_gb=1)))
    try:
        for name, engine in engines:
            sync = InProcessSync([engine], timeout_s=600)
            syncs, breakdown, copies, export_times = [], [], [], []
            for version in range(1, repeats + 2):  # interleaved: machine noise hits all alike
                copies.append(raw_copy_seconds(update, dst, device))
                box = []
                export_times.append(timed(lambda: box.append(exporter.export(learner.named_weights(), version,
                                                                             borrow=True)), device))
                syncs.append(timed(lambda: sync.publish(box[0]), device))
                del box
                breakdown.append(dict(getattr(engine, "last_sync_seconds", {})))
            breakdown = breakdown[1:]  # the first sync maps the pages
            sync_s = statistics.median(syncs[1:])
            copy_s = statistics.median(copies[1:])
            export_s = statistics.median(export_times[1:])
            stages = {k: round(statistics.median(b[k] for b in breakdown), 5) for k in breakdown[0]}
            if "shm_write_s" in stages:  # the transport alone, without vLLM's reload/repack
                stages["transport_ratio"] = round(stages["shm_write_s"] / copy_s, 2)
            print(json.dumps({
                "bench": "weight_sync", "engine": name, "size": size,
                "params": count_parameters(learner.model), "bytes": update.num_bytes,
                "bucket_mb": bucket_mb, "num_messages": len(update.buckets) + 1,
                "num_tensors": len(update.layout),
                "sync_s": round(sync_s, 5), "raw_copy_s": round(copy_s, 5),
                "ratio": round(sync_s / copy_s, 2), "target": 1.5,
                "gb_per_s": round(update.num_bytes / sync_s / 1e9, 3),
                "export_s": round(export_s, 5),
                "export_sync_ratio": round((export_s + sync_s) / copy_s, 2),
                "export_view_buckets": int(exporter.last_stats["view_buckets"]),
                **{k: round(v, 5) for k, v in exports.items()},
                "export_fresh_ratio": round(exports["export_fresh_s"] / copy_s, 2),
                **extra, "repeats": repeats, "threads": torch.get_num_threads(), **device_info(device), **stages,
            }), flush=True)
    finally:
        for _, engine in engines:
            engine.close()


class BenchSender:
    """Learner rank 0 of the collective transport without DeepSpeed (a Ray actor here): it
    exports its (packed) weights and broadcasts them exactly as ``LearnerRank.collective_send``
    does, export included."""

    def __init__(self, model_path: str, bucket_mb: int):
        torch.set_num_threads(1)
        self.model = load_model(model_path)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(1e-3)
        pack_parameters(self.model)  # as the learner does at construction
        self.exporter = WeightExporter(bucket_mb * 2**20)
        self.group = None

    def collective_layout(self):
        from correction_rl.weights.group import WeightLayout

        return WeightLayout.of(self.exporter.export(self.model.named_parameters(), -1, borrow=True))

    def collective_join(self, address, layout, timeout_s: float) -> int:
        from correction_rl.weights.group import WeightGroup

        self.collective_leave()
        self.group = WeightGroup.join(address, 0, timeout_s)
        return address.generation

    def collective_send(self, version: int, timeout_s: float):
        from correction_rl.weights.group import TransferReport

        start = time.perf_counter()
        update = self.exporter.export(self.model.named_parameters(), version, borrow=True)
        seconds = self.group.send(update, timeout_s)
        return TransferReport(version, time.perf_counter() - start, seconds, update.num_bytes)

    def collective_leave(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def bench_ray(size: str, repeats: int, bucket_mb: int, workers: int, root: Path, collective: bool,
              object_store_mb: int = 0) -> None:
    """The Ray paths of the distributed system, into the same rollout worker actors (HF engine),
    interleaved so machine noise hits both alike. Object store: one object put, then every
    worker maps it and adopts the buckets (``ObjectStoreSync``). Collective: a sender actor
    broadcasts the buckets over a gloo weight group, every worker receives them into fresh
    buckets and adopts them (``CollectiveSync``; one tiny membership check per worker first).
    ``ratio`` compares the workers' load with one raw copy of the same bytes, as above;
    ``export_sync_ratio`` adds the learner's export (borrowed buckets + ``ray.put``, as in
    ``LearnerRank.export`` + ``publish``); ``per_worker_ratio`` divides by the number of workers that each
    received a copy."""
    import ray

    from correction_rl.config import config_from_dict
    from correction_rl.distributed.actors import RolloutWorker
    from correction_rl.distributed.collective import CollectiveSync
    from correction_rl.distributed.weights import load_on_workers, to_transport
    from correction_rl.tasks import make_prompts
    from correction_rl.weights.transport import sync

    path = make_model(root / f"ray-{size}", size, seed=0)
    learner = make_learner(path, "cpu")
    cfg = config_from_dict({"model": {"path": str(path)}, "rollout": {"engine": "hf"}})
    ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_mb * 2**20 if object_store_mb else None)
    try:
        prompts = make_prompts(["addition"], {}, 4, "train", 0)
        actors = [ray.remote(RolloutWorker).options(num_cpus=1, max_concurrency=4).remote(cfg, i, prompts)
                  for i in range(workers)]
        exporter = WeightExporter(bucket_mb * 2**20, "cpu")  # as LearnerRank.export
        update = flatten_to_buckets(learner.named_weights(), 1, bucket_mb * 2**20)
        dst = [torch.empty_like(b).copy_(b) for b in update.buckets]
        coll = None
        if collective:
            sender = ray.remote(BenchSender).options(num_cpus=0).remote(str(path), bucket_mb)
            coll = CollectiveSync([sender], actors, "gloo", timeout_s=600)
        reports, copies, coll_reports, exports, puts, learner_path = [], [], [], [], [], []
        for i in range(repeats + 1):
            version = 2 * i + 1
            copies.append(raw_copy_seconds(update, dst))
            # ObjectStoreSync: what LearnerRank.export and .publish do (export, then one put), then the load
            start = time.perf_counter()
            published = exporter.export(learner.named_weights(), version, borrow=True)
            put_start = time.perf_counter()
            ref = ray.put(to_transport(published))
            exports.append(time.perf_counter() - start)
            puts.append(time.perf_counter() - put_start)
            learner_path.append(put_start - start)  # the views; the put runs beside the next step
            del published
            reports.append(load_on_workers(actors, ref, version, update.num_bytes, len(update.buckets),
                                           timeout_s=600))
            if coll is not None:
                coll_reports.append(sync(coll, 2 * i + 2))  # the first one also builds the group
        sync_s = statistics.median(r.seconds for r in reports[1:])
        copy_s = statistics.median(copies[1:])
        export_s = statistics.median(exports[1:])
        line = {
            "bench": "weight_sync", "engine": "hf", "transport": "ray_object_store", "size": size,
            "workers": workers, "params": count_parameters(learner.model), "bytes": update.num_bytes,
            "num_messages": reports[0].num_messages, "num_tensors": len(update.layout),
            "sync_s": round(sync_s, 5), "raw_copy_s": round(copy_s, 5),
            "ratio": round(sync_s / copy_s, 2), "per_worker_ratio": round(sync_s / copy_s / workers, 2),
            "export_s": round(export_s, 5), "put_s": round(statistics.median(puts[1:]), 5),
            "learner_path_s": round(statistics.median(learner_path[1:]), 5),
            "export_sync_ratio": round((export_s + sync_s) / copy_s, 2),
            "target": 1.5, "gb_per_s": round(update.num_bytes * workers / sync_s / 1e9, 3),
            "repeats": repeats, "object_store_mb": object_store_mb or "default",
        }
        if coll_reports:
            steady = coll_reports[1:]
            coll_s = statistics.median(r.seconds for r in steady)
            line.update({
                "collective_backend": "gloo",
                "collective_sync_s": round(coll_s, 5),
                "collective_broadcast_s": round(statistics.median(r.broadcast_seconds for r in steady), 5),
                "collective_setup_s": round(coll_reports[0].setup_seconds, 4),
                "collective_ratio": round(coll_s / copy_s, 2),  # export included
                "collective_per_worker_ratio": round(coll_s / copy_s / workers, 2),
                "collective_gb_per_s": round(update.num_bytes * workers / coll_s / 1e9, 3),
                "collective_num_messages": steady[0].num_messages,
                "collective_over_object_store": round(coll_s / sync_s, 2),
            })
            coll.close()
        print(json.dumps(line), flush=True)
    finally:
        ray.shutdown()


def bench_lora(size: str, rank: int, repeats: int, bucket_mb: int, root: Path, with_vllm: bool,
               device: str = "cpu") -> None:
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
                          objective_cfg=ObjectiveConfig(), model_cfg=ModelConfig(dtype="float32"), total_steps=1,
                          device=device)
        with torch.no_grad():  # moved weights, as after a step (LoRA's B starts at 0)
            for p in learner.model.parameters():
                if p.requires_grad:
                    p.add_(1e-3)
        learners[kind] = learner

    def make_engine(name: str, kind: str):
        adapter = lora if kind == "adapter" else None
        if name == "hf":
            return HFGenerator(path, lora=adapter, device=device)
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
                    if device == "cuda":  # the engine's copies were only queued
                        torch.cuda.synchronize()
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
    parser.add_argument("--object-store-mb", type=int, default=0,
                        help="Ray object store size for the Ray lines (0: Ray's default). A store a few "
                        "updates large reuses the pages ray.put wrote before, instead of faulting in fresh ones")
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
    add_device_argument(parser)
    args = parser.parse_args()
    check_device(args.device)
    torch.set_num_threads(args.threads)
    with_vllm = not args.no_vllm
    if args.device == "cuda" and (with_vllm or args.ray_workers):
        print("--device cuda: measuring the HF engine only (vLLM and the Ray lines are CPU-only in this "
              "benchmark)", file=sys.stderr)
        with_vllm, args.ray_workers = False, 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.lora:
            for size in args.sizes:
                bench_lora(size, args.lora, args.repeats, args.bucket_mb, Path(tmp), with_vllm, args.device)
            return
        for size in args.sizes:
            bench_size(size, args.repeats, args.bucket_mb, with_vllm, Path(tmp), args.device)
        if args.ray_workers:
            for size in args.sizes:
                bench_ray(size, args.repeats, args.bucket_mb, args.ray_workers, Path(tmp),
                          not args.no_collective, args.object_store_mb)


if __name__ == "__main__":
    main()
