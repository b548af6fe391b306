"""Exact resume of a real run (``correction-rl train``, in-process and the Ray system in
``async`` mode, each starting its own local Ray) in a subprocess: SIGKILL mid-run, resume,
SIGTERM (graceful stop with a checkpoint), corrupt the newest checkpoint, resume again from the
previous one, reach ``total_steps``.

Checked on the files the runs leave: the step counter continues from each checkpoint, every
pair is in the correction log exactly once, the pairs the killed run logged after its checkpoint
went into the resumed buffer (not back to the teacher), the buffer state was restored, and the
W&B offline run is one run continued across the three processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from correction_rl.run.checkpoint import latest_valid, list_checkpoints
from correction_rl.buffer.correction_log import read
from correction_rl.observe.metrics import read_jsonl_metrics, read_offline_runs

pytestmark = pytest.mark.slow
TOTAL = 16


def _config(tmp_path: Path, model_dir: Path, mode: str) -> Path:
    cfg = {
        "name": "resume", "output_dir": str(tmp_path / "runs"), "mode": mode, "seed": 0,
        "total_steps": TOTAL,
        "model": {"path": str(model_dir)},
        "task": {"names": ["addition"], "num_train": 400, "num_eval": 8},
        "rollout": {"engine": "hf", "batch_size": 8, "max_new_tokens": 6},
        "objective": {"form": "dpo", "beta": 0.1},
        "learner": {"backend": "torch", "lr": 1e-4, "micro_batch_pairs": 4, "lr_schedule": "linear"},
        "buffer": {"min_fresh_pairs": 4, "max_staleness": 2},
        "eval": {"every_steps": 0, "num_prompts": 8, "sampled": False},
        "metrics": {"wandb_mode": "offline", "progress": "lines"},
        "checkpoint": {"every_steps": 2, "keep": 3},
        "resources": {"call_timeout_s": 240, "start_timeout_s": 400},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(args: list[str], tmp_path: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / f"{tag}.stderr"
    # Each run gets its own W&B service: wandb exports WANDB_SERVICE in a process that started
    # one (an earlier test in this session), and a child connected to it would find the
    # SIGKILLed run's id still "in use" there on resume.
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "RAY_ADDRESS")}
    env.update(TOKENIZERS_PARALLELISM="false", WANDB_SILENT="true", CRL_TEST_JOB=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "correction_rl.cli", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"), env=env)
    return proc, err


def _wait_for(cond, proc: subprocess.Popen, err: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before the condition:\n{err.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"condition not met within {timeout} s:\n{err.read_text()[-3000:]}")


def _sigkill_when(cond, proc: subprocess.Popen, err: Path, timeout: float) -> None:
    """SIGKILL the run at a moment ``cond`` holds. The run is frozen (SIGSTOP) and ``cond``
    checked again before the kill: a checkpoint written between a check and the kill would
    cover the pairs the check saw after the old one (seen in CI: "0 pairs logged after it")."""
    deadline = time.monotonic() + timeout
    while True:
        _wait_for(cond, proc, err, timeout=max(1.0, deadline - time.monotonic()))
        proc.send_signal(signal.SIGSTOP)
        if cond():
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            return
        proc.send_signal(signal.SIGCONT)


def _kill_job_leftovers(tmp_path: Path) -> None:
    """After SIGKILLing a Ray driver: its local Ray dies with it (Ray's fate sharing), but do
    not rely on that in a test — kill any process that still carries this job's marker."""
    marker = f"CRL_TEST_JOB={tmp_path}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass


def _log_records(path: Path) -> int:
    return sum(1 for _ in read(path)) if path.exists() else 0


def _killable(run_dir: Path):
    """A checkpoint at step >= 2, < TOTAL - 2, with pairs logged after it."""
    def cond():
        ck, _ = latest_valid(run_dir)
        if ck is None or not (2 <= ck.step < TOTAL - 2):
            return None
        return ck if _log_records(run_dir / "corrections.jsonl") > ck.state["buffer"]["log_records"] else None
    return cond


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.parametrize("mode", ["inprocess", "async"])
def test_sigkill_resume_sigterm_corrupt_resume_reaches_total_steps(tmp_path, tiny_model_dir, mode):
    config = _config(tmp_path, tiny_model_dir, mode)
    run_dir = tmp_path / "runs" / "resume"
    log_path = run_dir / "corrections.jsonl"

    # 1. SIGKILL after a checkpoint, with teacher work logged after it
    proc, err = _start(["--config", str(config)], tmp_path, "a")
    _sigkill_when(_killable(run_dir), proc, err, timeout=240)
    _kill_job_leftovers(tmp_path)
    ck_a, _ = latest_valid(run_dir)
    logged_after_a = _log_records(log_path) - ck_a.state["buffer"]["log_records"]
    steps_a = [r["step"] for r in _train_rows(run_dir)]
    assert steps_a[-1] >= ck_a.step and steps_a[-1] < TOTAL

    # 2. resume; SIGTERM once it has checkpointed past step ck_a: graceful stop + checkpoint
    proc, err = _start(["--resume", str(run_dir)], tmp_path, "b")
    _wait_for(lambda: len(_train_rows(run_dir)) > len(steps_a) + 2, proc, err, timeout=240)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(120)
    stderr_b = err.read_text()
    assert rc == 128 + 15, stderr_b[-3000:]
    assert f"resumed from {ck_a.path} at step {ck_a.step}" in stderr_b
    rows_b = _train_rows(run_dir)[len(steps_a):]
    assert [r["step"] for r in rows_b] == list(range(ck_a.step + 1, ck_a.step + 1 + len(rows_b)))
    first = rows_b[0]
    assert first["resume/from_step"] == ck_a.step
    # the killed run's post-checkpoint corrections were admitted from the log, not re-requested
    assert first["resume/pairs_logged_after_checkpoint"] == logged_after_a
    assert first["resume/buffer_size"] == len(ck_a.state["buffer"]["entries"]) + first["resume/pairs_admitted_after_checkpoint"]
    assert first["resume/buffer_size"] > 0
    stop_step = rows_b[-1]["step"]
    assert f"SIGTERM: stopped after learner step {stop_step}" in stderr_b
    ck_b, _ = latest_valid(run_dir)
    assert ck_b.step == stop_step and stop_step < TOTAL
    assert rows_b[-1]["checkpoint/step"] == stop_step

    # 3. corrupt the newest checkpoint: reported, the previous one is used
    previous = [p for p in list_checkpoints(run_dir) if p != ck_b.path][-1]
    blob = ck_b.path / "learner" / "learner.pt"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    proc, err = _start(["--resume", str(run_dir)], tmp_path, "c")
    rc = proc.wait(300)
    stderr_c = err.read_text()
    assert rc == 0, stderr_c[-3000:]
    assert f"skipping unusable checkpoint {ck_b.path}" in stderr_c and "SHA-256 differs" in stderr_c
    prev_step = int(previous.name.split("-")[1])
    assert f"resumed from {previous} at step {prev_step}" in stderr_c

    # the step counter: each session continues from its checkpoint and the run reaches TOTAL
    rows = _train_rows(run_dir)
    rows_c = rows[len(steps_a) + len(rows_b):]
    assert [r["step"] for r in rows_c] == list(range(prev_step + 1, TOTAL + 1))
    assert rows_c[-1]["train/lr"] == pytest.approx(0.0)  # linear schedule ran to its end
    assert json.loads((run_dir / "eval_after.json").read_text())
    assert latest_valid(run_dir)[0].step == TOTAL

    # every pair in the correction log exactly once (raw lines, not the deduplicating reader)
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    ids = [r["pair"]["pair_id"] for r in records if r["type"] == "pair"]
    assert len(ids) == _log_records(log_path)
    assert ids and not [i for i, n in Counter(ids).items() if n > 1]
    # ... and no prompt went to the teacher twice: prompts whose pairs were logged after a
    # checkpoint are not drawn again by the resumed run, prompts in flight at it are drawn again
    # (the three sessions draw far fewer than the 400 training prompts: a repeat is a resume bug)
    prompts = [r["pair"]["prompt_id"] for r in records if r["type"] == "pair"]
    assert len(prompts) < 200 and not [p for p, n in Counter(prompts).items() if n > 1]

    # one W&B run, continued by the two resumed processes
    runs = read_offline_runs(run_dir)
    assert len(runs) == 1 and len(runs[0].files) == 3
    assert runs[0].run_id == ck_a.state["wandb_run_id"]
    wandb_steps = [h["step"] for h in runs[0].history if "train/loss" in h]
    assert wandb_steps[-1] == TOTAL
