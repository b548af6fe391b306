"""DeepSpeed learner step vs plain torch step on the same micro-batch.

Prints one JSON line per ZeRO stage with ``ratio`` = median DeepSpeed step seconds / median torch
step seconds (target <= 1.1), timing both learners interleaved in one process so machine noise
hits both alike. Usage: ``python benchmarks/bench_learner.py [--size tiny|small] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
from correction_rl.learner.learner import Learner
from correction_rl.models import PAD, build_model, vocab
from correction_rl.types import CorrectionPair


def synthetic_pairs(n: int, prompt_len: int, response_len: int, seed: int) -> list[CorrectionPair]:
    """Pairs shaped like the tasks' (x, y, y'): y' differs from y in the last third."""
    rng = random.Random(seed)
    table = vocab()
    alphabet = list(range(4, len(table)))
    pairs = []
    for i in range(n):
        prompt = [table["<bos>"]] + rng.choices(alphabet, k=prompt_len - 1)
        rejected = rng.choices(alphabet, k=response_len - 1) + [table["<eos>"]]
        cut = 2 * response_len // 3
        chosen = rejected[:cut] + rng.choices(alphabet, k=response_len - 1 - cut) + [table["<eos>"]]
        pairs.append(CorrectionPair(str(i), prompt, rejected, chosen, 0, "bench", 0))
    return pairs


def make_learner(size: str, backend: str, stage: int) -> Learner:
    return Learner(
        build_model(size, seed=0),
        pad_id=vocab()[PAD],
        learner_cfg=LearnerConfig(backend=backend, zero_stage=stage, lr=1e-4, micro_batch_pairs=16),
        objective_cfg=ObjectiveConfig(form="logistic", shared_prefix="off"),
        model_cfg=ModelConfig(),
        total_steps=10**6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "base", "small"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stages", type=int, nargs="*", default=[0, 1, 2])
    args = parser.parse_args()
    pairs = synthetic_pairs(16, prompt_len=24, response_len=24, seed=0)
    reference = make_learner(args.size, "torch", 0)
    for stage in args.stages:
        ds = make_learner(args.size, "deepspeed", stage)
        times = {"torch": [], "deepspeed": []}
        for rep in range(args.repeats + 2):  # 2 warm-up rounds
            for name, learner in (("torch", reference), ("deepspeed", ds)):
                start = time.perf_counter()
                learner.train_step(pairs)
                if rep >= 2:
                    times[name].append(time.perf_counter() - start)
        t_torch, t_ds = statistics.median(times["torch"]), statistics.median(times["deepspeed"])
        print(json.dumps({
            "bench": "learner", "size": args.size, "zero_stage": stage, "pairs": len(pairs),
            "torch_step_s": round(t_torch, 4), "deepspeed_step_s": round(t_ds, 4),
            "ratio": round(t_ds / t_torch, 3), "target": 1.1, "repeats": args.repeats,
        }), flush=True)


if __name__ == "__main__":
    main()
