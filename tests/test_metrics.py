"""Metric sinks: console line, JSONL records, fan-out, and W&B offline runs read back."""

from __future__ import annotations

import io
import json

import pytest

from correction_rl.config import MetricsConfig
from correction_rl.observe.metrics import (
    ConsoleSink,
    JsonlSink,
    MetricSink,
    MultiSink,
    TornMetricsWarning,
    WandbSink,
    load_jsonl_metrics,
    read_jsonl_metrics,
    read_offline_run,
    read_offline_runs,
)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep every W&B side file inside the test's directory; never touch the network."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_console_sink_prints_selected_keys_compactly():
    out = io.StringIO()
    sink = ConsoleSink(keys=["train/loss", "buffer/size", "eval/correction_rate"], every=2, stream=out)
    sink.log({"train/loss": 0.693147, "buffer/size": 12.0, "other": 1.0}, step=2)
    sink.log({"train/loss": 0.5}, step=3)  # not a multiple of every
    sink.log({"train/loss": float("nan")}, step=4)
    assert out.getvalue().splitlines() == [
        "step 2 | train/loss 0.6931 | buffer/size 12",
        "step 4 | train/loss nan",
    ]


def test_jsonl_sink_writes_one_strict_json_line_per_call_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log({"train/loss": 0.25, "buffer/size": 3}, step=1)
    # visible before close: flushed per call
    assert json.loads(path.read_text().splitlines()[0])["train/loss"] == 0.25
    sink.log({"train/loss": float("inf")}, step=2)
    sink.close()
    JsonlSink(path).log({"train/loss": 0.125}, step=3)  # a resumed run appends
    rows = read_jsonl_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["buffer/size"] == 3.0 and rows[1]["train/loss"] is None
    assert all(isinstance(r["time"], float) for r in rows)
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def _killed_mid_write(path, steps=(1, 2)):
    """The file a run SIGKILLed in the middle of its next ``write`` leaves: complete records,
    then the first bytes of one more, no newline."""
    sink = JsonlSink(path)
    for step in steps:
        sink.log({"train/loss": 0.5}, step=step)
    sink.close()
    torn = json.dumps({"step": steps[-1] + 1, "time": 1.0, "train/loss": 0.25})[:17]
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(torn)
    return torn


def test_a_resumed_run_repairs_a_torn_tail_before_its_first_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    torn = _killed_mid_write(path)
    with pytest.warns(TornMetricsWarning, match="moved to"):
        sink = JsonlSink(path)  # the resumed run
    sink.log({"train/loss": 0.125}, step=3)
    sink.close()
    rows = read_jsonl_metrics(path)  # strict: would raise on a glued line
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["train/loss"] == 0.125
    assert sink.recovered_partial is not None and sink.recovered_partial.read_text() == torn
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3


def test_tail_repair_keeps_a_complete_last_record_and_drops_zero_fill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "time": 1.0}) + "\n" + json.dumps({"step": 2, "time": 2.0}))
    JsonlSink(path).log({"a/x": 1.0}, step=3)  # the newline-less record is complete: kept
    assert [r["step"] for r in read_jsonl_metrics(path)] == [1, 2, 3]
    with open(path, "ab") as fh:
        fh.write(b"\x00" * 64)  # what some filesystems leave after a crash
    JsonlSink(path).log({"a/x": 1.0}, step=4)
    assert [r["step"] for r in read_jsonl_metrics(path)] == [1, 2, 3, 4]
    assert b"\x00" not in path.read_bytes() and not list(tmp_path.glob("*.partial-*"))


def test_reader_skips_and_counts_a_glued_line_and_a_partial_last_line(tmp_path):
    """A file damaged before the sink repaired tails: a torn line with the next record glued
    onto it (line 3), and a partial last line. The lenient reader keeps every good record and
    counts the bad line; the strict one names ``file:line``."""
    path = tmp_path / "metrics.jsonl"
    torn = _killed_mid_write(path)
    with open(path, "a", encoding="utf-8") as fh:  # the old sink appended straight after it
        fh.write(json.dumps({"step": 3, "time": 3.0}) + "\n" + json.dumps({"step": 4, "time": 4.0}) + "\n")
        fh.write(torn)
    with pytest.warns(TornMetricsWarning, match=":5: partial final record"):
        loaded = load_jsonl_metrics(path)
    assert [r["step"] for r in loaded.records] == [1, 2, 4] and loaded.bad_lines == [3]
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON metrics record"):
        read_jsonl_metrics(path)


def test_multi_sink_fans_out_and_closes_all(tmp_path):
    out = io.StringIO()
    jsonl = JsonlSink(tmp_path / "m.jsonl")
    multi = MultiSink([ConsoleSink(keys=["a/x"], stream=out), jsonl])
    assert isinstance(multi, MetricSink) and isinstance(jsonl, MetricSink)
    multi.log({"a/x": 1.5}, step=7)
    multi.close()
    assert out.getvalue() == "step 7 | a/x 1.5\n"
    assert read_jsonl_metrics(tmp_path / "m.jsonl")[0]["a/x"] == 1.5
    assert jsonl._fh.closed


def test_wandb_offline_run_is_read_back(wandb_env):
    run_dir = wandb_env / "run"
    config = {"objective": {"form": "dpo", "beta": 0.1}, "seed": 3}
    sink = WandbSink(MetricsConfig(wandb_mode="offline", wandb_project="t"), run_dir, config)
    for step in range(1, 4):
        sink.log({"train/loss": 1.0 / step, "buffer/size": 10.0 * step}, step=step)
    sink.log({"eval/correction_rate": 0.4}, step=3)
    sink.close()
    assert list((run_dir / "wandb").glob(f"offline-run-*-{sink.run_id}"))

    history = read_offline_run(run_dir)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in history]
    assert rows == [
        {"train/loss": 1.0, "buffer/size": 10.0, "step": 1},
        {"train/loss": 0.5, "buffer/size": 20.0, "step": 2},
        {"train/loss": pytest.approx(1 / 3), "buffer/size": 30.0, "step": 3},
        {"eval/correction_rate": 0.4, "step": 3},
    ]
    (run,) = read_offline_runs(run_dir)
    assert run.run_id == sink.run_id
    assert run.config == config
    assert {"glob_name": "*", "step_metric": "step", "name": ""} in run.metric_definitions
    assert run.summary["train/loss"] == pytest.approx(1 / 3)
    assert run.summary["eval/correction_rate"] == 0.4


def test_wandb_resumed_run_continues_the_same_run_id(wandb_env):
    run_dir = wandb_env / "run"
    cfg = MetricsConfig(wandb_mode="offline", wandb_project="t")
    first = WandbSink(cfg, run_dir, {"seed": 0})
    first.log({"train/loss": 2.0}, step=1)
    first.close()
    second = WandbSink(cfg, run_dir, {"seed": 0}, resume_id=first.run_id)
    assert second.run_id == first.run_id
    second.log({"train/loss": 1.0}, step=2)
    second.close()
    (run,) = read_offline_runs(run_dir)
    assert len(run.files) == 2
    assert [(r["step"], r["train/loss"]) for r in run.history] == [(1, 2.0), (2, 1.0)]


def test_wandb_table_is_recorded(wandb_env):
    run_dir = wandb_env / "run"
    sink = WandbSink(MetricsConfig(wandb_mode="offline"), run_dir, {})
    sink.log_table("corrections", ["prompt", "y", "y_prime"], [["1+1=", "3", "2"]], step=5)
    sink.close()
    (row,) = read_offline_run(run_dir)
    assert row["step"] == 5 and row["corrections"]["_type"] == "table-file"
    assert row["corrections"]["nrows"] == 1
    (table_file,) = (run_dir / "wandb").glob("offline-run-*/files/" + row["corrections"]["path"])
    assert json.loads(table_file.read_text())["data"] == [["1+1=", "3", "2"]]


def test_wandb_disabled_mode_writes_nothing(wandb_env):
    run_dir = wandb_env / "run"
    sink = WandbSink(MetricsConfig(wandb_mode="disabled"), run_dir, {})
    sink.log({"train/loss": 1.0}, step=1)
    sink.close()
    assert read_offline_runs(run_dir) == []


def test_reader_rejects_a_foreign_file(tmp_path):
    bad = tmp_path / "wandb" / "offline-run-20260101_000000-abc" / "run-abc.wandb"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_offline_run(tmp_path)
