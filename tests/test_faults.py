"""Faults in the Ray system (real actors on the shared ``ray_local`` instance):

* a weight sync that hangs (fault drill ``sync.inject_load_delay_s``) stops the run within its
  timeout with a readable ``SyncTimeout`` and a checkpoint at the current step, from which a
  resumed run reaches ``total_steps``;
* a rollout actor and a teacher actor killed by pid mid-run are restarted by Ray, the run
  finishes, and the restarts are counted in the metrics.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from correction_rl.checkpoint import latest_valid
from correction_rl.metrics import read_jsonl_metrics
from correction_rl.sync import SyncTimeout

from test_distributed import system_config

pytestmark = pytest.mark.slow


def test_a_hung_weight_sync_stops_the_run_with_a_checkpoint_then_resumes(tmp_path, ray_local, tiny_model_dir):
    from correction_rl.distributed.driver import run

    hang = dict(mode="sync", total_steps=3, eval__every_steps=0, checkpoint__every_steps=0,
                metrics__wandb_mode="disabled", sync__timeout_s=5, sync__inject_load_delay_s=300,
                learner__zero_stage=2)
    cfg = system_config(tmp_path, tiny_model_dir, "hang", **hang)
    start = time.monotonic()
    with pytest.raises(SyncTimeout) as err:
        run(cfg)
    elapsed = time.monotonic() - start
    assert elapsed < 150, elapsed  # the worker sleeps 300 s: the run did not wait for it
    exc = err.value
    assert exc.version == 1 and 0 < exc.timeout_s <= 5
    assert "load_weights on rollout workers [0]" in str(exc)
    notes = " ".join(getattr(exc, "__notes__", []))
    assert "checkpoint written at step 1" in notes and "--resume" in notes

    ck, rejected = latest_valid(cfg.run_dir)
    assert ck is not None and ck.step == 1 and not rejected
    assert (ck.path / "learner" / "deepspeed" / "state").is_dir()  # DeepSpeed's own checkpoint
    assert len(ck.state["rollout_workers"]) == 1 and ck.state["buffer"]["learner_version"] == 1

    # the checkpoint is usable: the same run, drill off, resumes at step 1 and finishes
    ok = system_config(tmp_path, tiny_model_dir, "hang", **{**hang, "sync__inject_load_delay_s": 0.0})
    result = run(ok)
    assert result.steps == 3
    rows = [r for r in read_jsonl_metrics(ok.run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 3]  # step 1's row was never logged: its sync failed
    assert rows[0]["resume/from_step"] == 1
    assert latest_valid(ok.run_dir)[0].step == 3


def _descends_from_us(pid: int) -> bool:
    """Only this test session's Ray (started by this process) counts, not another one's."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _alive_pid(class_name: str) -> int:
    """The process of the one live actor of ``class_name``: Ray titles actor processes
    ``ray::<Class>.<method>`` (the state API needs the dashboard, which ``ray_local`` leaves off)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(f"ray::{class_name}") and _descends_from_us(int(proc.name)):
            pids.append(int(proc.name))
    assert len(pids) == 1, pids
    return pids[0]


def test_killed_rollout_and_teacher_actors_restart_and_the_run_finishes(tmp_path, ray_local, tiny_model_dir):
    from correction_rl.distributed.driver import run

    cfg = system_config(tmp_path, tiny_model_dir, "restarts", total_steps=10, eval__every_steps=0,
                        checkpoint__every_steps=0, metrics__wandb_mode="disabled",
                        learner__backend="torch", resources__max_actor_restarts=2,
                        resources__call_timeout_s=120)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run(cfg)), daemon=True)
    thread.start()
    metrics = cfg.run_dir / "metrics.jsonl"

    def wait_step(k: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and thread.is_alive():
            if metrics.exists() and any(r.get("step", 0) >= k and "train/loss" in r for r in read_jsonl_metrics(metrics)):
                return
            time.sleep(0.2)
        pytest.fail(f"step {k} not reached (thread alive: {thread.is_alive()})")

    wait_step(2)
    rollout_pid = _alive_pid("RolloutWorker")
    os.kill(rollout_pid, signal.SIGKILL)
    wait_step(5)
    teacher_pid = _alive_pid("TeacherWorker")
    os.kill(teacher_pid, signal.SIGKILL)
    thread.join(400)
    assert not thread.is_alive()
    assert outcome["result"].steps == cfg.total_steps
    rows = [r for r in read_jsonl_metrics(metrics) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, cfg.total_steps + 1))
    last = rows[-1]
    assert last["faults/rollout_restarts"] == 1
    assert last["faults/teacher_restarts"] == 1
    assert last["faults/producer_restarts"] >= 1
    # the restarted rollout worker serves the learner's policy again
    assert last["rollout/worker0/version"] == cfg.total_steps
