"""Prompt files: round trip, malformed lines named by file and line number, the export command,
and a run's train/held-out prompts."""

from __future__ import annotations

import json

import pytest

from correction_rl.config import config_from_dict
from correction_rl.prompts.files import PromptFileError, cli, read_prompt_file, write_prompt_file
from correction_rl.prompts.split import train_and_held_out
from correction_rl.tasks import get_task
from correction_rl.types import Prompt


def test_export_and_load_round_trip(tmp_path):
    prompts = get_task("sorting").generate(20, "eval", seed=0)
    path = write_prompt_file(prompts, tmp_path / "sub" / "p.jsonl")
    assert read_prompt_file(path) == prompts
    assert len(path.read_text().splitlines()) == 20


def test_minimal_records_and_blank_lines(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text('{"text": "1+1=", "task": "addition"}\n\n{"text": "hi", "answer": null}\n')
    a, b = read_prompt_file(path)
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
        read_prompt_file(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: "), text
    assert __import__("re").search(message, text), text


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PromptFileError, match="prompt file not found: .*nope.jsonl"):
        read_prompt_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptFileError, match="empty.jsonl: no prompts"):
        read_prompt_file(tmp_path / "empty.jsonl")


def test_train_and_held_out_of_a_run_config(tmp_path):
    tree = {"seed": 0, "task": {"names": ["addition", "reverse"], "difficulty": {"max_len": 4},
                                "num_train": 30, "num_eval": 10}, "eval": {"num_prompts": 50}}
    train, held_out = train_and_held_out(config_from_dict(tree))
    assert [p.task for p in held_out] == ["addition"] * 10 + ["reverse"] * 10
    assert all(p.meta["split"] == "eval" for p in held_out)
    assert len(train) == 60 and not {p.text for p in train} & {p.text for p in held_out}
    # a prompts file replaces the training prompts; held-out prompts still come from the tasks
    path = write_prompt_file(held_out[:3], tmp_path / "p.jsonl")
    tree["task"]["prompts_file"] = str(path)
    split = train_and_held_out(config_from_dict(tree))
    assert split.train == held_out[:3] and split.held_out == held_out
    # eval.num_prompts caps the held-out prompts per task
    tree["eval"]["num_prompts"] = 4
    assert len(train_and_held_out(config_from_dict(tree)).held_out) == 8


def test_prompts_command_exports_a_task_split(tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    assert cli(["--task", "addition", "sorting", "--split", "eval", "--num", "5",
                "--difficulty", "max_digits=2", "--out", str(out)]) == 0
    prompts = read_prompt_file(out)
    assert [p.task for p in prompts] == ["addition"] * 5 + ["sorting"] * 5
    assert capsys.readouterr().out.strip() == str(out)
    assert cli(["--task", "nope", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
