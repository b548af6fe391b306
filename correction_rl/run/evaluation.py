"""Held-out evaluation: how much correction does the policy still need?

For greedy and for sampled decoding, on held-out prompts: accuracy (the task's checker),
exact-match accuracy (y equals the canonical answer), the correction rate (fraction of accepted
corrections with y' != y), the mean token edit distance between y and y' (the amount of
correction), the mean normalized edit distance, and on sampled responses an estimate of
KL(pi || pi_init), the drift from the starting policy that makes objectives comparable. The
training loop calls ``evaluate`` periodically; ``correction-rl eval`` wraps it (``cli``).

``evaluate`` depends only on the ``Generator`` and ``Teacher`` protocols, so every engine and
every teacher can be evaluated the same way. The metric arithmetic is the pure function
``compute_metrics`` (tested on hand-made corrections against hand-computed numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from correction_rl.edits import edit_distance, normalized_edit_distance
from correction_rl.prompts.render import PromptRenderer, RendersPrompts
from correction_rl.tasks import TASKS, get_task
from correction_rl.types import Correction, Prompt, Rollout, Sampling

Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class EvalMetrics:
    """Metrics of one decoding mode over a set of prompts (None: not measurable here)."""

    num_prompts: int
    accuracy: float | None
    """Fraction the task's checker accepts (prompts of registered tasks only)."""
    exact_match: float | None
    """Fraction with y == the prompt's canonical answer (prompts that carry one)."""
    correction_rate: float | None
    """Fraction of accepted corrections with y' != y."""
    mean_edit_distance: float | None
    """Mean token Levenshtein distance between y and y' over accepted corrections (0 for y' == y)."""
    mean_normalized_edit_distance: float | None
    """Mean of distance / max(len y, len y') in tokens, over accepted corrections."""
    rejection_rate: float
    """Fraction of rollouts the teacher returned no y' for."""
    mean_response_tokens: float
    truncated_rate: float
    """Fraction of responses cut at ``max_new_tokens`` (finish_reason == "length")."""
    kl: float | None = None
    """Mean over samples of log pi(y|x) - log pi_init(y|x): a Monte-Carlo estimate of
    KL(pi || pi_init), unbiased when y was sampled from pi at temperature 1 and top_p 1."""
    kl_stderr: float | None = None
    """Standard error of ``kl`` (sample std / sqrt(n))."""


@dataclass
class EvalReport:
    """``modes[mode]`` is the overall result, ``by_task[mode][task]`` the per-task ones."""

    modes: dict[str, EvalMetrics] = field(default_factory=dict)
    by_task: dict[str, dict[str, EvalMetrics]] = field(default_factory=dict)
    policy_version: int | None = None

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat ``{"eval/greedy/accuracy": ...}`` for metric sinks (None values left out)."""
        out: dict[str, float] = {}
        for mode, metrics in self.modes.items():
            for key, value in dataclasses.asdict(metrics).items():
                if value is not None:
                    out[f"{prefix}{mode}/{key}"] = float(value)
            for task, per_task in self.by_task.get(mode, {}).items():
                for key, value in dataclasses.asdict(per_task).items():
                    if value is not None:
                        out[f"{prefix}{mode}/{task}/{key}"] = float(value)
        return out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A readable fixed-width table: one row per mode and task."""
        cols = [("mode", 8), ("task", 10), ("n", 5), ("acc", 6), ("exact", 6), ("corr", 6),
                ("edit", 6), ("n.edit", 6), ("reject", 6), ("len", 5), ("KL", 8)]
        lines = ["  ".join(f"{name:>{w}}" for name, w in cols)]
        for mode, metrics in self.modes.items():
            rows = [("all", metrics)] + sorted(self.by_task.get(mode, {}).items())
            if len(rows) == 2:
                rows = rows[:1]  # one task: its row equals the overall one
            for task, m in rows:
                cells = [mode, task, m.num_prompts, m.accuracy, m.exact_match, m.correction_rate,
                         m.mean_edit_distance, m.mean_normalized_edit_distance, m.rejection_rate,
                         m.mean_response_tokens, m.kl]
                lines.append("  ".join(_cell(v, w) for v, (_, w) in zip(cells, cols)))
        return "\n".join(lines)


def _cell(value, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.3f}"
    return f"{value:>{width}}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compute_metrics(
    corrections: Sequence[Correction],
    tokenize: Tokenize | None = None,
    kl_terms: Sequence[float] | None = None,
) -> EvalMetrics:
    """The metrics of one mode from the teacher's corrections (pure).

    ``tokenize`` maps a text to token ids (without special tokens); None counts characters,
    which is the same thing for the project's character tokenizer. ``kl_terms`` are the
    per-sample log pi(y|x) - log pi_init(y|x).
    """
    tokenize = tokenize or list
    n = len(corrections)
    if n == 0:
        raise ValueError("compute_metrics: no corrections to evaluate")
    checked, exact, changed, dist, norm = [], [], [], [], []
    tasks = {}
    for c in corrections:
        prompt, y = c.rollout.prompt, c.rollout.response_text
        if prompt.task in TASKS:
            task = tasks.setdefault(prompt.task, get_task(prompt.task))
            checked.append(task.check(prompt, y))
        if prompt.answer is not None:
            exact.append(y == prompt.answer)
        if c.corrected_text is not None:
            y_ids, fixed_ids = tokenize(y), tokenize(c.corrected_text)
            changed.append(c.corrected_text != y)
            dist.append(edit_distance(y_ids, fixed_ids))
            norm.append(normalized_edit_distance(y_ids, fixed_ids))
    kl = kl_stderr = None
    if kl_terms:
        kl = sum(kl_terms) / len(kl_terms)
        if len(kl_terms) > 1:
            var = sum((t - kl) ** 2 for t in kl_terms) / (len(kl_terms) - 1)
            kl_stderr = (var / len(kl_terms)) ** 0.5
    return EvalMetrics(
        num_prompts=n,
        accuracy=_mean(checked),
        exact_match=_mean(exact),
        correction_rate=_mean(changed),
        mean_edit_distance=_mean(dist),
        mean_normalized_edit_distance=_mean(norm),
        rejection_rate=sum(not c.accepted for c in corrections) / n,
        mean_response_tokens=sum(len(c.rollout.response_ids) for c in corrections) / n,
        truncated_rate=sum(c.rollout.finish_reason == "length" for c in corrections) / n,
        kl=kl,
        kl_stderr=kl_stderr,
    )


def score_responses(model, tokenizer, rollouts: Sequence[Rollout], batch_size: int = 64,
                    renderer: PromptRenderer | None = None) -> list[float]:
    """log P_model(y <stop>|x) per rollout (``<stop>``, the stop token the policy produced, only
    when the response stopped on it).

    The prompt is rendered by ``renderer`` (the engine's: its chat template and system prompt;
    default: the tokenizer's own template, else the plain text) and the response re-tokenized
    from text with ``tokenizer``, so two different models are scored on exactly the same token
    sequence.
    """
    import torch

    from correction_rl.learner.logprobs import sequence_logprobs

    out: list[float] = []
    renderer = renderer or PromptRenderer.build(tokenizer)
    pad, eos = tokenizer.pad_token_id, renderer.eos_id
    with torch.no_grad():
        for start in range(0, len(rollouts), batch_size):
            rows, masks = [], []
            for r in rollouts[start : start + batch_size]:
                x = renderer.ids(r.prompt)
                y = tokenizer(r.response_text, add_special_tokens=False)["input_ids"]
                stop = r.stop_id if r.stop_id is not None else eos
                y = y + ([stop] if r.finish_reason == "stop" else [])
                rows.append(x + y)
                masks.append([0] * len(x) + [1] * len(y))
            width = max(map(len, rows))
            device = next(model.parameters()).device  # the learner's model may sit on a GPU
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
            attention = torch.tensor(
                [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device
            )
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
            out.extend(sequence_logprobs(logits, ids, mask).tolist())
    return out


def evaluate(
    generator,
    prompts: Sequence[Prompt],
    teacher,
    sampling: Sampling,
    *,
    policy_model=None,
    init_model=None,
    tokenizer=None,
    modes: Sequence[str] = ("greedy", "sampled"),
    renderer: PromptRenderer | None = None,
) -> EvalReport:
    """Generate with each mode, correct with ``teacher``, and measure.

    ``sampling`` gives ``max_new_tokens`` and, for the ``sampled`` mode, temperature / top_p /
    seed (``greedy`` forces temperature 0). KL(pi || pi_init) is estimated on the sampled
    responses when both ``policy_model`` (the weights the generator samples from) and
    ``init_model`` are given; ``tokenizer`` (default: the project's character tokenizer) turns
    texts into tokens for edit distances and scoring. The KL scores render prompts with
    ``renderer``, by default the generator's own (``RendersPrompts``: both engines), so they
    score the prompt ids the engine sampled from.
    """
    if tokenizer is None:
        from correction_rl.models import build_tokenizer

        tokenizer = build_tokenizer()

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if renderer is None and isinstance(generator, RendersPrompts):
        renderer = generator.renderer
    report = EvalReport(policy_version=getattr(generator, "policy_version", None))
    for mode in modes:
        if mode not in ("greedy", "sampled"):
            raise ValueError(f"evaluate: unknown mode {mode!r}; allowed: greedy, sampled")
        mode_sampling = dataclasses.replace(sampling, temperature=0.0) if mode == "greedy" else sampling
        rollouts = generator.generate(prompts, mode_sampling)
        corrections = teacher.correct(rollouts)
        kl_terms = None
        if mode == "sampled" and policy_model is not None and init_model is not None:
            policy_lp = score_responses(policy_model, tokenizer, rollouts, renderer=renderer)
            init_lp = score_responses(init_model, tokenizer, rollouts, renderer=renderer)
            kl_terms = [p - q for p, q in zip(policy_lp, init_lp)]
        report.modes[mode] = compute_metrics(corrections, tokenize, kl_terms)
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(corrections):
            groups.setdefault(c.rollout.prompt.task or "-", []).append(i)
        report.by_task[mode] = {
            task: compute_metrics(
                [corrections[i] for i in idx], tokenize, [kl_terms[i] for i in idx] if kl_terms else None
            )
            for task, idx in groups.items()
        }
    return report


def cli(argv: list[str]) -> int:
    """``correction-rl eval --model DIR [--task addition ...] [--init-model DIR] [--json OUT]``"""
    from correction_rl.prompts.files import read_prompt_file
    from correction_rl.models import load_model, load_tokenizer
    from correction_rl.rollout.hf import HFGenerator
    from correction_rl.tasks import make_prompts
    from correction_rl.teachers.oracle import OracleTeacher
    from correction_rl.tasks.registry import parse_difficulty

    p = argparse.ArgumentParser(prog="correction-rl eval", description="Held-out evaluation with the oracle teacher.")
    p.add_argument("--model", required=True, help="HF directory of the policy")
    p.add_argument("--task", nargs="+", default=["addition"])
    p.add_argument("--difficulty", nargs="*", default=[], metavar="KNOB=INT")
    p.add_argument("--prompts-file", default=None, help="JSONL prompts instead of generated ones")
    p.add_argument("--num-prompts", type=int, default=200, help="held-out prompts per task")
    p.add_argument("--init-model", default=None, help="HF directory of pi_init, for the KL estimate")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--chat-template", default="auto", help="auto | none | PATH (as model.chat_template)")
    p.add_argument("--system-prompt", default=None, help="as model.system_prompt")
    a = p.parse_args(argv)
    if a.prompts_file:
        prompts = read_prompt_file(a.prompts_file)[: a.num_prompts]
    else:
        prompts = make_prompts(a.task, parse_difficulty(a.difficulty), a.num_prompts, "eval", a.seed)
    model, tokenizer = load_model(a.model).eval(), load_tokenizer(a.model)
    init = load_model(a.init_model).eval() if a.init_model else None
    sampling = Sampling(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    generator = HFGenerator(model, tokenizer, chat_template=a.chat_template, system_prompt=a.system_prompt)
    report = evaluate(generator, prompts, OracleTeacher(), sampling,
                      policy_model=model if init is not None else None, init_model=init,
                      tokenizer=tokenizer)
    print(report.table())
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0
