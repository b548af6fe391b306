"""A real in-process run with LoRA survives SIGKILL, SIGTERM and a corrupt newest checkpoint
exactly like a full fine-tune (issue 18): ``tests/test_resume.py``'s scenario, unchanged, on a
config with ``learner.lora.enabled`` (the checkpoint's learner state is then the adapter and its
AdamW moments). ``slow`` (~1-2 min)."""

from __future__ import annotations

import pytest
import yaml

import test_resume

pytestmark = pytest.mark.slow


def test_lora_run_kill_resume_corrupt_resume_reaches_total_steps(tmp_path, tiny_model_dir, monkeypatch):
    plain = test_resume._config

    def with_lora(tmp, model_dir, mode):
        path = plain(tmp, model_dir, mode)
        cfg = yaml.safe_load(path.read_text())
        cfg["learner"]["lora"] = {"enabled": True, "rank": 4, "alpha": 8.0}
        path.write_text(yaml.safe_dump(cfg))
        return path

    monkeypatch.setattr(test_resume, "_config", with_lora)
    test_resume.test_sigkill_resume_sigterm_corrupt_resume_reaches_total_steps(tmp_path, tiny_model_dir, "inprocess")
    saved = yaml.safe_load((tmp_path / "runs" / "resume" / "config.yaml").read_text())
    assert saved["learner"]["lora"]["enabled"] is True
