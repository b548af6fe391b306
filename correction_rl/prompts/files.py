"""Prompt sources: JSONL files of ``Prompt`` records, and prompts generated from a ``TaskConfig``.

One JSON object a line with the ``Prompt`` fields (``text`` required; ``prompt_id``, ``task``,
``answer``, ``meta`` optional). Generated task prompts can be exported to the same format, so
the tasks work with any prompt loader and a file written by hand works with the oracle when its
records carry ``task`` (and ``answer`` for tasks whose text the task cannot parse).
A malformed line is an error naming the file and the line number, never a skipped record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

from correction_rl.types import Prompt

_FIELDS = {"prompt_id": str, "text": str, "task": str, "answer": (str, type(None)), "meta": dict}


class PromptFileError(ValueError):
    """A prompt file problem; the message starts with ``<file>:<line>:``."""


def parse_prompt(record: object, where: str) -> Prompt:
    """Validate one decoded JSON value as a ``Prompt`` (``where`` prefixes every error)."""
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_FIELDS))
    if unknown:
        raise PromptFileError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    if "text" not in record:
        raise PromptFileError(f"{where}: missing required field 'text'")
    for key, kind in _FIELDS.items():
        if key in record and not isinstance(record[key], kind):
            raise PromptFileError(
                f"{where}: field {key!r} must be {_kind_name(kind)}, got {record[key]!r}"
            )
    return Prompt(**record)


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def load_prompts(path: str | Path) -> list[Prompt]:
    """All prompts of a JSONL file, in file order; blank lines are allowed.

    A record without ``prompt_id`` gets ``<file stem>-<line>``; duplicate ids are an error
    (they would merge different prompts in the correction log).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PromptFileError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc})") from None
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if isinstance(record, dict) and "prompt_id" not in record:
            record = {"prompt_id": f"{path.stem}-{number}", **record}
        prompt = parse_prompt(record, where)
        if prompt.prompt_id in seen:
            raise PromptFileError(
                f"{where}: duplicate prompt_id {prompt.prompt_id!r} (first on line {seen[prompt.prompt_id]})"
            )
        seen[prompt.prompt_id] = number
        prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in file")
    return prompts


def save_prompts(prompts: Iterable[Prompt], path: str | Path) -> Path:
    """Write one JSON object a line (``load_prompts`` reads it back unchanged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps(prompt.to_json(), ensure_ascii=False) + "\n")
    return path


def prompts_for(config, split: str, seed: int) -> list[Prompt]:
    """The prompts a ``TaskConfig`` describes: its ``prompts_file`` if set, otherwise
    ``num_train`` (split ``train``) or ``num_eval`` (split ``eval``) generated prompts per task.

    A prompts file has no splits: the same prompts serve training and evaluation.
    """
    from correction_rl.tasks import make_prompts

    if config.prompts_file:
        return load_prompts(config.prompts_file)
    n = config.num_train if split == "train" else config.num_eval
    return make_prompts(list(config.names), dict(config.difficulty), n, split, seed)  # type: ignore[arg-type]


def cli(argv: list[str]) -> int:
    """``correction-rl prompts --task addition --split eval --num 200 --out FILE``: export."""
    from correction_rl.tasks import make_prompts
    from correction_rl.tools.warmstart import parse_difficulty

    p = argparse.ArgumentParser(prog="correction-rl prompts", description="Export task prompts as JSONL.")
    p.add_argument("--task", nargs="+", default=["addition"])
    p.add_argument("--split", choices=["train", "eval"], default="eval")
    p.add_argument("--num", type=int, default=200, help="prompts per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", nargs="*", default=[], metavar="KNOB=INT")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    prompts = make_prompts(a.task, parse_difficulty(a.difficulty), a.num, a.split, a.seed)
    print(save_prompts(prompts, a.out))
    return 0
