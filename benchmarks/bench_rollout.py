"""Rollout throughput of the HF and vLLM engines, to choose the CPU default engine.

Prints one JSON line per (engine, model size, batch) with the median generated tokens/s over
several repeats (both engines alive in one process, timed interleaved so machine noise hits
both alike), then one summary line naming the faster engine per (size, batch) and the CPU
default: the faster engine for the tiny model (the demo policy) at batch 64 (the training
rollout batch is 32-64). Sampling at temperature 1 with ``max_new_tokens`` tokens; tokens/s
counts the tokens actually generated (a random model rarely emits <eos>).
Usage: ``python benchmarks/bench_rollout.py [--sizes tiny small] [--batches 1 16 64]
[--engines hf vllm] [--device cpu|cuda]``. ``--device cuda`` runs the HF engine on the GPU in
bf16 (vLLM is left out by default there: the CPU build cannot drive a GPU, and the accelerator
machine has no GPU vLLM); the timings are synchronised by ``generate`` returning token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# vLLM logs to stdout by default; keep stdout for the JSON lines
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

from correction_rl.models import count_parameters, load_model, make_model
from correction_rl.rollout.hf import HFGenerator
from correction_rl.types import Prompt, Sampling
from _common import add_device_argument, check_device, device_info  # noqa: E402


def prompts(batch: int) -> list[Prompt]:
    """Task-shaped prompts of varied lengths (6-9 characters)."""
    return [Prompt(f"q{i}", f"{17 * i % 1000}+{31 * i % 100}=") for i in range(batch)]


def tokens_per_s(engine, batch: int, sampling: Sampling) -> float:
    start = time.perf_counter()
    rollouts = engine.generate(prompts(batch), sampling)
    seconds = time.perf_counter() - start
    return sum(len(r.response_ids) + (r.finish_reason == "stop") for r in rollouts) / seconds


def bench_size(size: str, batches: list[int], repeats: int, max_new_tokens: int, root: Path,
               engine_names=("hf", "vllm"), device: str = "cpu") -> list[dict]:
    path = make_model(root / size, size, seed=0)
    params = count_parameters(load_model(path))
    engines = {}
    if "hf" in engine_names:
        engines["hf"] = HFGenerator(path, device=device, dtype="bfloat16" if device == "cuda" else "float32")
    if "vllm" in engine_names:
        from correction_rl.rollout.vllm import VLLMGenerator

        engines["vllm"] = VLLMGenerator(path, max_model_len=256, kv_cache_gb=1)
    rows = []
    try:
        for batch in batches:
            samples: dict[str, list[float]] = {name: [] for name in engines}
            for rep in range(repeats + 1):  # round 0 warms up (vLLM's first call is slow)
                sampling = Sampling(max_new_tokens=max_new_tokens, temperature=1.0, seed=rep)
                for name, engine in engines.items():
                    tps = tokens_per_s(engine, batch, sampling)
                    if rep > 0:
                        samples[name].append(tps)
            for name, values in samples.items():
                row = {
                    "bench": "rollout", **device_info(device), "engine": name, "size": size, "params": params,
                    "batch": batch, "max_new_tokens": max_new_tokens,
                    "tokens_per_s": round(statistics.median(values), 1),
                    "repeats": repeats, "torch_threads": torch.get_num_threads(),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    return rows


def summarize(rows: list[dict]) -> dict:
    table = {(r["size"], r["batch"], r["engine"]): r["tokens_per_s"] for r in rows}
    faster = {}
    for size, batch in sorted({(r["size"], r["batch"]) for r in rows}):
        if (size, batch, "vllm") not in table or (size, batch, "hf") not in table:
            continue  # one engine only: nothing to compare
        hf, vllm = table[(size, batch, "hf")], table[(size, batch, "vllm")]
        faster[f"{size}/b{batch}"] = {
            "faster": "hf" if hf >= vllm else "vllm", "vllm_over_hf": round(vllm / hf, 2),
        }
    sizes = {r["size"] for r in rows}
    batches = sorted({r["batch"] for r in rows})
    key_size = "tiny" if "tiny" in sizes else sorted(sizes)[0]
    key = f"{key_size}/b{batches[-1]}"
    return {
        "bench": "rollout_summary", "per_config": faster, "decided_by": key,
        "cpu_default_engine": faster[key]["faster"] if key in faster else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "small"])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads of the HF engine. 1 by default, like vLLM's CPU worker on a 2-core "
        "machine (it binds one OpenMP thread and reserves the other core for its frontend); "
        "on a shared machine extra threads mostly wait for each other",
    )
    parser.add_argument("--engines", nargs="+", choices=["hf", "vllm"],
                        help="default: hf vllm on cpu, hf on cuda")
    add_device_argument(parser)
    args = parser.parse_args()
    check_device(args.device)
    engines = args.engines or (["hf"] if args.device == "cuda" else ["hf", "vllm"])
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows += bench_size(size, args.batches, args.repeats, args.max_new_tokens, Path(tmp),
                               engines, args.device)
    if len(engines) > 1:
        print(json.dumps(summarize(rows)), flush=True)


if __name__ == "__main__":
    main()
