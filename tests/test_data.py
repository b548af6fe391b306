"""Prompt files: round trip, and malformed lines named by file and line number."""

from __future__ import annotations

import json

import pytest

from correction_rl.config import TaskConfig
from correction_rl.prompts.files import PromptFileError, load_prompts, prompts_for, save_prompts
from correction_rl.tasks import get_task
from correction_rl.types import Prompt


def test_export_and_load_round_trip(tmp_path):
    prompts = get_task("sorting").generate(20, "eval", seed=0)
    path = save_prompts(prompts, tmp_path / "sub" / "p.jsonl")
    assert load_prompts(path) == prompts
    assert len(path.read_text().splitlines()) == 20


def test_minimal_records_and_blank_lines(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text('{"text": "1+1=", "task": "addition"}\n\n{"text": "hi", "answer": null}\n')
    a, b = load_prompts(path)
    assert a == Prompt(prompt_id="hand-1", text="1+1=", task="addition")
    assert b.prompt_id == "hand-3" and b.task == "" and b.answer is None


GOOD = json.dumps({"prompt_id": "a", "text": "1+1=", "task": "addition", "answer": "2"})


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"prompt_id": "b", "text": "2+2=",', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt_id": "b"}', "missing required field 'text'"),
        ('{"text": "x", "answr": "1"}', r"unknown field\(s\) \['answr'\]"),
        ('{"text": 7}', "field 'text' must be str, got 7"),
        ('{"text": "x", "answer": 2}', "field 'answer' must be str or null"),
        ('{"text": "x", "meta": []}', "field 'meta' must be dict"),
        (GOOD, "duplicate prompt_id 'a' \\(first on line 1\\)"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "prompts.jsonl"
    other = GOOD.replace('"a"', '"c"')
    path.write_text(f"{GOOD}\n\n{bad}\n{other}\n")
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: "), text
    assert __import__("re").search(message, text), text


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PromptFileError, match="prompt file not found: .*nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptFileError, match="empty.jsonl: no prompts"):
        load_prompts(tmp_path / "empty.jsonl")


def test_prompts_for_config(tmp_path):
    cfg = TaskConfig(names=["addition", "reverse"], difficulty={"max_len": 4}, num_train=30, num_eval=10)
    held_out = prompts_for(cfg, "eval", seed=0)
    assert [p.task for p in held_out] == ["addition"] * 10 + ["reverse"] * 10
    assert all(p.meta["split"] == "eval" for p in held_out)
    train = prompts_for(cfg, "train", seed=0)
    assert len(train) == 60 and not {p.text for p in train} & {p.text for p in held_out}
    path = save_prompts(held_out[:3], tmp_path / "p.jsonl")
    from_file = TaskConfig(prompts_file=str(path))
    assert prompts_for(from_file, "train", seed=5) == held_out[:3]
