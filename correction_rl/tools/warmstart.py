"""Warm start: supervised training of a tiny model until it is right on 20-60% of held-out prompts.

Correction optimization needs a starting policy that is wrong often, but not always: a random
model is never right (every correction rewrites the whole answer), a converged one never needs
correcting. So training stops at the first check (every ``eval_every`` steps) whose held-out
greedy accuracy lies in [aim, high] (30-60% by default, inside the 20-60% band); if one interval
jumps over the band, training returns to the last check and retries with checks four times as
often. ``--target-accuracy``
instead trains until a minimum accuracy (a stronger model of the same family, later used as an
LLM teacher). Plain torch AdamW with teacher forcing; the loss covers answer tokens and
``<eos>`` only, so the model learns to answer, not to write prompts.

Several tasks (``--task reverse sorting``): one policy learns all of them from batches that
interleave the tasks, and the stopping rule reads the *mean* of the per-task accuracies (each
one is recorded). This is the starting policy of the regularization experiment
(docs/results.md): corrections on one task, accuracy kept on the other.

The result is a standard Hugging Face directory (model + the project's tokenizer) that
transformers and vLLM load, with ``warmstart.json`` recording accuracy, steps and time.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from correction_rl.errors import UserError
from correction_rl.tasks import Task, TaskError, get_task, parse_difficulty
from correction_rl.types import Prompt, Sampling


@dataclass(frozen=True)
class WarmStartConfig:
    """What to train (task, knobs, model size, seed) and when to stop (band / aim / target)."""

    task: str = "addition"
    difficulty: dict[str, int] = field(default_factory=dict)
    extra_tasks: tuple[str, ...] = ()
    """More tasks the same policy learns (batches interleave all tasks; the stopping rule uses
    the mean held-out accuracy). ``difficulty`` knobs go to every task that has them, or to one
    task when scoped (``addition.max_digits``)."""
    size: str = "tiny"
    seed: int = 0
    band: tuple[float, float] = (0.2, 0.6)
    """Accuracies [low, high] a starting policy may have; above ``high`` a check is undone."""
    aim: float = 0.3
    """Stop at the first check with aim <= accuracy <= high. Aiming above ``low`` keeps the
    result inside the band despite the sampling noise of a 200-prompt estimate (+-0.03)."""
    target_accuracy: float | None = None
    """If set, ignore ``band`` and stop once accuracy >= this (stronger / teacher models)."""
    max_steps: int = 20000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    eval_every: int = 100
    num_eval: int = 200
    """Held-out prompts checked at every evaluation (greedy decoding)."""
    time_limit_s: float = 3600.0
    threads: int = 1
    """torch intra-op threads while training: tiny models are dominated by per-op overhead, and
    on a shared 2-core machine one thread measured ~6x faster per step than two (docs/tasks.md)."""


@dataclass
class WarmStartResult:
    """What ``warmstart.json`` records next to the saved model."""

    task: str
    size: str
    seed: int
    reached: bool
    """Whether the band (or the target accuracy) was reached before the step / time limit."""
    accuracy: float
    """Held-out greedy accuracy of the saved model (checker-based; the mean over tasks)."""
    steps: int
    seconds: float
    """Wall-clock training + evaluation time (on a shared CPU this includes contention)."""
    history: list[tuple[int, float]]
    """(step, held-out accuracy) at every check."""
    num_parameters: int
    config: dict
    accuracy_by_task: dict[str, float] = field(default_factory=dict)
    """Held-out greedy accuracy of the saved model on each task."""


def greedy_accuracy(generator, task: Task, prompts: Sequence[Prompt], max_new_tokens: int) -> float:
    """Fraction of ``prompts`` whose greedy response the task's checker accepts."""
    rollouts = generator.generate(prompts, Sampling(max_new_tokens=max_new_tokens, temperature=0.0))
    return sum(task.check(r.prompt, r.response_text) for r in rollouts) / len(rollouts)


def _check(model, generator, held_out: dict[str, tuple[Task, list[Prompt]]], max_new_tokens: int
           ) -> dict[str, float]:
    """Greedy held-out accuracy per task."""
    model.eval()
    try:
        return {name: greedy_accuracy(generator, task, prompts, max_new_tokens)
                for name, (task, prompts) in held_out.items()}
    finally:
        model.train()


def _interleave(streams: list) -> "itertools.chain":
    """One prompt of each task in turn (a single task: its own stream)."""
    return itertools.chain.from_iterable(zip(*streams)) if len(streams) > 1 else streams[0]


def _batch(prompts: Sequence[Prompt], table: dict[str, int]):
    """Right-padded ``<bos> x y <eos>`` rows with labels on ``y <eos>`` only."""
    import torch

    rows, labels = [], []
    for p in prompts:
        x = [table["<bos>"]] + [table[c] for c in p.text]
        y = [table[c] for c in p.answer] + [table["<eos>"]]
        rows.append(x + y)
        labels.append([-100] * len(x) + y)
    width = max(map(len, rows))
    pad = table["<pad>"]
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, (ids != pad).long(), lab


def train(cfg: WarmStartConfig, log=None):
    """Train until the stopping rule holds; returns (model, tokenizer, WarmStartResult)."""
    import torch

    log = log or (lambda line: print(line, flush=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: WarmStartConfig, log):
    import torch

    from correction_rl.models import build_model, build_tokenizer, count_parameters, vocab
    from correction_rl.rollout.hf import HFGenerator
    from correction_rl.tasks.registry import knobs_for, make_prompts

    names = [cfg.task, *cfg.extra_tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"warmstart: a task is named twice in {names}")
    make_prompts(names, cfg.difficulty, 1, "eval", cfg.seed)  # unknown tasks / knobs fail here, named
    tasks = {n: get_task(n, **knobs_for(n, cfg.difficulty)) for n in names}
    torch.manual_seed(cfg.seed)
    model, tokenizer, table = build_model(cfg.size, cfg.seed), build_tokenizer(), vocab()
    held_out = {n: (t, t.generate(cfg.num_eval, "eval", cfg.seed)) for n, t in tasks.items()}
    max_new = max(len(p.answer) for _, prompts in held_out.values() for p in prompts) + 2
    data = _interleave([t.stream("train", cfg.seed) for t in tasks.values()])
    generator = HFGenerator(model, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps))
    )
    low, high = cfg.band
    eval_every, step, history, accuracy, reached = cfg.eval_every, 0, [], 0.0, False
    by_task: dict[str, float] = {}
    snapshot = _snapshot(model, opt, sched, step)
    start = time.perf_counter()
    model.train()
    while step < cfg.max_steps and time.perf_counter() - start < cfg.time_limit_s:
        ids, mask, labels = _batch(list(itertools.islice(data, cfg.batch_size)), table)
        loss = _sft_step(model, opt, sched, ids, mask, labels)
        step += 1
        if step % eval_every:
            continue
        by_task = _check(model, generator, held_out, max_new)
        accuracy = sum(by_task.values()) / len(by_task)
        history.append((step, accuracy))
        per_task = "" if len(by_task) == 1 else " (" + ", ".join(f"{k} {v:.3f}" for k, v in by_task.items()) + ")"
        log(f"step {step}: loss {loss:.3f} held-out accuracy {accuracy:.3f}{per_task}")
        if cfg.target_accuracy is not None:
            if accuracy >= cfg.target_accuracy:
                reached = True
                break
        elif max(low, cfg.aim) <= accuracy <= high:
            break
        elif accuracy > high and eval_every > 1:
            # Jumped over the band: go back to the last check and look more often.
            step = _restore(model, opt, sched, snapshot)
            eval_every = max(1, eval_every // 4)
            log(f"overshot the band; back to step {step}, checking every {eval_every} steps")
            continue
        elif accuracy > high:
            break  # over the band even checking every step: reported as not reached
        snapshot = _snapshot(model, opt, sched, step)
    seconds = time.perf_counter() - start
    if not history or history[-1][0] != step:
        by_task = _check(model, generator, held_out, max_new)
        accuracy = sum(by_task.values()) / len(by_task)
        history.append((step, accuracy))
    if cfg.target_accuracy is None:
        reached = low <= accuracy <= high
    result = WarmStartResult(
        task=cfg.task,
        size=cfg.size,
        seed=cfg.seed,
        reached=reached,
        accuracy=accuracy,
        steps=step,
        seconds=round(seconds, 2),
        history=history,
        num_parameters=count_parameters(model),
        config={**asdict(cfg), "knobs": {n: asdict(t.knobs) for n, t in tasks.items()} if cfg.extra_tasks
                else asdict(tasks[cfg.task].knobs)},
        accuracy_by_task=by_task,
    )
    return model.eval(), tokenizer, result


def sft_chat(model, examples, *, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
             threads: int = 1, warmup_steps: int = 20, log=None) -> float:
    """Supervised training of any causal LM on pre-tokenized ``(prompt_ids, answer_ids)`` pairs
    (loss on the answer ids only, which end with the stop token): the warm start of the BPE chat
    models, whose prompts are rendered by a chat template rather than written character by
    character (``_batch``). Batches are drawn with replacement from ``examples`` by ``seed``;
    returns the last loss. Used by ``tools/freeform.py`` (docs/models.md)."""
    import random

    import torch

    log = log or (lambda line: print(line, flush=True))
    rng, old_threads = random.Random(seed), torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    pad = model.config.pad_token_id or 0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    model.train()
    loss_value = float("nan")
    try:
        for step in range(1, steps + 1):
            batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
            width = max(len(x) + len(y) for x, y in batch)
            ids = torch.tensor([x + y + [pad] * (width - len(x) - len(y)) for x, y in batch])
            labels = torch.tensor([[-100] * len(x) + y + [-100] * (width - len(x) - len(y)) for x, y in batch])
            mask = torch.tensor([[1] * (len(x) + len(y)) + [0] * (width - len(x) - len(y)) for x, y in batch])
            loss_value = _sft_step(model, opt, sched, ids, mask, labels)
            if step % 50 == 0 or step == steps:
                log(f"step {step}: loss {loss_value:.3f}")
    finally:
        torch.set_num_threads(old_threads)
    return loss_value


def _sft_step(model, opt, sched, ids, mask, labels) -> float:
    """One clipped AdamW step on the next-token loss of the unmasked labels; returns the loss."""
    import torch

    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def _snapshot(model, opt, sched, step: int):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
            copy.deepcopy(sched.state_dict()), step)


def _restore(model, opt, sched, snapshot) -> int:
    model.load_state_dict(snapshot[0])
    opt.load_state_dict(snapshot[1])
    sched.load_state_dict(snapshot[2])
    return snapshot[3]


def save(model, tokenizer, result: WarmStartResult, out: str | Path) -> Path:
    """Write the HF directory plus ``correction_rl.json`` (size/seed) and ``warmstart.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "correction_rl.json").write_text(
        json.dumps({"size": result.size, "seed": result.seed, "task": result.task,
                    "tasks": [result.task, *result.config.get("extra_tasks", [])]}) + "\n"
    )
    (out / "warmstart.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return out


def warm_start(cfg: WarmStartConfig, out: str | Path, log=None) -> WarmStartResult:
    """Train (``train``) and save (``save``); ``log`` gets one line per check (default: stdout)."""
    model, tokenizer, result = train(cfg, log=log)
    save(model, tokenizer, result, out)
    return result


def cli(argv: list[str]) -> int:
    """``correction-rl warmstart --task addition --out DIR [--size tiny] [--seed 0] ...``"""
    p = argparse.ArgumentParser(prog="correction-rl warmstart", description=__doc__.split("\n")[0])
    d = WarmStartConfig()
    p.add_argument("--task", nargs="+", default=[d.task],
                   help="one task, or several for one policy that learns them all (mean accuracy stops it)")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--size", default=d.size, choices=["tiny", "base", "small"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--band", type=float, nargs=2, default=list(d.band), metavar=("LOW", "HIGH"))
    p.add_argument("--aim", type=float, default=d.aim,
                   help="stop at the first check with accuracy in [aim, HIGH]")
    p.add_argument("--target-accuracy", type=float, default=None,
                   help="train until held-out accuracy >= this instead of stopping in the band")
    p.add_argument("--difficulty", nargs="*", default=[], metavar="KNOB=INT")
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--num-eval", type=int, default=d.num_eval)
    p.add_argument("--time-limit", type=float, default=d.time_limit_s, help="seconds")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    a = p.parse_args(argv)
    cfg = WarmStartConfig(
        task=a.task[0], extra_tasks=tuple(a.task[1:]), difficulty=parse_difficulty(a.difficulty), size=a.size, seed=a.seed,
        band=tuple(a.band), aim=a.aim, target_accuracy=a.target_accuracy, max_steps=a.max_steps,
        batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every, num_eval=a.num_eval,
        time_limit_s=a.time_limit, threads=a.threads,
    )
    try:
        result = warm_start(cfg, a.out)
    except (ValueError, TaskError) as exc:  # a bad task / knob / duplicate: one error line
        raise UserError(f"warmstart: {exc}") from None
    print(json.dumps({k: v for k, v in asdict(result).items() if k not in ("history", "config")}))
    return 0 if result.reached else 1


if __name__ == "__main__":
    raise SystemExit(cli(__import__("sys").argv[1:]))
