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

TEMPLATE_NAME = "spelling_fix_in_context"
DEFAULT_TEMPLATE_FILE = Path(__file__).resolve().parents[2] / "configs" / "freeform" / "templates.yaml"

Y_KINDS: tuple[str, ...] = ("policy", "clean", "copy", "typos", "other", "cut", "repeat")
"""What a teacher example's y is (``teacher_pairs``): a sample of the weak policy itself; the
clean sentence (must come back unchanged); x's misspelt sentence copied; the clean sentence
with fresh typos; another clean sentence of the sample (the answer a policy that games a
teacher which sees only y collapses onto, docs/models.md); the sentence cut at a word; a phrase
repeated (the run-on loop of a small model)."""


@dataclass(frozen=True)
class FreeformModels:
    """How the two models are made (defaults: ``make_models.sh``; tests pass fewer steps)."""

    teacher_size: str = "base"
    teacher_steps: int = 800
    teacher_lr: float = 2e-3
    policy_size: str = "tiny"
    policy_steps: int = 60
    policy_lr: float = 2e-3
    batch_size: int = 32
    num_examples: int = 4000
    y_mix: tuple[float, ...] = (0.35, 0.2, 0.1, 0.15, 0.1, 0.05, 0.05)
    """Share of each of ``Y_KINDS`` among the teacher's examples."""
    max_typos: int = 3
    """Fresh typos in a ``typos`` example's y (1..this)."""
    policy_temperatures: tuple[float, ...] = (0.3, 1.0)
    """Temperatures of the policy samples (alternating): the demo samples at 0.3, the rest
    widens what the teacher has seen."""
    seed: int = 0
    threads: int = 2
    num_eval: int = 100


def _rollout(prompt: Prompt, y: str) -> Rollout:
    return Rollout(prompt, [], [], y, policy_version=0)


def _answer_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def _corrupt(kind: str, prompt: Prompt, rng: random.Random, max_typos: int) -> str:
    """A synthetic y of ``kind`` (every kind but ``policy``) for a spelling prompt."""
    from correction_rl.tasks.spelling import PREFIX, inject_typos, sentences

    clean, words = prompt.answer, prompt.answer.split(" ")
    if kind == "clean":
        return clean
    if kind == "copy":
        return prompt.text[len(PREFIX):]
    if kind == "typos":
        return inject_typos(clean, rng.randint(1, max_typos), rng)
    if kind == "other":
        return rng.choice([s for s in sentences() if s != clean])
    if kind == "cut" and len(words) > 2:
        return " ".join(words[:rng.randint(2, len(words) - 1)])
    start = rng.randrange(len(words))  # repeat (or a sentence too short to cut)
    phrase = words[start:start + rng.randint(2, 5)]
    return " ".join(words[:start + len(phrase)] + phrase * rng.randint(1, 3) + words[start + len(phrase):])


@dataclass(frozen=True)
class TeacherExample:
    rollout: Rollout
    """x and the y to correct."""
    target: str
    """y': x's clean sentence."""
    kind: str
    """One of ``Y_KINDS``."""


def teacher_pairs(n: int, seed: int, cfg: FreeformModels, policy_dir: str | Path | None,
                  split: str = "train") -> list[TeacherExample]:
    """``n`` (rollout, y') examples of the teacher's job on ``split`` prompts x: y drawn from
    ``Y_KINDS`` by ``cfg.y_mix`` (``policy`` kinds are sampled from the model in ``policy_dir``;
    without one they are ``typos``), y' always x's clean sentence -- for a y that is close to it,
    the minimal edit; for one that is not, what ``teacher.max_edit_ratio`` then refuses."""
    task = get_task("spelling")
    rng = random.Random(f"freeform-teacher:{seed}:{split}")
    prompts = task.generate(n, split, seed)
    kinds = rng.choices(Y_KINDS, weights=cfg.y_mix, k=n)
    if policy_dir is None:
        kinds = ["typos" if k == "policy" else k for k in kinds]
    ys = {i: _corrupt(k, p, rng, cfg.max_typos) for i, (k, p) in enumerate(zip(kinds, prompts)) if k != "policy"}
    sampled = [i for i, k in enumerate(kinds) if k == "policy"]
    if sampled:
        from correction_rl.rollout.hf import HFGenerator

        gen = HFGenerator(str(policy_dir))
        for j, temperature in enumerate(cfg.policy_temperatures):
            part = sampled[j::len(cfg.policy_temperatures)]
            outs = gen.generate([prompts[i] for i in part],
                                Sampling(max_new_tokens=48, temperature=temperature, seed=seed + j))
            ys.update({i: o.response_text for i, o in zip(part, outs)})
    return [TeacherExample(_rollout(p, ys[i]), p.answer, k) for i, (k, p) in enumerate(zip(kinds, prompts))]


def _teacher_prompt(template: CorrectionTemplate, rollout: Rollout) -> Prompt:
    """The teacher's request as a prompt whose ``messages`` its chat template renders: exactly
    what ``VLLMTeacher`` sends for a chat-API template."""
    return Prompt(rollout.prompt.prompt_id, rollout.response_text, "spelling",
                  answer=rollout.prompt.answer, messages=template.messages(rollout))


def teacher_accuracy(model_dir: str | Path, template: CorrectionTemplate, examples: Sequence[TeacherExample],
                     max_new_tokens: int = 64) -> dict:
    """Greedy (HF) exact-match rate of the teacher on ``examples``, overall and per kind of y,
    and its mean normalized character edit distance to the clean sentence."""
    from correction_rl.edits import normalized_edit_distance
    from correction_rl.rollout.hf import HFGenerator

    gen = HFGenerator(str(model_dir))
    outs = gen.generate([_teacher_prompt(template, e.rollout) for e in examples],
                        Sampling(max_new_tokens=max_new_tokens, temperature=0.0))
    right = [o.response_text == e.target for o, e in zip(outs, examples)]
    by_kind = {}
    for kind in Y_KINDS:
        hits = [r for r, e in zip(right, examples) if e.kind == kind]
        if hits:
            by_kind[kind] = {"accuracy": round(sum(hits) / len(hits), 3), "n": len(hits)}
    dist = [normalized_edit_distance(o.response_text, e.target) for o, e in zip(outs, examples)]
    return {"accuracy": sum(right) / len(examples), "by_kind": by_kind,
            "mean_normalized_edit": sum(dist) / len(dist), "n": len(examples)}


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
    """Train and save ``out/policy``, then ``out/teacher`` (unless ``teacher`` is False: keep the
    one there), whose examples include samples of that policy; measure both on held-out prompts;
    write and return ``out/freeform.json``."""
    from correction_rl.prompts.render import PromptRenderer

    log = log or (lambda line: print(line, flush=True))
    out = Path(out)
    template = load_template_file(template_file or DEFAULT_TEMPLATE_FILE)[TEMPLATE_NAME]
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
    start, teacher_loss = time.perf_counter(), None
    if teacher:
        train = teacher_pairs(cfg.num_examples, cfg.seed, cfg, out / "policy")

        def teacher_examples(tok):
            renderer = PromptRenderer.build(tok)
            return [(renderer.ids(_teacher_prompt(template, e.rollout)), _answer_ids(tok, e.target)) for e in train]

        log(f"teacher: {cfg.teacher_size}, {cfg.teacher_steps} steps")
        teacher_loss = _train(out / "teacher", cfg.teacher_size, cfg.seed, teacher_examples, cfg.teacher_steps,
                              cfg.teacher_lr, cfg, log)
    teacher_s = time.perf_counter() - start
    held = teacher_pairs(cfg.num_eval, cfg.seed, cfg, out / "policy", split="eval")
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
