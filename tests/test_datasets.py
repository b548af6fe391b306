"""Prompt sets through the ``datasets`` library (correction_rl/prompts/datasets.py): JSONL,
parquet, ``save_to_disk`` and directories of files; field mapping, chat messages, the seeded
split, errors naming the file and the row, and streaming (the first rows of a 200k-row file are
read without reading the file). Hub ids need a machine that reaches the hub: not tested here."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from correction_rl.prompts.datasets import (  # noqa: E402
    DatasetError,
    DatasetSource,
    FieldMap,
    is_held_out,
    iter_prompts,
    load_prompts,
)

ROWS = [{"uid": f"q{i}", "question": f"What is {i} plus {i}?", "ref": str(2 * i), "extra": i} for i in range(40)]
FIELDS = FieldMap(prompt="question", answer="ref", id="uid")


def write_jsonl(path: Path, rows: list, raw_lines: list[str] = ()) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def write_parquet(path: Path, rows: list, row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def as_tuples(prompts):
    return [(p.prompt_id, p.text, p.task, p.answer, p.meta["row"], p.meta["key"]) for p in prompts]


def test_jsonl_parquet_and_save_to_disk_give_the_same_prompts(tmp_path):
    src = {
        "jsonl": write_jsonl(tmp_path / "qa.jsonl", ROWS),
        "parquet": write_parquet(tmp_path / "qa.parquet", ROWS),
    }
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "qa"))
    src["disk"] = tmp_path / "qa"
    loaded = {k: load_prompts(DatasetSource(str(p), fields=FIELDS, task="qa")) for k, p in src.items()}
    first = loaded["jsonl"][3]
    assert (first.prompt_id, first.text, first.task, first.answer) == ("qa-q3", "What is 3 plus 3?", "qa", "6")
    assert first.meta == {"source": str(src["jsonl"]), "row": 3, "key": "q3"}
    assert as_tuples(loaded["jsonl"]) == as_tuples(loaded["parquet"]) == as_tuples(loaded["disk"])
    assert len(loaded["jsonl"]) == len(ROWS)


def test_dataset_dict_split_and_directory_of_files(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:30]), "test": datasets.Dataset.from_list(ROWS[30:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    test = load_prompts(DatasetSource(str(tmp_path / "dd"), split="test", fields=FIELDS))
    assert [p.meta["key"] for p in test] == [f"q{i}" for i in range(30, 40)]
    with pytest.raises(DatasetError, match=r"dd: no split 'validation'; available: \['train', 'test'\]"):
        load_prompts(DatasetSource(str(tmp_path / "dd"), split="validation", fields=FIELDS))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", ROWS[:25])
    write_jsonl(shards / "b.jsonl", ROWS[25:])
    assert [p.meta["key"] for p in load_prompts(DatasetSource(str(shards), fields=FIELDS))] == [r["uid"] for r in ROWS]


def test_chat_messages_field(tmp_path):
    rows = [
        {"id": 0, "conv": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]},
        {"id": 1, "conv": [{"role": "user", "content": "2+2?"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    prompts = load_prompts(DatasetSource(str(path), fields=FieldMap(messages="conv", id="id")))
    assert [p.text for p in prompts] == ["Hi there", "2+2?"]
    assert prompts[0].messages == rows[0]["conv"] and "messages" not in prompts[0].meta
    bad = write_jsonl(tmp_path / "bad_chat.jsonl", rows + [
        {"id": 2, "conv": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(DatasetError, match=r"bad_chat.jsonl: row 2: field 'conv' \(messages\) must end with a 'user' turn"):
        load_prompts(DatasetSource(str(bad), fields=FieldMap(messages="conv", id="id")))
    wrong = write_jsonl(tmp_path / "wrong_chat.jsonl", [{"id": 0, "conv": "just text"}])
    with pytest.raises(DatasetError, match=r"wrong_chat.jsonl: row 0: field 'conv' \(messages\) must be a non-empty list"):
        load_prompts(DatasetSource(str(wrong), fields=FieldMap(messages="conv", id="id")))


def test_seeded_split_is_disjoint_complete_and_order_free(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", ROWS * 1)
    src = DatasetSource(str(path), fields=FIELDS)
    train = load_prompts(src, "train", held_out_fraction=0.25, seed=7)
    held = load_prompts(src, "held_out", held_out_fraction=0.25, seed=7)
    keys_train, keys_held = {p.meta["key"] for p in train}, {p.meta["key"] for p in held}
    assert not keys_train & keys_held and keys_train | keys_held == {r["uid"] for r in ROWS}
    assert 3 <= len(held) <= 18  # ~10 of 40
    assert keys_held == {p.meta["key"] for p in load_prompts(src, "held_out", 0.25, seed=7)}  # deterministic
    assert keys_held != {p.meta["key"] for p in load_prompts(src, "held_out", 0.25, seed=8)}  # seed matters
    reordered = write_jsonl(tmp_path / "reordered.jsonl", ROWS[::-1])
    assert keys_held == {p.meta["key"] for p in load_prompts(DatasetSource(str(reordered), fields=FIELDS), "held_out", 0.25, seed=7)}
    assert all(is_held_out(k, 7, 0.25) for k in keys_held)
    with pytest.raises(DatasetError, match="none of its 40 rows fell in the held_out part"):
        load_prompts(src, "held_out", held_out_fraction=1e-9, seed=7)


READER = r"row 2: could not read the data \(ArrowInvalid: JSON parse error: "


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"uid": "x", "ref": "1"}, r"row 2: missing field 'question' \(null\); fields: \['extra', 'question', 'ref', 'uid'\]"),
        ({"uid": "x", "question": 5, "ref": "1"}, READER + r"Column\(/question\) changed from string to number in row 2\)"),
        ({"uid": "x", "question": "  ", "ref": "1"}, r"row 2: field 'question' \(prompt\) is empty"),
        ({"uid": "x", "question": "q", "ref": 1}, READER + r"Column\(/ref\) changed from string to number in row 2\)"),
        ({"uid": [1], "question": "q", "ref": "1"}, READER + r"Column\(/uid\) changed from string to array in row 2\)"),
        ({"uid": "q0", "question": "q", "ref": "1"}, r"row 2: duplicate id 'bad-q0' \(first at row 0\)"),
    ],
    ids=["missing", "wrong-type", "empty-prompt", "wrong-answer-type", "wrong-id-type", "duplicate-id"],
)
def test_bad_jsonl_rows_name_file_and_row(tmp_path, bad_row, message):
    """A JSONL column whose type changes is refused by the reader (strict typing: the library's
    default would re-decode the column's strings as JSON, "0" -> 0) with the column and row."""
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2] + [bad_row] + ROWS[2:5])
    with pytest.raises(DatasetError, match=rf"^{str(path)}: {message}"):
        load_prompts(DatasetSource(str(path), fields=FIELDS))


def test_wrong_types_in_typed_columns(tmp_path):
    """Parquet and Arrow columns are typed: a column of the wrong type fails at its first row."""
    ints = [{"prompt": i, "answer": "a"} for i in range(3)]
    with pytest.raises(DatasetError, match=r"ints.parquet: row 0: field 'prompt' \(prompt\) must be a string, got int 0"):
        load_prompts(DatasetSource(str(write_parquet(tmp_path / "ints.parquet", ints))))
    datasets.Dataset.from_list([{"prompt": "p", "answer": 7}]).save_to_disk(str(tmp_path / "answers"))
    with pytest.raises(DatasetError, match=r"answers: row 0: field 'answer' \(answer\) must be a string or null, got int 7"):
        load_prompts(DatasetSource(str(tmp_path / "answers"), fields=FieldMap(answer="answer")))
    nulls = [{"prompt": "a"}, {"prompt": None}]
    with pytest.raises(DatasetError, match=r"nulls.parquet: row 1: missing field 'prompt' \(null\)"):
        load_prompts(DatasetSource(str(write_parquet(tmp_path / "nulls.parquet", nulls))))


def test_unreadable_and_empty_sets(tmp_path):
    broken = write_jsonl(tmp_path / "broken.jsonl", ROWS[:3], ["{not json"])
    with pytest.raises(DatasetError, match=r"broken.jsonl: row 3: could not read the data \(ArrowInvalid"):
        load_prompts(DatasetSource(str(broken), fields=FIELDS))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match="empty.jsonl: empty dataset"):
        load_prompts(DatasetSource(str(tmp_path / "empty.jsonl")))
    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(tmp_path / "nothing"))
    with pytest.raises(DatasetError, match=r"nothing: empty dataset \(no rows in split 'train'\)"):
        load_prompts(DatasetSource(str(tmp_path / "nothing")))
    no_column = write_parquet(tmp_path / "other.parquet", [{"text": "a"}])
    with pytest.raises(DatasetError, match=r"other.parquet: row 0: missing field 'prompt' \(absent\); fields: \['text'\]"):
        load_prompts(DatasetSource(str(no_column)))
    with pytest.raises(DatasetError, match="missing.jsonl: file not found"):
        load_prompts(DatasetSource(str(tmp_path / "missing.jsonl")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"unsupported file type '.txt'"):
        load_prompts(DatasetSource(str(tmp_path / "notes.txt")))
    with pytest.raises(DatasetError, match="no such file or directory"):
        load_prompts(DatasetSource(str(tmp_path / "nowhere")))
    with pytest.raises(DatasetError, match="set a prompt field or a messages field"):
        FieldMap(prompt=None)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_large_file_streams_lazily(tmp_path, kind):
    """200k rows whose LAST row is bad: taking the first 100 prompts succeeds (the reader never
    got to the end of the file) and is much faster than reading it all, which fails at that row."""
    n = 200_000
    rows = [{"id": i, "prompt": f"prompt number {i} with some padding text to make it longer"} for i in range(n - 1)]
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "big.jsonl", rows, ['{"id": 199999, "prompt": null}'])
    else:
        path = write_parquet(tmp_path / "big.parquet", rows + [{"id": n - 1, "prompt": None}], row_group_size=10_000)
    src = DatasetSource(str(path), fields=FieldMap(id="id"))
    first: list = []
    t_first = _time(lambda: first.extend(iter_prompts(src, limit=100)))
    assert [p.meta["row"] for p in first] == list(range(100))
    assert first[-1].text == "prompt number 99 with some padding text to make it longer"
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match=rf"big.{kind}: row 199999: missing field 'prompt' \(null\)"):
        load_prompts(src)
    t_all = time.perf_counter() - t0
    assert t_first < t_all / 5, (t_first, t_all)
    held = list(iter_prompts(src, "held_out", held_out_fraction=0.01, seed=0, limit=20))
    assert len(held) == 20 and all(is_held_out(p.meta["key"], 0, 0.01) for p in held)


# --- from a config: task.dataset and its field mapping ------------------------------------------


def _cfg(tmp_path, **task):
    from correction_rl.config import load_config

    return load_config(overrides={"task": task, "teacher": {"kind": "human"}, "eval": {"teacher": "run", "num_prompts": 5}})


def test_config_dataset_gives_the_runs_train_and_held_out_prompts(tmp_path):
    from correction_rl.prompts.render import PromptRenderer
    from correction_rl.prompts.split import train_and_held_out
    from correction_rl.models import build_family_tokenizer

    rows = [{"uid": f"c{i}", "conv": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Fix: teh {i}"}],
             "ref": f"the {i}"} for i in range(60)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    fields = dict(dataset=str(path), messages_field="conv", answer_field="ref", id_field="uid", held_out_fraction=0.25)
    cfg = _cfg(tmp_path, **fields)
    train, held_out = train_and_held_out(cfg)
    assert len(held_out) == 5 and {p.prompt_id for p in train}.isdisjoint(p.prompt_id for p in held_out)
    everything = list(iter_prompts(DatasetSource(str(path), fields=FieldMap(messages="conv", answer="ref", id="uid")),
                                   "held_out", 0.25, 0))
    assert len(train) + len(everything) == 60 and [p.prompt_id for p in held_out] == [p.prompt_id for p in everything[:5]]
    assert train[0].messages == rows[int(train[0].meta["key"][1:])]["conv"] and train[0].answer is not None
    # the same rows whatever the run's seed; another split_seed moves them
    again, _ = train_and_held_out(dataclasses.replace(cfg, seed=cfg.seed + 7))
    assert [p.prompt_id for p in again] == [p.prompt_id for p in train]
    moved, _ = train_and_held_out(_cfg(tmp_path, split_seed=1, **fields))
    assert {p.prompt_id for p in moved} != {p.prompt_id for p in train}
    # a dataset conversation renders through the chat template, system turn included
    tok = build_family_tokenizer("bpe", chat=True)
    text = PromptRenderer.build(tok).text(train[0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFix: teh") and text.endswith("assistant\n")


def test_config_dataset_errors(tmp_path):
    from correction_rl.config import ConfigError, load_config
    from correction_rl.prompts.split import train_and_held_out

    good = [{"q": f"question {i}"} for i in range(30)]
    bad = write_jsonl(tmp_path / "bad.jsonl", good + [{"q": "  "}] + good)
    cfg = _cfg(tmp_path, dataset=str(bad), prompt_field="q")
    with pytest.raises(DatasetError, match=r"bad.jsonl: row 30: field 'q' \(prompt\) is empty"):
        train_and_held_out(cfg)  # nothing comes back: the whole set is validated first
    missing = _cfg(tmp_path, dataset=str(write_jsonl(tmp_path / "ok.jsonl", good)), prompt_field="question")
    with pytest.raises(DatasetError, match=r"ok.jsonl: row 0: missing field 'question' \(absent\)"):
        train_and_held_out(missing)
    with pytest.raises(DatasetError, match="empty.jsonl: empty dataset"):
        train_and_held_out(_cfg(tmp_path, dataset=str(write_jsonl(tmp_path / "empty.jsonl", [])), prompt_field="q"))
    with pytest.raises(ConfigError, match=r"task.dataset: no such file or directory"):
        load_config(overrides={"task": {"dataset": str(tmp_path / "nope.jsonl")}}, check_paths=True)
    with pytest.raises(ConfigError, match=r"task.held_out_fraction"):
        load_config(overrides={"task": {"held_out_fraction": 0}})
    with pytest.raises(ConfigError, match=r"task.promt_field"):
        load_config(overrides={"task": {"promt_field": "q"}})
    oracle = load_config(overrides={"task": {"dataset": str(tmp_path / "ok.jsonl"), "prompt_field": "q"}})
    with pytest.raises(ConfigError, match="task.dataset: dataset prompts carry no task an oracle can check"):
        train_and_held_out(oracle)


def test_dataset_fields_are_described():
    from correction_rl.config.describe import describe

    lines = "\n".join(describe())
    for name in ("task.dataset", "task.messages_field", "task.held_out_fraction", "task.split_seed",
                 "model.chat_template", "model.system_prompt"):
        assert name in lines, name
