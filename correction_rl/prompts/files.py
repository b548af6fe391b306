"""Prompt files: JSONL of ``Prompt`` records, read (``read_prompt_file``), written
(``write_prompt_file``) and exported from the tasks (``correction-rl prompts``).

One JSON object a line with the ``Prompt`` fields (``text`` or ``messages`` required;
``prompt_id``, ``task``, ``answer``, ``meta`` optional). ``messages`` is a chat conversation
(``[{"role": ..., "content": ...}]`` ending with a user turn) that the policy's chat template
renders (``prompts/render.py``); a record with messages and no text gets the last user message
as its text. Generated task prompts can be exported to the same format, so
the tasks work with any prompt loader and a file written by hand works with the oracle when its
records carry ``task`` (and ``answer`` for tasks whose text the task cannot parse).
A malformed line is an error naming the file and the line number, never a skipped record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

from correction_rl.types import Prompt
from correction_rl.errors import UserError

_FIELDS = {"prompt_id": str, "text": str, "task": str, "answer": (str, type(None)), "meta": dict,
           "messages": (list, type(None))}


class PromptFileError(ValueError, UserError):
    """A prompt file problem; the message starts with ``<file>:<line>:``."""


def parse_prompt(record: object, where: str) -> Prompt:
    """Validate one decoded JSON value as a ``Prompt`` (``where`` prefixes every error)."""
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_FIELDS))
    if unknown:
        raise PromptFileError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    if "text" not in record and record.get("messages") is None:
        raise PromptFileError(f"{where}: missing required field 'text' (or 'messages')")
    for key, kind in _FIELDS.items():
        if key in record and not isinstance(record[key], kind):
            raise PromptFileError(
                f"{where}: field {key!r} must be {_kind_name(kind)}, got {record[key]!r}"
            )
    if record.get("messages") is not None:
        from correction_rl.prompts.render import RenderError, check_messages

        try:
            messages = check_messages(record["messages"], f"{where}: field 'messages'")
        except RenderError as exc:
            raise PromptFileError(str(exc)) from None
        record = {**record, "messages": messages}
        record.setdefault("text", messages[-1]["content"])
    return Prompt(**record)


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def read_prompt_file(path: str | Path) -> list[Prompt]:
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


def write_prompt_file(prompts: Iterable[Prompt], path: str | Path) -> Path:
    """Write one JSON object a line (``read_prompt_file`` reads it back unchanged)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps(prompt.to_json(), ensure_ascii=False) + "\n")
    return path


def cli(argv: list[str]) -> int:
    """``correction-rl prompts --task addition --split eval --num 200 --out FILE``: export a
    task's prompts (to edit them, pin a held-out set, or feed ``task.prompts_file``)."""
    from correction_rl.tasks import TaskError, make_prompts, parse_difficulty

    p = argparse.ArgumentParser(prog="correction-rl prompts", description="Export task prompts as JSONL.")
    p.add_argument("--task", nargs="+", default=["addition"])
    p.add_argument("--split", choices=["train", "eval"], default="eval")
    p.add_argument("--num", type=int, default=200, help="prompts per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", nargs="*", default=[], metavar="KNOB=INT")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.num < 1:
        p.error(f"--num: must be >= 1, got {a.num}")
    try:
        prompts = make_prompts(a.task, parse_difficulty(a.difficulty), a.num, a.split, a.seed)
        out = write_prompt_file(prompts, a.out)
    except (TaskError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
