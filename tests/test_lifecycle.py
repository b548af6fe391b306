"""The shared run lifecycle (``run/lifecycle.py``), on real in-process runs: issue 16's
reproductions of a run directory damaged by a second ``train``, a resume that did not fall back
past an unrestorable checkpoint, and ``checkpoint.resume: never`` mixing two runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from correction_rl.buffer.correction_log import read
from correction_rl.config import load_config
from correction_rl.observe.metrics import read_jsonl_metrics
from correction_rl.run.checkpoint import CheckpointError, list_checkpoints, save_checkpoint, verify
from correction_rl.run.directory import RunDirectory, RunDirectoryError
from correction_rl.run.lifecycle import RunState, find_checkpoints, run_session
from correction_rl.cli import main


def cli(argv: list[str]) -> int:
    """``correction-rl train ARGV`` in this process, through the entry point that turns expected
    failures into one ``error:`` line and exit code 2."""
    return main(["train", *argv])


STEPS = 4


def _write_config(path: Path, model_dir: Path, output_dir: Path, name: str = "life", **extra) -> Path:
    cfg = {
        "name": name, "output_dir": str(output_dir), "mode": "inprocess", "seed": 0, "total_steps": STEPS,
        "model": {"path": str(model_dir)},
        "task": {"names": ["addition"], "num_train": 200, "num_eval": 4},
        "rollout": {"engine": "hf", "batch_size": 8, "max_new_tokens": 6},
        "objective": {"form": "dpo", "beta": 0.1},
        "learner": {"backend": "torch", "lr": 1e-4, "micro_batch_pairs": 2, "grad_accum": 1},
        "buffer": {"min_fresh_pairs": 2, "max_staleness": 2},
        "eval": {"every_steps": 0, "num_prompts": 4, "sampled": False},
        "metrics": {"wandb_mode": "disabled", "progress": "lines"},
        "checkpoint": {"every_steps": 2, "keep": 3},
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One real 4-step in-process run with checkpoints at steps 2 and 4 (copied by each test)."""
    root = tmp_path_factory.mktemp("lifecycle")
    config = _write_config(root / "run.yaml", tiny_model_dir, root / "runs")
    assert cli(["--config", str(config)]) == 0
    run_dir = root / "runs" / "life"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, dest)
    return dest


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# -- issue 16 item 1: the lock comes first ------------------------------------------------------

def test_a_second_train_on_a_live_run_directory_fails_before_writing_anything(tiny_model_dir, tmp_path, capsys):
    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "runs", name="conc")
    run_dir = tmp_path / "runs" / "conc"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    first = subprocess.Popen([sys.executable, "-m", "correction_rl.cli", "train", "--config", str(config),
                              "--total_steps", "14"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "eval_before.json").exists():  # the first run is past its start
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["total_steps"] == 14
        before = _snapshot(run_dir)
        capsys.readouterr()
        rc = cli(["--config", str(config), "--total_steps", "99"])
        err = capsys.readouterr().err
        assert rc == 2
        assert "in use by another train" in err and f"pid {first.pid}" in err and len(err.strip().splitlines()) == 1
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["total_steps"] == 14
        assert (run_dir / "config.yaml").read_bytes() == before["config.yaml"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)


# -- issue 16 item 2: any unrestorable checkpoint falls back to the next older one -----------------

def test_resume_falls_back_when_the_newest_checkpoint_disagrees_with_the_log(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    log = run_dir / "corrections.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])["pair"]["pair_id"]
    newest = verify(run_dir / "checkpoints" / "step-00000004")
    assert last in {pid for pid, _ in newest.state["buffer"]["entries"]}  # the repro's precondition
    log.write_bytes(b"".join(lines[:-1]))  # the torn tail of a SIGKILL, cut away
    capsys.readouterr()
    assert cli(["--resume", str(run_dir), "--total_steps", "6"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping unusable checkpoint")]
    assert len(warnings) == 1 and "step-00000004" in warnings[0] and "BufferStateError" in warnings[0]
    rows = read_jsonl_metrics(run_dir / "metrics.jsonl")
    assert [r["resume/from_step"] for r in rows if "resume/from_step" in r] == [2.0]
    assert max(r["step"] for r in rows if "train/loss" in r) == 6
    ids = [p.pair_id for p in read(log)]
    assert len(ids) == len(set(ids))


def test_a_manifest_of_the_wrong_shape_is_reported_and_skipped(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    manifest = run_dir / "checkpoints" / "step-00000004" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["files"]["state.json"] = 5
    manifest.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="wrong shape"):
        verify(manifest.parent)
    cfg = load_config(run_dir / "config.yaml", ["--output_dir", str(run_dir.parent)])
    capsys.readouterr()
    assert [c.step for c in find_checkpoints(cfg)] == [2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-00000004" in err[0] and "wrong shape" in err[0]


def test_a_state_of_the_wrong_shape_is_refused_naming_the_field(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"version": 3, "buffer": [], "streams": []}, {"seed": 0})
    with pytest.raises(CheckpointError, match="'buffer' is \\[\\], expected dict"):
        RunState.of(verify(path))
    ok = save_checkpoint(tmp_path, 4, RunState(version=4, buffer={}, streams=[None]).to_json(), {"seed": 0})
    assert RunState.of(verify(ok)) == RunState(version=4, buffer={}, streams=[None])


# -- issue 16 item 3: `resume: never` starts a clean run, or refuses ------------------------------

def test_resume_never_refuses_a_directory_holding_a_previous_run(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    before = _snapshot(run_dir)
    capsys.readouterr()
    rc = cli(["--config", str(run_dir / "config.yaml"), "--output_dir", str(run_dir.parent),
              "--checkpoint.resume", "never"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "holds a previous run" in err and "on_existing=overwrite or move_aside" in err
    assert _snapshot(run_dir) == before  # nothing written, config.yaml included


def test_resume_never_with_move_aside_starts_a_clean_run(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    old = _snapshot(run_dir)
    capsys.readouterr()
    rc = cli(["--config", str(run_dir / "config.yaml"), "--output_dir", str(run_dir.parent),
              "--checkpoint.resume", "never", "--checkpoint.on_existing", "move_aside", "--total_steps", "2"])
    err = capsys.readouterr().err
    assert rc == 0
    aside = [p for p in run_dir.parent.iterdir() if p.name.startswith("life.old-")]
    assert len(aside) == 1 and f"moved the previous run's files from {run_dir} to {aside[0]}" in err
    assert _snapshot(aside[0]) == old  # kept whole
    rows = read_jsonl_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/greedy/accuracy" in r] == [0, 2]  # one step 0
    assert not any(r.get("resume/corrections_reused") or "resume/from_step" in r for r in rows)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002"]


def test_overwrite_deletes_the_previous_run_and_keeps_the_lock(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "x"
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    with RunDirectory.open(run_dir) as rd:
        assert rd.holds_data() and not rd.created
        rd.make_room("overwrite")
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
        assert "deleted the previous run's files" in capsys.readouterr().err
        with pytest.raises(RunDirectoryError, match="in use by another train"):
            RunDirectory.open(run_dir)
    RunDirectory.open(run_dir).release()  # released: free again


# -- issue 16 item 6: a failed train leaves no empty run directory ---------------------------------

def test_a_failed_start_leaves_no_run_directory_behind(tiny_model_dir, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("this is not json\n")
    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "runs", name="fails")
    cfg = load_config(config, ["--task.prompts_file", str(bad)])
    from correction_rl.run.inprocess import run

    with pytest.raises(Exception):
        run(cfg)
    assert not (tmp_path / "runs" / "fails").exists()

    def start(run_dir):
        raise RuntimeError("the driver could not start")

    existing = tmp_path / "runs" / "kept"
    existing.mkdir(parents=True)
    cfg = load_config(config, ["--name", "kept"])
    with pytest.raises(RuntimeError, match="could not start"):
        run_session(cfg, start)
    assert existing.is_dir()  # not created by this call: left where it was


# -- a failed resume or an interrupted move_aside loses nothing ----------------------------------

def test_a_resume_that_restores_no_checkpoint_leaves_the_runs_config_as_it_was(finished_run, tmp_path, capsys):
    """config.yaml is the base of the next ``--resume``: a resume that fails must not replace
    it with the overrides it was given (it is written only once a checkpoint restored)."""
    run_dir = _copy(finished_run, tmp_path)
    log = run_dir / "corrections.jsonl"
    log.write_bytes(log.read_bytes().splitlines(keepends=True)[0])  # the header: no pair of any checkpoint
    before = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    assert cli(["--resume", str(run_dir), "--total_steps", "9"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint could be restored (2 tried" in err
    assert (run_dir / "config.yaml").read_bytes() == before
    assert not (run_dir / "config.yaml.partial").exists()


def test_an_interrupted_move_aside_is_finished_by_the_next_start(tmp_path, capsys):
    """A kill in the middle of ``move_aside`` left some files in a ``.partial`` sibling and the
    rest in the run directory; the next start moves the rest into the SAME directory and only
    then gives it its final name, so the previous run is never split."""
    run_dir = tmp_path / "runs" / "x"
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    partial = tmp_path / "runs" / "x.old-20261130-060000.partial"
    partial.mkdir()
    (partial / "eval_before.json").write_text("{}")  # moved before the kill
    with RunDirectory.open(run_dir) as rd:
        rd.make_room("move_aside")
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    siblings = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert siblings == ["x", "x.old-20261130-060000"]
    aside = tmp_path / "runs" / "x.old-20261130-060000"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "eval_before.json", "metrics.jsonl"]
    assert "finished moving the previous run's files" in capsys.readouterr().err

    # killed after the last file moved but before the rename: the run directory looks empty,
    # and the next start (refusing by default) still finishes the move instead of leaving it
    partial = tmp_path / "runs" / "x.old-20261130-070000.partial"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"step": 0}\n')
    with RunDirectory.open(run_dir) as rd:
        rd.make_room("refuse")
    assert (tmp_path / "runs" / "x.old-20261130-070000" / "metrics.jsonl").exists() and not partial.exists()


def test_the_config_is_written_whole_or_not_at_all(tmp_path):
    from correction_rl.config import dump_config

    path = dump_config(load_config(None, ["--total_steps", "7"]), tmp_path / "config.yaml")
    assert yaml.safe_load(path.read_text())["total_steps"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # written aside, then renamed
