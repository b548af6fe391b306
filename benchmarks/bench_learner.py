"""DeepSpeed learner step vs plain torch step on the same micro-batch.

Prints one JSON line per (size, ZeRO stage) with ``ratio`` = median DeepSpeed step seconds /
median torch step seconds (target <= 1.1). Usage:
``python benchmarks/bench_learner.py [--size tiny|base|small] [--repeats N] [--stages 0 1 2]``
(CPU: the project's character-level models, 16 pairs of 24 + 24 tokens, both learners timed
interleaved in one process so machine noise hits both alike), or
``python benchmarks/bench_learner.py --device cuda --size 0.5b 1b [--stages 2]`` (GPU: locally
built random Llamas of ~0.47B / ~0.94B parameters (``_common.LLAMA_SHAPES``), 16 pairs x 2 x 512
tokens, bf16 with fp32 master weights in both backends). On CUDA the backends run one after the
other (GPU timings are stable; this keeps each backend's peak memory its own) and each line adds
tokens/s, MFU (``_common.train_flops_per_token`` x tokens / step time / the GPU's dense bf16
peak), ``peak_gb`` (``max_memory_allocated`` from building the learner to the last step) and
``collate_s`` (collation + host-to-device copy of one step's batch, the part outside the model).
``--offload cpu`` runs DeepSpeed with ``learner.offload_optimizer: cpu`` (fp32 masters and Adam
moments in host memory, AdamW stepping on the CPU) to measure what offload costs and saves.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time

from _common import (LLAMA_SHAPES, add_device_argument, build_llama, check_device, device_info,
                     peak_flops, repeat_timed, train_flops_per_token)
from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
from correction_rl.learner.learner import Learner
from correction_rl.models import PAD, build_model, vocab
from correction_rl.types import CorrectionPair


def synthetic_pairs(n: int, prompt_len: int, response_len: int, seed: int,
                    vocab_size: int | None = None) -> list[CorrectionPair]:
    """Pairs shaped like the tasks' (x, y, y'): y' differs from y in the last third."""
    rng = random.Random(seed)
    table = vocab()
    alphabet = list(range(4, vocab_size or len(table)))
    pairs = []
    for i in range(n):
        prompt = [table["<bos>"]] + rng.choices(alphabet, k=prompt_len - 1)
        rejected = rng.choices(alphabet, k=response_len - 1) + [table["<eos>"]]
        cut = 2 * response_len // 3
        chosen = rejected[:cut] + rng.choices(alphabet, k=response_len - 1 - cut) + [table["<eos>"]]
        pairs.append(CorrectionPair(str(i), prompt, rejected, chosen, 0, "bench", 0))
    return pairs


def make_learner(size: str, backend: str, stage: int, device: str = "cpu", max_seq_len: int = 256,
                 offload: str = "none") -> Learner:
    model = build_llama(size, device) if size in LLAMA_SHAPES else build_model(size, seed=0)
    return Learner(
        model,
        pad_id=vocab()[PAD],
        learner_cfg=LearnerConfig(backend=backend, zero_stage=stage, lr=1e-4, micro_batch_pairs=16,
                                  offload_optimizer=offload),
        objective_cfg=ObjectiveConfig(form="logistic", shared_prefix="off"),
        model_cfg=ModelConfig(max_seq_len=max_seq_len),
        total_steps=10**6,
        device=device,
    )


def bench_cpu(args) -> None:
    pairs = synthetic_pairs(16, prompt_len=24, response_len=24, seed=0)
    for size in args.size:
        reference = make_learner(size, "torch", 0)
        for stage in args.stages:
            ds = make_learner(size, "deepspeed", stage)
            times = {"torch": [], "deepspeed": []}
            for rep in range(args.repeats + 2):  # 2 warm-up rounds
                for name, learner in (("torch", reference), ("deepspeed", ds)):
                    start = time.perf_counter()
                    learner.train_step(pairs)
                    if rep >= 2:
                        times[name].append(time.perf_counter() - start)
            t_torch, t_ds = statistics.median(times["torch"]), statistics.median(times["deepspeed"])
            print(json.dumps({
                "bench": "learner", "device": "cpu", "size": size, "zero_stage": stage, "pairs": len(pairs),
                "torch_step_s": round(t_torch, 4), "deepspeed_step_s": round(t_ds, 4),
                "ratio": round(t_ds / t_torch, 3), "target": 1.1, "repeats": args.repeats,
            }), flush=True)


def cuda_step(size: str, backend: str, stage: int, pairs, seq_len: int, repeats: int,
              device: str = "cuda", offload: str = "none", profile: bool = False) -> dict:
    """One backend on the GPU: build, 2 warm-up steps, ``repeats`` timed steps, then 3 steps
    with the backward and optimizer step timed apart (``split_*_s``), and with ``profile`` one
    step under torch.profiler (GPU busy time vs wall time, top kernels)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()  # whatever earlier rows left behind is not counted
    learner = make_learner(size, backend, stage, device, max_seq_len=seq_len, offload=offload)
    state = torch.cuda.memory_allocated() - baseline
    torch.cuda.reset_peak_memory_stats()  # the build's fp32 transient is not a training peak
    model = learner.model
    params = sum(p.numel() for p in model.parameters())
    flops_per_token = train_flops_per_token(model, seq_len)
    timing = repeat_timed(lambda: learner.train_step(pairs), device, repeats, warmup=2)
    peak = torch.cuda.max_memory_allocated() - baseline
    collate = repeat_timed(lambda: learner._collate(pairs, count_drops=False), device, 3, warmup=1)
    tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.prompt_ids) + len(p.rejected_ids) for p in pairs)
    row = {"params": params, "step_s": round(timing.median_s, 4), "tokens_per_s": round(tokens / timing.median_s),
           "peak_gb": round(peak / 1e9, 2), "state_gb": round(state / 1e9, 2),
           "collate_s": round(collate.median_s, 5),
           "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "tokens": tokens}
    peak_f = peak_flops("cuda")
    if peak_f:
        row["mfu"] = round(flops_per_token * tokens / timing.median_s / peak_f, 3)
    row.update(split_times(learner, pairs, device))
    if profile:
        row.update(profile_step(learner, pairs))
    engine = getattr(learner.backend, "engine", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()  # DeepSpeed keeps buffers alive through hooks otherwise
    del learner, model, engine
    gc.collect()
    torch.cuda.empty_cache()
    return row


def split_times(learner, pairs, device: str, steps: int = 3) -> dict:
    """Seconds per step in ``backend.backward`` and ``backend.step`` (synchronised wrappers on
    the instance); the rest of ``train_step`` is collation, forward and the loss."""
    import torch

    spent = {"backward": 0.0, "optimizer": 0.0, "total": 0.0}
    backend = learner.backend
    originals = {"backward": backend.backward, "optimizer": backend.step}

    def wrap(key):
        def timed_call(*a, **k):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = originals[key](*a, **k)
            torch.cuda.synchronize()
            spent[key] += time.perf_counter() - start
            return out
        return timed_call

    backend.backward, backend.step = wrap("backward"), wrap("optimizer")
    try:
        for _ in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            learner.train_step(pairs)
            torch.cuda.synchronize()
            spent["total"] += time.perf_counter() - start
    finally:
        del backend.backward, backend.step  # back to the class's methods
    rest = spent["total"] - spent["backward"] - spent["optimizer"]
    return {"split_backward_s": round(spent["backward"] / steps, 4),
            "split_optimizer_s": round(spent["optimizer"] / steps, 4),
            "split_forward_loss_s": round(rest / steps, 4)}


def profile_step(learner, pairs) -> dict:
    """One step under torch.profiler: GPU busy time next to wall time (a gap means the step
    waits on the host: Python, hooks, launches) and the kernels that took longest."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        learner.train_step(pairs)
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    kernels = [e for e in events  # device-side kernels: not the aten ops, nor "a#b" GPU annotations
               if "CUDA" in str(getattr(e, "device_type", "")) and "#" not in e.key]
    busy = sum(device_us(e) for e in kernels) / 1e6
    top = sorted(kernels, key=device_us, reverse=True)[:8]
    return {"profile_wall_s": round(wall, 4), "profile_gpu_busy_s": round(busy, 4),
            "profile_top_kernels": [[e.key[:70], round(device_us(e) / 1e3, 2), e.count] for e in top]}


def bench_cuda(args) -> None:
    prompt_len = args.seq_len // 8
    pairs = synthetic_pairs(args.pairs, prompt_len, args.seq_len - prompt_len, seed=0, vocab_size=32_000)
    for size in args.size:
        torch_row = cuda_step(size, "torch", 0, pairs, args.seq_len, args.repeats, args.device,
                              profile=args.profile)
        for stage in args.stages:
            try:
                ds_row = cuda_step(size, "deepspeed", stage, pairs, args.seq_len, args.repeats, args.device,
                                   offload=args.offload, profile=args.profile)
            except Exception as exc:  # report, and keep the other sizes/stages
                ds_row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            line = {"bench": "learner", **device_info("cuda"), "size": size, "zero_stage": stage,
                    "offload_optimizer": args.offload,
                    "pairs": len(pairs), "seq_len": args.seq_len, "repeats": args.repeats, "target": 1.1,
                    **{f"torch_{k}": v for k, v in torch_row.items()},
                    **{f"deepspeed_{k}": v for k, v in ds_row.items()}}
            if "step_s" in ds_row:
                line["ratio"] = round(ds_row["step_s"] / torch_row["step_s"], 3)
            print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", nargs="+", help="tiny|base|small (cpu, default tiny); 0.5b|1b (cuda, default both)")
    parser.add_argument("--repeats", type=int, help="timed steps (default 15 on cpu, 5 on cuda)")
    parser.add_argument("--stages", type=int, nargs="*", help="ZeRO stages (default 0 1 2 on cpu, 2 on cuda)")
    parser.add_argument("--pairs", type=int, default=16, help="cuda: pairs per step")
    parser.add_argument("--seq-len", type=int, default=512, help="cuda: tokens per sequence (prompt 1/8)")
    parser.add_argument("--offload", default="none", choices=["none", "cpu"],
                        help="cuda: DeepSpeed with learner.offload_optimizer (ZeRO 1-3)")
    parser.add_argument("--profile", action="store_true", help="cuda: one step under torch.profiler")
    add_device_argument(parser)
    args = parser.parse_args()
    check_device(args.device)
    cuda = args.device == "cuda"
    args.size = args.size or (["0.5b", "1b"] if cuda else ["tiny"])
    args.repeats = args.repeats or (5 if cuda else 15)
    args.stages = args.stages if args.stages is not None else ([2] if cuda else [0, 1, 2])
    bench_cuda(args) if cuda else bench_cpu(args)


if __name__ == "__main__":
    main()
