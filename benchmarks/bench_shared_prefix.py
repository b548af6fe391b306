"""Shared-prefix forward+backward vs the naive ``[chosen; rejected]`` forward (time).

Run from the repo root: ``python benchmarks/bench_shared_prefix.py [--quick] [--repeats N]``.
Prints one JSON line per shared fraction f (0, 0.5, 0.9): the share of the response that y and y'
have in common. Each pair has a prompt of ``--prompt`` tokens and two responses of ``--response``
tokens; y' = y[:f * response] + a different random tail. One measurement = ``score_pairs`` +
``correction_loss`` (logistic) + ``backward`` on the "small" model (models.SHAPES), in train mode.
Variants are interleaved within each repeat (so load from other processes hits both alike) and
the medians are compared. Times are the process's CPU seconds (``time.process_time``) with
``--threads 1`` by default: on the project's shared 2-core machines, wall time of a 2-thread run
mostly measures OpenMP threads spin-waiting for a descheduled sibling (ratios moved by +-20%
between identical variants); one thread's CPU time is the work done. Wall-clock ratios are
printed too (``wall_time_ratio*``).

* ``time_ratio``: forced shared-prefix forward (``shared_prefix: on``) / naive (``off``);
* ``time_ratio_auto``: what the learner does under ``shared_prefix: auto`` / naive;
* ``cost_ratio_estimate``: the padded-token estimate the ``auto`` rule thresholds.

``--device cuda`` (default model ``0.5b``, a locally built random Llama of ~0.47B parameters from
``_common.LLAMA_SHAPES``, bf16, 16 pairs of 64 + 448 tokens): times are synchronised wall seconds
(``time_ratio*`` are then wall ratios; the CPU-seconds fields are left out) and each mode adds
its CUDA peak memory beyond the model (``{off,on,auto}_peak_gb``).

``--checkpointing`` adds a fourth variant, ``ckpt``: the naive forward with HF gradient
checkpointing on (the shared-prefix forward needs the KV cache, which HF turns off under
checkpointing, so ``shared_prefix: on`` refuses it and ``auto`` falls back to naive). It reports
``ckpt_time_ratio`` (ckpt / naive), ``shared_vs_ckpt_time`` (shared prefix / ckpt) and, for every
variant, ``{mode}_saved_mb``: the activation bytes autograd holds for the backward at the end of
the forward (the tensors packed by ``saved_tensors_hooks``, parameters excluded, each storage
once), which is what checkpointing trades time for, on CPU and CUDA alike.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from correction_rl.learner.collate import collate_pairs  # noqa: E402
from correction_rl.config import ObjectiveConfig  # noqa: E402
from correction_rl.models import build_model  # noqa: E402
from correction_rl.learner.objectives import correction_loss  # noqa: E402
from correction_rl.learner.shared_prefix import score_pairs, shared_prefix_cost_ratio, use_shared_prefix  # noqa: E402
from correction_rl.types import CorrectionPair  # noqa: E402
from _common import (LLAMA_SHAPES, add_device_argument, build_llama, check_device,  # noqa: E402
                     cuda_peak_bytes, device_info, sync)


def make_pairs(num_pairs: int, prompt: int, response: int, fraction: float, vocab: int, seed: int):
    rng = random.Random(seed)
    shared = int(round(fraction * response))
    pairs = []
    for i in range(num_pairs):
        prompt_ids = [1] + [rng.randrange(4, vocab) for _ in range(prompt - 1)]
        y = [rng.randrange(4, vocab) for _ in range(response)]
        tail = [rng.randrange(4, vocab) for _ in range(response - shared)]
        if tail and tail[0] == y[shared]:
            tail[0] = 4 + (tail[0] - 3) % (vocab - 4)  # make sure they diverge at `shared`
        y_prime = y[:shared] + tail
        pairs.append(CorrectionPair(str(i), prompt_ids, y, y_prime, 0, "bench", len(tail)))
    return pairs


def step_seconds(model, batch, cfg: ObjectiveConfig, device: str = "cpu") -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one forward + loss + backward (synchronised on CUDA)."""
    model.zero_grad(set_to_none=True)
    sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    scores = score_pairs(model, batch, cfg)
    out = correction_loss(scores, None, None, cfg, batch.noop)
    out.loss.backward()
    sync(device)
    return time.process_time() - cpu, time.perf_counter() - wall


def saved_activation_bytes(model, batch, cfg: ObjectiveConfig) -> int:
    """Bytes autograd holds for the backward after one forward + loss (parameters excluded).

    Counted through ``torch.autograd.graph.saved_tensors_hooks``: every tensor packed for the
    backward, each storage once. Under non-reentrant checkpointing HF's own hooks take over
    inside the checkpointed layers, so what they drop is (rightly) not counted.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            held[storage.data_ptr()] = max(held.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = correction_loss(score_pairs(model, batch, cfg), None, None, cfg, batch.noop)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(held.values())


class Checkpointed:
    """Runs a step with HF gradient checkpointing on, and turns it off again afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.gradient_checkpointing_enable()

    def __exit__(self, *exc):
        self.model.gradient_checkpointing_disable()


def build(args):
    """The model under test: the project's char-level sizes on CPU, a ~0.5B/1B Llama on CUDA."""
    if args.device == "cuda":
        import torch as _torch

        size = args.size or "0.5b"
        model = build_llama(size, "cuda").to(_torch.bfloat16) if size in LLAMA_SHAPES else build_model(size).cuda()
        return size, model
    size = args.size or ("tiny" if args.quick else "small")
    return size, build_model(size)


def to_device(batch, device: str):
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.to(device))
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short sequences")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--response", type=int, default=240)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    parser.add_argument("--size", help="tiny|base|small (cpu default small; tiny with --quick); 0.5b|1b (cuda default 0.5b)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also measure the naive forward under gradient checkpointing (mode 'ckpt')")
    add_device_argument(parser)
    args = parser.parse_args()
    check_device(args.device)
    cuda = args.device == "cuda"
    torch.set_num_threads(args.threads)
    if cuda and "--pairs" not in sys.argv[1:]:
        args.pairs, args.prompt, args.response = 16, 64, 448
    if args.quick:
        args.repeats, args.pairs, args.response = min(args.repeats, 3), 4, min(args.response, 48)
    torch.manual_seed(0)
    size, model = build(args)
    model.train()
    vocab = model.config.vocab_size
    for fraction in args.fractions:
        pairs = make_pairs(args.pairs, args.prompt, args.response, fraction, vocab, seed=1)
        batch, _ = collate_pairs(pairs, pad_id=0, max_seq_len=args.prompt + args.response, truncation="drop")
        batch = to_device(batch, args.device)
        cfgs = {mode: ObjectiveConfig(form="logistic", shared_prefix=mode) for mode in ("off", "on", "auto")}
        if args.checkpointing:
            cfgs["ckpt"] = ObjectiveConfig(form="logistic", shared_prefix="auto")

        def measure(mode: str) -> tuple[float, float]:
            if mode != "ckpt":
                return step_seconds(model, batch, cfgs[mode], args.device)
            with Checkpointed(model):
                return step_seconds(model, batch, cfgs[mode], args.device)

        for mode in cfgs:  # warm-up (allocator, lazy init)
            measure(mode)
        times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in cfgs}
        order = list(cfgs)
        for repeat in range(args.repeats):
            shift = repeat % len(order)
            for mode in order[shift:] + order[:shift]:  # rotate: no variant always last
                times[mode].append(measure(mode))
        wall = {mode: statistics.median(w for _, w in t) for mode, t in times.items()}
        med = wall if cuda else {mode: statistics.median(c for c, _ in t) for mode, t in times.items()}
        extra = {}
        if cuda:
            for mode, cfg in cfgs.items():
                model.zero_grad(set_to_none=True)  # the peak beyond model + inputs, grads included
                peak = cuda_peak_bytes(lambda: step_seconds(model, batch, cfg, "cuda"))
                extra[f"{mode}_peak_gb"] = round(peak / 1e9, 3)
                extra[f"{mode}_s"] = round(wall[mode], 4)
            model.zero_grad(set_to_none=True)
        if args.checkpointing:
            for mode, cfg in cfgs.items():
                if mode == "ckpt":
                    with Checkpointed(model):
                        saved = saved_activation_bytes(model, batch, cfg)
                else:
                    saved = saved_activation_bytes(model, batch, cfg)
                extra[f"{mode}_saved_mb"] = round(saved / 1e6, 2)
            extra["ckpt_time_ratio"] = round(med["ckpt"] / med["off"], 3)
            extra["shared_vs_ckpt_time"] = round(med["on"] / med["ckpt"], 3)
            extra["ckpt_cpu_s" if not cuda else "ckpt_s"] = round(med["ckpt"], 4)
        cpu_fields = {} if cuda else {"naive_cpu_s": round(med["off"], 4), "shared_cpu_s": round(med["on"], 4),
                                      "auto_cpu_s": round(med["auto"], 4)}
        print(
            json.dumps(
                {
                    "bench": "shared_prefix",
                    **device_info(args.device),
                    "model": size,
                    "shared_fraction": fraction,
                    "time_ratio": round(med["on"] / med["off"], 3),
                    "time_ratio_auto": round(med["auto"] / med["off"], 3),
                    "auto_uses_shared_prefix": use_shared_prefix(model, batch, cfgs["auto"]),
                    "cost_ratio_estimate": round(shared_prefix_cost_ratio(batch), 3),
                    "wall_time_ratio": round(wall["on"] / wall["off"], 3),
                    "wall_time_ratio_auto": round(wall["auto"] / wall["off"], 3),
                    **cpu_fields,
                    **extra,
                    "repeats": args.repeats,
                    "pairs": args.pairs,
                    "prompt_len": args.prompt,
                    "response_len": args.response,
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
