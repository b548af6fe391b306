"""``bench_logprobs.py --device cuda``: every log-prob variant side by side on one GPU.

One process (CUDA memory is per allocation, not per process, so no subprocesses are needed).
Per variant, forward + ``backward()`` of ``sequence_logprobs(...).sum()`` on bf16 logits
``[batch, seq, vocab]`` that are a leaf requiring grad:

* ``seconds``: median (and best) of ``--repeats`` synchronised runs after one warm-up; the logits
  are restored from a pristine copy before each run (in-place variants overwrite them), untimed;
* ``peak_gb``: ``max_memory_allocated`` during one run minus what was allocated before it: the
  extra memory beyond the logits, *including* their gradient (0 when written in place);
* ``max_abs_err``: largest difference of the per-row log-probs from the naive fp32 ones.

Variants: ``naive`` (log_softmax + gather), ``chunked`` / ``chunked_out_of_place`` (the torch
``SelectiveLogSoftmax``), ``triton`` / ``triton_out_of_place`` (``logprobs_triton``),
``compiled_naive`` (``torch.compile`` of naive; ``--compile``, it takes ~1 min to compile).
The floor: ``copy_floor_s``, a measured device-to-device copy of the logits (one read + one write
of ``logits_bytes``, which is what a fused forward+backward at least has to move), and
``nominal_floor_s`` = 2 x logits bytes / 4.3 TB/s as in issue 21.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import cuda_peak_bytes, device_info, repeat_timed  # noqa: E402
from correction_rl.learner.logprobs import naive_sequence_logprobs, sequence_logprobs  # noqa: E402

TARGETS = {"time_ratio": 0.5, "floor_ratio": 3.0, "memory_ratio": 0.05}
DEVICE = "cuda"  # a CPU dry run of this file's logic sets "cpu" (with torch.cuda stubbed)
SWEEP = [(2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 8), (8192, 16)]


def add_cuda_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="cuda: add torch.compile(naive)")
    parser.add_argument("--sweep", action="store_true", help="cuda: time Triton block/warp choices")


def _variants(args) -> dict:
    chunk = args.chunk

    def chunked(inplace):
        return lambda x, i, m: sequence_logprobs(x, i, m, chunk, inplace_backward=inplace, kernel="chunked")

    def triton(inplace):
        return lambda x, i, m: sequence_logprobs(x, i, m, inplace_backward=inplace, kernel="triton")

    variants = {
        "naive": naive_sequence_logprobs,
        "chunked": chunked(True),
        "chunked_out_of_place": chunked(False),
        "triton": triton(True),
        "triton_out_of_place": triton(False),
    }
    if args.compile:
        variants["compiled_naive"] = torch.compile(naive_sequence_logprobs, dynamic=False)
    return variants


def _case(args, vocab: int):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    source = torch.randn(args.batch, args.seq, vocab, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=DEVICE, generator=gen)
    mask = torch.zeros(args.batch, args.seq, dtype=torch.long, device=DEVICE)
    mask[:, args.seq // 8 :] = 1  # a prompt of seq/8 tokens, then the response
    return source, ids, mask


def _measure(fn, source, ids, mask, repeats: int, reference=None) -> dict:
    logits = source.clone().requires_grad_()
    result: dict = {}

    def restore():
        logits.grad = None
        with torch.no_grad():
            logits.copy_(source)

    def run():
        out = fn(logits, ids, mask)
        out.sum().backward()
        result["out"] = out.detach()

    timing = repeat_timed(run, DEVICE, repeats, warmup=1, before=restore)
    restore()
    peak = cuda_peak_bytes(run)
    line = {"s": round(timing.median_s, 5), "best_s": round(timing.best_s, 5), "peak_gb": round(peak / 1e9, 3),
            "peak_bytes": peak}
    if reference is not None:
        line["max_abs_err"] = float((result["out"].float() - reference).abs().max())
    del logits, result
    torch.cuda.empty_cache()
    return line


def _sweep(source, ids, mask, repeats: int) -> dict:
    import correction_rl.learner.logprobs_triton as kernels

    saved = (kernels.FORWARD_BLOCK, kernels.FORWARD_WARPS, kernels.BACKWARD_BLOCK, kernels.BACKWARD_WARPS)
    fn = lambda x, i, m: sequence_logprobs(x, i, m, inplace_backward=True, kernel="triton")  # noqa: E731
    times = {}
    try:
        for block, warps in SWEEP:
            kernels.FORWARD_BLOCK, kernels.FORWARD_WARPS = block, warps
            kernels.BACKWARD_BLOCK, kernels.BACKWARD_WARPS = block, warps
            times[f"{block}x{warps}"] = _measure(fn, source, ids, mask, repeats)["s"]
    finally:
        kernels.FORWARD_BLOCK, kernels.FORWARD_WARPS, kernels.BACKWARD_BLOCK, kernels.BACKWARD_WARPS = saved
    return times


def measure_cuda(args, vocab: int) -> dict:
    source, ids, mask = _case(args, vocab)
    logits_bytes = source.numel() * source.element_size()
    copy = torch.empty_like(source)
    floor = repeat_timed(lambda: copy.copy_(source), DEVICE, 5, warmup=1).best_s
    del copy
    with torch.no_grad():
        reference = naive_sequence_logprobs(source.float(), ids, mask).float()
    torch.cuda.empty_cache()
    line = {"bench": "logprobs", **device_info("cuda"), "vocab": vocab, "batch": args.batch,
            "seq": args.seq, "dtype": "bfloat16", "chunk_size": args.chunk, "repeats": args.repeats,
            "logits_bytes": logits_bytes, "copy_floor_s": round(floor, 5),
            "nominal_floor_s": round(2 * logits_bytes / 4.3e12, 5), "targets": TARGETS}
    results = {}
    for name, fn in _variants(args).items():
        try:
            results[name] = _measure(fn, source, ids, mask, args.repeats, reference)
        except Exception as exc:  # one variant failing (OOM, compile) must not lose the others
            line[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.empty_cache()
    naive = results.get("naive")
    for name, r in results.items():
        for key, value in r.items():
            line[f"{name}_{key}"] = value
        if naive:
            line[f"{name}_time_ratio"] = round(r["s"] / naive["s"], 3)
            line[f"{name}_memory_ratio"] = round(r["peak_bytes"] / max(1, naive["peak_bytes"]), 4)
        line[f"{name}_floor_ratio"] = round(r["best_s"] / floor, 2)
    if "triton" in results and naive:
        line["triton_targets_met"] = {
            "time_ratio": line["triton_time_ratio"] <= TARGETS["time_ratio"],
            "floor_ratio": line["triton_floor_ratio"] <= TARGETS["floor_ratio"],
            "memory_ratio": line["triton_memory_ratio"] <= TARGETS["memory_ratio"],
        }
    if args.sweep:
        line["triton_sweep_s"] = _sweep(source, ids, mask, args.repeats)
    return line


def run_cuda(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if args.quick:
        args.batch, args.seq = 2, 1024
    for vocab in args.vocab:
        print(json.dumps(measure_cuda(args, vocab)), flush=True)
