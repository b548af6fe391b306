"""Checkpoint files: atomic save, retention, corruption/partial detection with fallback, the
config-compatibility check, and an exact learner resume (torch and DeepSpeed backends)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from correction_rl.run.checkpoint import (
    CheckpointError,
    ConfigMismatch,
    check_compatible,
    config_diffs,
    latest_valid,
    list_checkpoints,
    save_checkpoint,
    verify,
)
from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig, RunConfig, config_from_dict, to_dict
from correction_rl.learner.learner import Learner
from correction_rl.models import build_model

from test_learner import PAIRS, TOKENIZER

CFG = to_dict(RunConfig())


def _save(run_dir, step, payload=b"x" * 1000, keep=3):
    def files(d):
        (d / "learner").mkdir()
        (d / "learner" / "blob.bin").write_bytes(payload)

    return save_checkpoint(run_dir, step, {"hello": step}, CFG, write_files=files, keep=keep)


def test_save_verify_and_retention(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000006", "step-00000008"]
    ck = verify(list_checkpoints(tmp_path)[-1])
    assert ck.step == 8 and ck.state["hello"] == 8 and ck.config == CFG
    manifest = json.loads((ck.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"state.json", "config.yaml", "learner/blob.bin"}
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_dead_writers_temporary_directory_is_ignored_and_cleaned(tmp_path):
    _save(tmp_path, 2)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / "checkpoints" / f".tmp-step-00000004-{proc.stdout.strip()}"
    dead.mkdir()
    (dead / "state.json").write_text("{partial")
    ck, rejected = latest_valid(tmp_path)
    assert ck.step == 2 and not rejected
    _save(tmp_path, 4)
    assert not dead.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest", "extra_file", "missing_file"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    blob = newest / "learner" / "blob.bin"
    if damage == "flip":
        data = bytearray(blob.read_bytes())
        data[500] ^= 0xFF
        blob.write_bytes(bytes(data))
        expect = "SHA-256 differs"
    elif damage == "truncate":
        blob.write_bytes(blob.read_bytes()[:10])
        expect = "10 bytes, the manifest says 1000"
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
        expect = "partial checkpoint"
    elif damage == "extra_file":
        (newest / "learner" / "stray.pt").write_bytes(b"?")
        expect = "not in the manifest: ['learner/stray.pt']"
    else:
        blob.unlink()
        expect = "missing: ['learner/blob.bin']"
    ck, rejected = latest_valid(tmp_path)
    assert ck is not None and ck.step == 2
    assert [r.path for r in rejected] == [newest]
    assert expect in rejected[0].reason
    with pytest.raises(CheckpointError, match="step-00000004"):
        verify(newest)


def test_config_mismatch_names_the_breaking_fields_only(tmp_path):
    ck = verify(_save(tmp_path, 2))
    ok = config_from_dict({"total_steps": 999, "metrics": {"wandb_mode": "disabled"},
                           "sync": {"timeout_s": 5}, "checkpoint": {"every_steps": 3}})
    check_compatible(ck, to_dict(ok))  # safe changes pass
    bad = config_from_dict({"seed": 7, "learner": {"zero_stage": 2, "lr": 0.5},
                            "objective": {"form": "ipo"}, "task": {"names": ["sorting"]}})
    assert set(config_diffs(ck.config, to_dict(bad))) == {
        "seed", "learner.zero_stage", "learner.lr", "objective.form", "task.names"}
    with pytest.raises(ConfigMismatch) as err:
        check_compatible(ck, to_dict(bad))
    msg = str(err.value)
    assert "learner.zero_stage: checkpoint 0 != now 2" in msg and "objective.form" in msg
    assert str(ck.path) in msg


def _learner(backend: str, stage: int = 0) -> Learner:
    return Learner(
        build_model("tiny", seed=0),
        pad_id=TOKENIZER.pad_token_id,
        learner_cfg=LearnerConfig(backend=backend, zero_stage=stage, lr=1e-3, micro_batch_pairs=8,
                                  grad_accum=2, lr_schedule="linear", warmup_steps=2),
        objective_cfg=ObjectiveConfig(form="logistic"),
        model_cfg=ModelConfig(),
        total_steps=10,
    )


def _weights(learner):
    return {n: t.detach().clone() for n, t in learner.named_weights()}


@pytest.mark.parametrize("backend,stage", [("torch", 0), pytest.param("deepspeed", 2, marks=pytest.mark.slow)])
def test_learner_state_resumes_exactly(tmp_path, backend, stage):
    """Train 3 steps, save, train 2 more; a fresh learner loaded from the save and trained the
    same 2 steps ends with the same weights, LR, version and counters (optimizer moments and
    the LR schedule were restored, not restarted)."""
    a = _learner(backend, stage)
    for _ in range(3):
        a.train_step(PAIRS)
    a.save_state(tmp_path / "learner")
    tail_a = [a.train_step(PAIRS) for _ in range(2)]
    b = _learner(backend, stage)
    before = _weights(b)
    b.load_state(tmp_path / "learner")
    assert b.version == 3
    tail_b = [b.train_step(PAIRS) for _ in range(2)]
    wa, wb = _weights(a), _weights(b)
    assert max((wa[n] - before[n]).abs().max().item() for n in wa) > 1e-3
    assert max((wa[n] - wb[n]).abs().max().item() for n in wa) < 1e-6
    assert [s.lr for s in tail_a] == pytest.approx([s.lr for s in tail_b])
    assert [s.loss for s in tail_a] == pytest.approx([s.loss for s in tail_b], rel=1e-5)
    assert b.version == 5 and b.counters == a.counters
