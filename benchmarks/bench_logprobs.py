"""Peak memory and time of sequence log-probs, forward + backward: chunked kernel vs naive.

Run from the repo root: ``python benchmarks/bench_logprobs.py [--quick] [--repeats N]
[--vocab 32000 128000] [--device cpu|cuda]``. Prints one JSON line per vocabulary size (CPU:
batch 8, sequence 1024, fp32 logits; CUDA: see ``_logprobs_cuda.py``, batch 4, sequence
4096, vocabulary 151,936, bf16 logits, every variant side by side incl. the Triton kernel).

Variants (``correction_rl.learner.logprobs``):

* ``naive``: ``log_softmax(logits).gather(...)`` (``naive_sequence_logprobs``);
* ``chunked``: ``sequence_logprobs`` with ``inplace_backward=True``, what ``score_pairs`` uses;
* ``chunked_out_of_place``: ``sequence_logprobs`` with ``inplace_backward=False``.

What is counted: each (variant, repeat) runs in a fresh subprocess. The process imports torch,
runs a small warm-up, allocates the ``[8, 1024, V]`` fp32 logits (a leaf that requires grad) and
the labels, then resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, which
resets ``VmHWM``) and reads ``VmRSS`` as the baseline. It then runs forward + ``backward()``;
``peak_bytes = VmHWM - baseline``: every byte touched during forward and backward, *including* the
gradient of the logits (``logits.grad``), excluding the logits themselves. ``memory_ratio`` =
median peak chunked / median peak naive; ``time_ratio`` the same for the CPU seconds
(``time.process_time``) of forward + backward, with ``--threads 1`` by default: on the project's
shared 2-core machines the wall time of multi-threaded runs mostly measures OpenMP threads waiting
for a descheduled sibling. Wall-clock ratios are printed too (``wall_time_ratio*``). Each subprocess gets an address-space limit below the machine's available
memory, so a variant that cannot fit fails cleanly (reported as ``"error"``) instead of waking the
OOM killer on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _logprobs_cuda import add_cuda_arguments, run_cuda  # noqa: E402

VARIANTS = ("naive", "chunked", "chunked_out_of_place")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(variant: str, batch: int, seq: int, vocab: int, chunk: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(threads)
    from correction_rl.learner.logprobs import naive_sequence_logprobs, sequence_logprobs

    def run(logits, ids, mask):
        if variant == "naive":
            out = naive_sequence_logprobs(logits, ids, mask)
        else:
            out = sequence_logprobs(logits, ids, mask, chunk, inplace_backward=variant == "chunked")
        out.sum().backward()

    torch.manual_seed(0)
    small = torch.randn(2, 8, 64, requires_grad=True)
    run(small, torch.randint(0, 64, (2, 8)), torch.ones(2, 8, dtype=torch.long))  # lazy init
    logits = torch.empty(batch, seq, vocab).normal_().requires_grad_()
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.zeros(batch, seq, dtype=torch.long)
    mask[:, seq // 8 :] = 1  # a prompt of seq/8 tokens, then the response
    Path("/proc/self/clear_refs").write_text("5")
    baseline_kb = _status_kb("VmRSS")
    cpu, wall = time.process_time(), time.perf_counter()
    run(logits, ids, mask)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak_kb = _status_kb("VmHWM")
    assert logits.grad is not None and logits.grad.shape == logits.shape
    return {"peak_bytes": (peak_kb - baseline_kb) * 1024, "seconds": cpu, "wall_seconds": wall}


def spawn(variant: str, args, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--vocab", str(vocab), "--batch", str(args.batch),
           "--seq", str(args.seq), "--chunk", str(args.chunk), "--threads", str(args.threads)]
    limit = _available_bytes() - (1 << 30)

    def cap():  # address-space cap: fail with MemoryError rather than OOM-kill a neighbour
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"{variant} failed (limit {limit / 2**30:.1f} GiB): {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def measure(args, vocab: int) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    errors = []
    for _ in range(args.repeats):
        for variant in VARIANTS:  # interleaved, so background load hits every variant alike
            result = spawn(variant, args, vocab)
            if "error" in result:
                errors.append(result["error"])
            else:
                runs[variant].append(result)
    med = {
        v: {k: statistics.median(r[k] for r in rs) for k in ("peak_bytes", "seconds", "wall_seconds")}
        for v, rs in runs.items()
        if rs
    }
    line = {"bench": "logprobs", "vocab": vocab, "batch": args.batch, "seq": args.seq,
            "chunk_size": args.chunk, "repeats": args.repeats, "threads": args.threads,
            "logits_bytes": args.batch * args.seq * vocab * 4}
    if "naive" in med and "chunked" in med:
        line["memory_ratio"] = round(med["chunked"]["peak_bytes"] / med["naive"]["peak_bytes"], 3)
        line["time_ratio"] = round(med["chunked"]["seconds"] / med["naive"]["seconds"], 3)
        line["wall_time_ratio"] = round(med["chunked"]["wall_seconds"] / med["naive"]["wall_seconds"], 3)
    if "naive" in med and "chunked_out_of_place" in med:
        line["memory_ratio_out_of_place"] = round(
            med["chunked_out_of_place"]["peak_bytes"] / med["naive"]["peak_bytes"], 3
        )
        line["time_ratio_out_of_place"] = round(
            med["chunked_out_of_place"]["seconds"] / med["naive"]["seconds"], 3
        )
    for v, m in med.items():
        line[f"{v}_peak_gb"] = round(m["peak_bytes"] / 1e9, 3)
        line[f"{v}_cpu_s"] = round(m["seconds"], 3)
    if errors:
        line["error"] = sorted(set(errors))
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, sequence 256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, nargs="+", help="default 32000 128000 (cpu), 151936 (cuda)")
    parser.add_argument("--batch", type=int, help="default 8 (cpu), 4 (cuda)")
    parser.add_argument("--seq", type=int, help="default 1024 (cpu), 4096 (cuda)")
    parser.add_argument("--chunk", type=int, default=256, help="objective.logprob_chunk_size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    add_cuda_arguments(parser)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.vocab = args.vocab or ([151_936] if cuda else [32000, 128000])
    args.batch = args.batch or (4 if cuda else 8)
    args.seq = args.seq or (4096 if cuda else 1024)
    if cuda:
        run_cuda(args)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.vocab[0], args.chunk, args.threads)))
        return
    if args.quick:
        args.batch, args.seq = 2, 256
    for vocab in args.vocab:
        print(json.dumps(measure(args, vocab)), flush=True)


if __name__ == "__main__":
    main()
