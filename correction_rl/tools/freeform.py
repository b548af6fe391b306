"""The models of the free-form demo: a spelling *teacher* and a weaker spelling *policy*.

Nothing can be downloaded here, so the LLM teacher of the free-form ``spelling`` task is made
the way every model of the project is: a BPE + ChatML model of the offline family, trained
supervised. What makes it a *correction* teacher is its training data: the exact request the
vLLM teacher will send (the task's correction template, ``configs/freeform/templates.yaml``,
rendered with the model's own chat template around a response y that still has typos, or none)
mapped to the clean sentence -- y with only its misspelt words fixed, i.e. the minimal edit;
an already clean y maps to itself. The policy is a smaller model of the same family trained
only briefly on the task prompts (``Fix the spelling: ...`` -> the clean sentence), so that it
still leaves typos: the imperfect starting point correction optimization improves.

Train/held-out hygiene: both models train only on ``train``-split prompts (typo'd variants);
the teacher's accuracy is measured on ``eval``-split prompts, as the policy is evaluated.

``python -m correction_rl.tools.freeform --out artifacts/freeform`` (what
``configs/freeform/make_models.sh`` runs) writes ``teacher/`` and ``policy/`` HF directories
and ``freeform.json`` with the teacher's measured held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from correction_rl.tasks import get_task
from correction_rl.teachers.templates import CorrectionTemplate, load_template_file
from correction_rl.types import Prompt, Rollout, Sampling

TEMPLATE_NAME = "spelling_fix"
DEFAULT_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "configs" / "freeform" / "templates.yaml"


@dataclass(frozen=True)
class FreeformModels:
    """How the two models are made (defaults: ``make_models.sh``; tests pass fewer steps)."""

    teacher_size: str = "base"
    teacher_steps: int = 600
    teacher_lr: float = 2e-3
    policy_size: str = "tiny"
    policy_steps: int = 60
    policy_lr: float = 2e-3
    batch_size: int = 32
    num_examples: int = 4000
    noop_fraction: float = 0.2
    """Share of teacher examples whose y is already clean (the teacher must leave it unchanged)."""
    max_typos: int = 3
    """Typos in a teacher example's y (1..this): more than the task's prompts have, since a
    policy's answer may add its own."""
    seed: int = 0
    threads: int = 2
    num_eval: int = 100


def _rollout(prompt: Prompt, y: str) -> Rollout:
    return Rollout(prompt, [], [], y, policy_version=0)


def _answer_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def teacher_pairs(template: CorrectionTemplate, n: int, seed: int, noop_fraction: float, max_typos: int,
                  split: str = "train") -> list[tuple[Rollout, str]]:
    """``n`` (rollout, y') examples of the teacher's job: y a misspelling (or, with probability
    ``noop_fraction``, the clean sentence itself) of a ``split`` prompt's sentence, y' clean."""
    task = get_task("spelling", max_typos=max_typos)
    rng = random.Random(f"freeform-teacher:{seed}")
    out = []
    for prompt in task.stream(split, seed):  # type: ignore[arg-type]
        y = prompt.answer if rng.random() < noop_fraction else prompt.text[len("Fix the spelling: "):]
        out.append((_rollout(prompt, y), prompt.answer))
        if len(out) == n:
            return out
    raise AssertionError("unreachable: task streams are endless")


def _teacher_prompt(template: CorrectionTemplate, rollout: Rollout) -> Prompt:
    """The teacher's request as a prompt whose ``messages`` its chat template renders: exactly
    what ``VLLMTeacher`` sends for a chat-API template."""
    return Prompt(rollout.prompt.prompt_id, rollout.response_text, "spelling",
                  answer=rollout.prompt.answer, messages=template.messages(rollout))


def teacher_accuracy(model_dir: str | Path, template: CorrectionTemplate, pairs: Sequence[tuple[Rollout, str]],
                     max_new_tokens: int = 64) -> dict[str, float]:
    """Greedy (HF) exact-match rate of the teacher on ``pairs``, split into typo'd and clean y,
    and its mean normalized character edit distance to the clean sentence."""
    from correction_rl.edits import normalized_edit_distance
    from correction_rl.rollout.hf import HFGenerator

    gen = HFGenerator(str(model_dir))
    outs = gen.generate([_teacher_prompt(template, r) for r, _ in pairs],
                        Sampling(max_new_tokens=max_new_tokens, temperature=0.0))
    typo = [o.response_text == clean for o, (r, clean) in zip(outs, pairs) if r.response_text != clean]
    noop = [o.response_text == clean for o, (r, clean) in zip(outs, pairs) if r.response_text == clean]
    dist = [normalized_edit_distance(o.response_text, clean) for o, (_, clean) in zip(outs, pairs)]
    return {"accuracy": sum(typo + noop) / len(pairs), "accuracy_typos": sum(typo) / max(1, len(typo)),
            "accuracy_clean": sum(noop) / max(1, len(noop)), "mean_normalized_edit": sum(dist) / len(dist),
            "n": len(pairs)}


def policy_accuracy(model_dir: str | Path, prompts: Sequence[Prompt], max_new_tokens: int = 64) -> float:
    """Greedy (HF) accuracy of a policy on spelling prompts (the task's check)."""
    from correction_rl.rollout.hf import HFGenerator

    task = get_task("spelling")
    outs = HFGenerator(str(model_dir)).generate(prompts, Sampling(max_new_tokens=max_new_tokens, temperature=0.0))
    return sum(task.check(o.prompt, o.response_text) for o in outs) / len(outs)


def _train(out: Path, size: str, seed: int, examples, steps: int, lr: float, cfg: FreeformModels, log) -> float:
    from correction_rl.models import load_model, load_tokenizer
    from correction_rl.models.make import make_model
    from correction_rl.tools.warmstart import sft_chat

    make_model(out, size, seed, tokenizer="bpe", chat=True)
    model, tok = load_model(out), load_tokenizer(out)
    pairs = examples(tok)
    loss = sft_chat(model, pairs, steps=steps, batch_size=cfg.batch_size, lr=lr, seed=seed,
                    threads=cfg.threads, log=log)
    model.eval().save_pretrained(out)
    return loss


def make_models(out: str | Path, cfg: FreeformModels = FreeformModels(), template_file: str | Path | None = None,
                log=None, teacher: bool = True) -> dict:
    """Train and save ``out/teacher`` (unless ``teacher`` is False: keep the one there) and
    ``out/policy``; measure both on held-out prompts; write and return ``out/freeform.json``."""
    from correction_rl.prompts.render import PromptRenderer

    log = log or (lambda line: print(line, flush=True))
    out = Path(out)
    template = load_template_file(template_file or DEFAULT_TEMPLATE_FILE)[TEMPLATE_NAME]
    train = teacher_pairs(template, cfg.num_examples, cfg.seed, cfg.noop_fraction, cfg.max_typos)

    def teacher_examples(tok):
        renderer = PromptRenderer.build(tok)
        return [(renderer.ids(_teacher_prompt(template, r)), _answer_ids(tok, clean)) for r, clean in train]

    start, teacher_loss = time.perf_counter(), None
    if teacher:
        log(f"teacher: {cfg.teacher_size}, {cfg.teacher_steps} steps")
        teacher_loss = _train(out / "teacher", cfg.teacher_size, cfg.seed, teacher_examples, cfg.teacher_steps,
                              cfg.teacher_lr, cfg, log)
    teacher_s = time.perf_counter() - start
    task = get_task("spelling")
    policy_prompts = task.generate(min(cfg.num_examples, 1500), "train", cfg.seed)

    def policy_examples(tok):
        renderer = PromptRenderer.build(tok)
        return [(renderer.ids(p), _answer_ids(tok, p.answer)) for p in policy_prompts]

    start = time.perf_counter()
    log(f"policy: {cfg.policy_size}, {cfg.policy_steps} steps")
    policy_loss = _train(out / "policy", cfg.policy_size, cfg.seed + 1, policy_examples, cfg.policy_steps,
                         cfg.policy_lr, cfg, log)
    policy_s = time.perf_counter() - start
    held = teacher_pairs(template, cfg.num_eval, cfg.seed, cfg.noop_fraction, 2, split="eval")
    record = {
        "config": asdict(cfg),
        "teacher": {"seconds": round(teacher_s, 1), "final_loss": teacher_loss,
                    "held_out": teacher_accuracy(out / "teacher", template, held)},
        "policy": {"seconds": round(policy_s, 1), "final_loss": policy_loss,
                   "held_out_accuracy": policy_accuracy(out / "policy", task.generate(cfg.num_eval, "eval", cfg.seed))},
    }
    (out / "freeform.json").write_text(json.dumps(record, indent=2) + "\n")
    log(json.dumps({k: v for k, v in record.items() if k != "config"}))
    return record


def cli(argv: list[str]) -> int:
    """``python -m correction_rl.tools.freeform --out DIR [--teacher-steps N] [--policy-steps N]``"""
    d = FreeformModels()
    p = argparse.ArgumentParser(prog="correction_rl.tools.freeform", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for teacher/, policy/ and freeform.json")
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps)
    p.add_argument("--policy-steps", type=int, default=d.policy_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--template-file", default=None, help=f"default: {DEFAULT_TEMPLATE_FILE}")
    p.add_argument("--policy-only", action="store_true", help="keep OUT/teacher, remake the policy")
    a = p.parse_args(argv)
    cfg = FreeformModels(teacher_steps=a.teacher_steps, policy_steps=a.policy_steps, seed=a.seed, threads=a.threads)
    make_models(a.out, cfg, a.template_file, teacher=not a.policy_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(__import__("sys").argv[1:]))
