"""Diffs of y against y': minimal alignment, escaping, token diffs, the corrections table."""

from __future__ import annotations

import html
import re

import pytest

from correction_rl.observe.diffs import (
    TABLE_COLUMNS,
    DiffSegment,
    corrections_table,
    diff_html,
    diff_segments,
    select_pairs,
    table_sinks,
    token_diff_html,
)
from correction_rl.edits import edit_distance
from correction_rl.observe.metrics import JsonlSink, MultiSink
from correction_rl.models import build_tokenizer
from correction_rl.pairs.make import make_pair
from correction_rl.types import Correction, Prompt, Rollout


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def pair_for(tokenizer, prompt: str, y: str, y_prime: str, version: int = 0, finish: str = "stop"):
    ids = tokenizer(prompt)["input_ids"]
    response = tokenizer(y, add_special_tokens=False)["input_ids"]
    rollout = Rollout(Prompt(f"p-{prompt}-{y}", prompt, "addition"), ids, response, y, version, finish)
    return make_pair(Correction(rollout, y_prime, "oracle"), tokenizer)


def test_segments_are_the_minimal_edits():
    segs = diff_segments("12+3", "15+34")
    assert segs == [DiffSegment("equal", "1"), DiffSegment("delete", "2"), DiffSegment("insert", "5"),
                    DiffSegment("equal", "+3"), DiffSegment("insert", "4")]
    # the changed characters are exactly the edit distance the metrics report
    # one substitution (shown as a deletion + an insertion) and one insertion: distance 2
    assert edit_distance("12+3", "15+34") == 2
    assert [len(s.text) for s in segs if s.op != "equal"] == [1, 1, 1]
    assert "".join(s.text for s in segs if s.op != "insert") == "12+3"
    assert "".join(s.text for s in segs if s.op != "delete") == "15+34"
    assert diff_segments("same", "same") == [DiffSegment("equal", "same")]
    assert diff_segments("", "ab") == [DiffSegment("insert", "ab")]


def test_html_escapes_every_text_and_marks_changes():
    y = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    y_prime = '<script>alert("y")</script> & ok'
    out = diff_html(y, y_prime)
    assert "<script" not in out and "<img" not in out
    assert "&lt;script&gt;" in out and "&amp;" in out and "&quot;" in out
    # the only tags are ours
    assert set(re.findall(r"</?([a-z]+)", out)) <= {"div", "del", "ins"}
    assert '<del style="' in out and '<ins style="' in out
    # unescaping the kept text gives y back (with changed whitespace made visible)
    kept = re.sub(r"<ins[^>]*>.*?</ins>|<[^>]+>", "", out)
    assert html.unescape(kept).replace("\u2423", " ") == y


def test_changed_whitespace_is_visible():
    out = diff_html("a b", "a  b\n")
    assert "<ins" in out and "\u2423" in out and "\u21b5" in out


def test_token_diff_shows_the_eos_a_truncated_answer_lacks(tokenizer):
    cut = pair_for(tokenizer, "3+4=", "7", "7", finish="length")  # y has no eos, y' has one
    assert cut.edit_distance == 1
    out = token_diff_html(cut.rejected_ids, cut.chosen_ids, tokenizer)
    assert re.search(r"<ins[^>]*>&lt;eos&gt;</ins>", out), out


def test_corrections_table_rows(tokenizer):
    pairs = [
        pair_for(tokenizer, "12+34=", "46", "46", version=1),          # no-op
        pair_for(tokenizer, "7+8=", "14", "15", version=2),
        pair_for(tokenizer, "9+9=", "<b>18", "18", version=3),
    ]
    columns, rows = corrections_table(pairs, tokenizer, max_rows=2, as_wandb=False)
    assert columns == TABLE_COLUMNS
    assert len(rows) == 2  # corrected pairs first; the no-op is cut by max_rows
    first = dict(zip(columns, rows[0]))
    assert (first["prompt"], first["y"], first["y'"]) == ("7+8=", "14", "15")
    assert first["edit_distance"] == 1 and first["policy_version"] == 2 and first["teacher"] == "oracle"
    assert "<del" in first["diff"] and ">4</del>" in first["diff"] and ">5</ins>" in first["diff"]
    second = dict(zip(columns, rows[1]))
    assert second["y"] == "<b>18"  # raw text in the text column (W&B shows strings as text)...
    assert "&lt;b&gt;" in second["diff"] and "<b>" not in second["diff"]  # ...escaped in the HTML
    assert select_pairs(pairs, 5)[-1].is_noop


def test_corrections_table_wandb_cells(tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import wandb

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    pairs = [pair_for(tokenizer, "1+1=", "3", "2")]
    _, rows = corrections_table(pairs, tokenizer, max_rows=4)
    cell = rows[0][TABLE_COLUMNS.index("diff")]
    assert isinstance(cell, wandb.Html)
    assert "normalize.css" not in cell.html  # no injected stylesheet from the internet
    assert ">3</del>" in cell.html and ">2</ins>" in cell.html


def test_table_sinks_are_found_inside_multisinks(tmp_path):
    class Tables:
        def log_table(self, key, columns, rows, step):
            pass

    tables = Tables()
    jsonl = JsonlSink(tmp_path / "m.jsonl")
    assert table_sinks(MultiSink([jsonl, MultiSink([tables])])) == [tables]
    assert table_sinks(jsonl) == []
    jsonl.close()


def test_maybe_log_corrections_every_n_steps_loads_the_tokenizer_itself(tiny_model_dir, tokenizer, tmp_path,
                                                                         monkeypatch):
    """What the Ray driver does: no tokenizer at hand (None), a W&B sink inside a MultiSink."""
    from correction_rl.config import load_config
    from correction_rl.observe.diffs import TABLE_KEY, maybe_log_corrections
    from correction_rl.observe.metrics import WandbSink, read_offline_runs

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, {"model": {"path": str(tiny_model_dir)},
                             "metrics": {"wandb_mode": "offline", "table_every_steps": 3, "table_rows": 1}})
    wandb_sink = WandbSink(cfg.metrics, tmp_path / "run", {})
    sink = MultiSink([JsonlSink(tmp_path / "run" / "metrics.jsonl"), wandb_sink])
    pairs = [pair_for(tokenizer, "2+2=", "5", "4"), pair_for(tokenizer, "1+2=", "3", "3")]
    logged = [maybe_log_corrections(sink, pairs, None, step, cfg) for step in range(1, 7)]
    assert logged == [False, False, True, False, False, True]
    assert not maybe_log_corrections(sink, [], None, 9, cfg)
    sink.close()
    (run,) = read_offline_runs(tmp_path / "run")
    tables = [row for row in run.history if TABLE_KEY in row]
    assert [row["step"] for row in tables] == [3, 6] and tables[0][TABLE_KEY]["nrows"] == 1
