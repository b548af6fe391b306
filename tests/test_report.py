"""A short real in-process run (warm-started tiny policy, W&B offline), then: the W&B run read
back (namespaced metrics, step metric, the corrections table with its HTML diffs), the report
command's plots and page, and the page rendered by headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from correction_rl.observe.diffs import TABLE_COLUMNS, TABLE_KEY
from correction_rl.observe.metrics import read_jsonl_metrics, read_offline_runs
from correction_rl.observe.report import PLOTS, load_run, sample_pairs

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
SCRIPT = '<script>document.body.setAttribute("data-pwned","1")</script>'


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, warm_policy_dir):
    """Four learner steps of the in-process loop with a corrections table every 2 steps."""
    from correction_rl.config import config_from_dict
    from correction_rl.run.inprocess import run

    root = tmp_path_factory.mktemp("report_run")
    cfg = config_from_dict({
        "name": "short", "output_dir": str(root), "mode": "inprocess", "total_steps": 4,
        "model": {"path": str(warm_policy_dir)},
        "task": {"names": ["addition"], "num_train": 200, "num_eval": 16},
        "rollout": {"engine": "hf", "batch_size": 16, "max_new_tokens": 6},
        "objective": {"form": "dpo", "beta": 0.1},
        "learner": {"backend": "torch", "lr": 1e-4, "micro_batch_pairs": 8},
        "buffer": {"min_fresh_pairs": 8, "max_staleness": 2},
        "eval": {"every_steps": 2, "num_prompts": 16},
        "metrics": {"wandb_mode": "offline", "table_every_steps": 2, "table_rows": 4, "progress": "lines"},
    })
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(var, str(root / "wandb-home"))
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        result = run(cfg)
    assert result.steps == 4
    return result.run_dir


def test_wandb_offline_run_has_namespaced_metrics_and_the_corrections_table(short_run):
    (run,) = read_offline_runs(short_run)
    assert run.complete
    assert {"glob_name": "*", "step_metric": "step", "name": ""} in run.metric_definitions
    assert run.config["objective"]["form"] == "dpo" and run.config["metrics"]["table_every_steps"] == 2
    logged = {key for row in run.history for key in row}
    for key in ("train/loss", "train/margin", "eval/greedy/correction_rate", "rollout/tokens_per_s",
                "teacher/pairs_per_s", "teacher/mean_edit_distance", "buffer/size",
                "buffer/last_batch_staleness_mean", "sync/seconds"):
        assert key in logged, f"{key} missing from the W&B offline run"
    assert {key.split("/")[0] for key in logged if "/" in key} <= {
        "train", "eval", "rollout", "teacher", "buffer", "sync", "system"}
    tables = [row for row in run.history if TABLE_KEY in row]
    assert [row["step"] for row in tables] == [2, 4]
    meta = tables[-1][TABLE_KEY]
    assert meta["_type"] == "table-file" and 1 <= meta["nrows"] <= 4
    # A table with media cells is written as a W&B artifact; offline, its files are staged in
    # the W&B cache directory until `wandb sync` (the run's own media/table file is a stub).
    (table, files) = logged_tables(run.files[0])[-1]
    assert table["columns"] == TABLE_COLUMNS and len(table["data"]) == meta["nrows"]
    for row in table["data"]:
        cell = dict(zip(TABLE_COLUMNS, row))
        assert cell["prompt"].endswith("=") and isinstance(cell["edit_distance"], int)
        assert cell["diff"]["_type"] == "html-file"
        diff = Path(files[cell["diff"]["path"]]).read_text()
        assert diff.startswith('<div class="crl-diff"')
        if cell["edit_distance"]:
            assert "<del" in diff or "<ins" in diff
        assert cell["policy_version"] <= 4


def logged_tables(wandb_file: Path) -> list[tuple[dict, dict[str, str]]]:
    """(table JSON, artifact path -> local file) of every table artifact in a ``.wandb`` file."""
    from correction_rl.observe.metrics import iter_wandb_records

    out = []
    for record in iter_wandb_records(wandb_file):
        if record.WhichOneof("record_type") != "artifact" or record.artifact.type != "run_table":
            continue
        files = {c.path: c.local_path for c in record.artifact.manifest.contents}
        (table_path,) = [p for p in files if p.endswith(".table.json")]
        out.append((json.loads(Path(files[table_path]).read_text()), files))
    return out


def test_report_command_writes_the_plots_and_the_page(short_run, tmp_path):
    from correction_rl.cli import main

    out = tmp_path / "report"
    assert main(["report", str(short_run), "--out", str(out), "--samples", "5"]) == 0
    np = pytest.importorskip("numpy")
    from PIL import Image

    for spec in PLOTS:
        pixels = np.asarray(Image.open(out / spec.filename).convert("L"), dtype=float)
        assert pixels.shape[0] >= 300 and pixels.std() > 10, f"{spec.filename} looks blank"
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    assert "<script" not in page and "Content-Security-Policy" in page
    before = json.loads((short_run / "eval_before.json").read_text())["modes"]["greedy"]
    assert f"<td>{before['correction_rate']:.3f}</td>" in page  # the before/after table
    rows = read_jsonl_metrics(short_run / "metrics.jsonl")
    assert f"{sum(r.get('train/num_pairs', 0) for r in rows):.0f}</dd>" in page  # pairs trained
    data = load_run(short_run)
    shown = sample_pairs(data.pairs, 5)
    assert shown and page.count('<div class="crl-diff"') == len(shown)


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_page_escapes_responses_and_renders_in_headless_chromium(short_run, tmp_path):
    from correction_rl.buffer.correction_log import CorrectionLog
    from correction_rl.models import load_tokenizer
    from correction_rl.pairs.make import make_pair
    from correction_rl.observe.report import write_report
    from correction_rl.types import Correction, Prompt, Rollout

    # A copy of the real run whose log also holds a response that is an HTML script.
    run_dir = tmp_path / "run"
    shutil.copytree(short_run, run_dir, ignore=shutil.ignore_patterns("wandb", "policy"))
    tokenizer = load_tokenizer(json_model_path(run_dir))
    ids = tokenizer("1+1=")["input_ids"]
    y_ids = tokenizer(SCRIPT, add_special_tokens=False)["input_ids"]
    rollout = Rollout(Prompt("xss", "1+1=", "addition", "2"), ids, y_ids, SCRIPT, 99)
    with CorrectionLog(run_dir / "corrections.jsonl") as log:
        log.append([make_pair(Correction(rollout, "2", "oracle"), tokenizer)])
    report = write_report(run_dir, samples=4)
    page = report.page.read_text()
    assert "<script" not in page
    assert "&lt;script&gt;document.body.setAttribute(&quot;data-pwned&quot;" in page

    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the page "
                    "was checked as text only")
    profile = tmp_path / "chromium-profile"
    url = report.page.resolve().as_uri()
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "data-pwned" not in dom.stdout.split("<body")[1].split(">")[0]  # the script never ran
    assert "<script" not in dom.stdout and "Sample of corrections" in dom.stdout
    shot = tmp_path / "page.png"
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2400",
                           f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 20, "the screenshot is blank"
    assert (pixels < 200).mean() > 0.02, "almost nothing was drawn on the page"


def json_model_path(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["path"]


def _glue_a_torn_line(metrics: Path, lineno: int) -> None:
    """What a run killed mid-write and resumed left before the sink repaired tails: line
    ``lineno`` cut short, and the resumed run's first record appended straight onto it."""
    lines = metrics.read_text().splitlines(keepends=True)
    lines[lineno - 1] = lines[lineno - 1][:15] + lines[lineno]
    del lines[lineno]
    metrics.write_text("".join(lines))


def test_report_skips_and_counts_a_torn_metrics_line(short_run, tmp_path, capsys):
    from correction_rl.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(short_run, run_dir, ignore=shutil.ignore_patterns("wandb", "report"))
    total = len(read_jsonl_metrics(run_dir / "metrics.jsonl"))
    bad = total // 2
    _glue_a_torn_line(run_dir / "metrics.jsonl", bad)
    with pytest.raises(ValueError, match=f"metrics.jsonl:{bad}: not a JSON metrics record"):
        read_jsonl_metrics(run_dir / "metrics.jsonl")  # what the report used to die of
    assert main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"skipped 1 line(s) that are not a JSON metrics record (line {bad})" in err
    assert "Traceback" not in err
    data = load_run(run_dir)
    assert data.skipped_metric_lines == [bad] and len(data.metrics) == total - 2
    assert f"(line {bad})" in (tmp_path / "out" / "index.html").read_text()


def test_report_of_a_run_directory_with_only_a_damaged_metrics_file(tmp_path):
    """No fixture run: the reader alone, on a file whose middle line is not JSON and whose last
    line is partial, next to a config.yaml that is not YAML."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [json.dumps({"step": s, "time": float(s), "train/loss": 0.5}) for s in range(1, 5)]
    (run_dir / "metrics.jsonl").write_text("\n".join([rows[0], rows[1][:9] + rows[2], rows[3], rows[3][:5]]))
    (run_dir / "config.yaml").write_text("name: [unclosed\n")
    data = load_run(run_dir)
    assert [r["step"] for r in data.metrics] == [1, 4] and data.skipped_metric_lines == [2]
    assert any("partial final record" in n for n in data.notes)
    assert any(n.startswith("config.yaml: not readable YAML") for n in data.notes) and data.config == {}
