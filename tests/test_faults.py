"""Faults in the Ray system (real actors on the shared ``ray_local`` instance):

* a weight sync that hangs (fault drill ``CORRECTION_RL_DRILL_LOAD_DELAY_S``) stops the run within its
  timeout with a readable ``SyncTimeout`` and a checkpoint at the current step, from which a
  resumed run reaches ``total_steps``;
* a rollout actor and a teacher actor killed by pid mid-run are restarted by Ray, the run
  finishes, the restarts are counted in the metrics, and the restarted rollout worker continued
  its prompt stream (no prompt drawn twice);
* a dead learner rank stops the run at once with an error naming the checkpoint a resume uses;
* a vLLM engine whose engine-core process dies is found by the health check, its rollout actor
  replaced, and the run finishes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from correction_rl.run.checkpoint import latest_valid
from correction_rl.buffer.correction_log import read
from correction_rl.observe.metrics import read_jsonl_metrics
from correction_rl.weights.sync import SyncTimeout

from test_distributed import system_config

pytestmark = pytest.mark.slow


def test_a_hung_weight_sync_stops_the_run_with_a_checkpoint_then_resumes(tmp_path, ray_local, tiny_model_dir,
                                                                         monkeypatch):
    from correction_rl.distributed.actors import DRILL_LOAD_DELAY_ENV
    from correction_rl.distributed.driver import run

    hang = dict(mode="sync", total_steps=3, eval__every_steps=0, checkpoint__every_steps=0,
                metrics__wandb_mode="disabled", sync__timeout_s=5, learner__zero_stage=2)
    cfg = system_config(tmp_path, tiny_model_dir, "hang", **hang)
    monkeypatch.setenv(DRILL_LOAD_DELAY_ENV, "300")  # the drill hook, handed to the rollout actors
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
    assert len(ck.state["streams"]) == 1 and ck.state["buffer"]["learner_version"] == 1

    # the checkpoint is usable: the same run, drill off, resumes at step 1 and finishes
    monkeypatch.delenv(DRILL_LOAD_DELAY_ENV)
    ok = system_config(tmp_path, tiny_model_dir, "hang", **hang)
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


def _children(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(proc.name))
    return out


def _run_in_thread(cfg):
    from correction_rl.distributed.driver import run

    outcome: dict = {}

    def target():
        try:
            outcome["result"] = run(cfg)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def _wait_step(cfg, thread, k: int, timeout: float = 300) -> None:
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        if metrics.exists() and any(r.get("step", 0) >= k and "train/loss" in r for r in read_jsonl_metrics(metrics)):
            return
        time.sleep(0.2)
    pytest.fail(f"step {k} not reached (thread alive: {thread.is_alive()})")


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_killed_rollout_and_teacher_actors_restart_and_the_run_finishes(tmp_path, ray_local, tiny_model_dir, mode):
    cfg = system_config(tmp_path, tiny_model_dir, "restarts", mode=mode, total_steps=10, eval__every_steps=0,
                        checkpoint__every_steps=0, metrics__wandb_mode="disabled",
                        learner__backend="torch", resources__max_actor_restarts=2,
                        resources__call_timeout_s=120)
    thread, outcome = _run_in_thread(cfg)
    metrics = cfg.run_dir / "metrics.jsonl"
    _wait_step(cfg, thread, 2)
    os.kill(_alive_pid("RolloutWorker"), signal.SIGKILL)
    _wait_step(cfg, thread, 5)
    os.kill(_alive_pid("TeacherWorker"), signal.SIGKILL)
    thread.join(400)
    assert not thread.is_alive()
    assert "result" in outcome, outcome
    assert outcome["result"].steps == cfg.total_steps
    rows = [r for r in read_jsonl_metrics(metrics) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, cfg.total_steps + 1))
    last = rows[-1]
    assert last["faults/rollout_restarts"] == 1
    assert last["faults/teacher_restarts"] == 1
    if mode == "async":  # sync mode has no producer tasks: it repeats the lost batch
        assert last["faults/producer_restarts"] >= 1
    # the restarted rollout worker serves the learner's policy again
    assert last["rollout/worker0/version"] == cfg.total_steps
    # ... and continued its prompt stream where its predecessor handed off its last batch: a
    # restart from the beginning of the stream would draw the first prompts a second time
    assert last["faults/streams_restored"] == 1
    prompt_ids = [p.prompt_id for p in read(cfg.run_dir / "corrections.jsonl")]
    assert len(prompt_ids) > 3 * cfg.rollout.batch_size
    assert len(set(prompt_ids)) == len(prompt_ids), "a prompt was drawn twice"


def _busy_title(class_name: str, method: str, timeout: float = 60) -> int:
    """Wait until the one live ``class_name`` actor runs ``method`` (Ray titles the process
    ``ray::<Class>.<method>`` while it does); its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _alive_pid(class_name)
        try:
            if f"{class_name}.{method}" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return pid
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{class_name} did not run {method} within {timeout:.0f} s")


def test_a_teacher_killed_with_a_dead_producers_batch_does_not_stall_the_run(tmp_path, ray_local, tiny_model_dir,
                                                                            monkeypatch):
    """The CI failure of 2026-11-30: the rollout worker and the teacher die together while the
    teacher corrects a batch of that worker's producer. Nobody is left to retry the call, so the
    batch stays in the hand-off ledger, its prompts hold the producers' room, and the restarted
    producer waited for room until the run stopped as stalled. Now a restarted producer's
    batches still in flight are drawn again (``HandoffLedger.requeue``)."""
    from correction_rl.distributed.actors import DRILL_TEACHER_DELAY_ENV

    monkeypatch.setenv(DRILL_TEACHER_DELAY_ENV, "1.5")  # the teacher holds each batch 1.5 s: the window
    cfg = system_config(tmp_path, tiny_model_dir, "lostbatch", total_steps=8, eval__every_steps=0,
                        checkpoint__every_steps=0, metrics__wandb_mode="disabled",
                        learner__backend="torch", resources__max_actor_restarts=2,
                        resources__call_timeout_s=60)
    thread, outcome = _run_in_thread(cfg)
    _wait_step(cfg, thread, 2)
    teacher = _busy_title("TeacherWorker", "correct_and_store")
    os.kill(_alive_pid("RolloutWorker"), signal.SIGKILL)  # the batch's producer, then its teacher
    os.kill(teacher, signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive()
    assert "result" in outcome, outcome
    rows = [r for r in read_jsonl_metrics(cfg.run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, cfg.total_steps + 1))
    last = rows[-1]
    assert last["faults/rollout_restarts"] == 1 and last["faults/teacher_restarts"] == 1
    assert last["faults/prompts_requeued"] >= cfg.rollout.batch_size  # the batch the teacher held
    prompt_ids = [p.prompt_id for p in read(cfg.run_dir / "corrections.jsonl")]
    assert len(set(prompt_ids)) == len(prompt_ids), "a prompt was drawn twice"


def test_a_dead_learner_rank_stops_the_run_naming_the_checkpoint_to_resume_from(tmp_path, ray_local, tiny_model_dir):
    cfg = system_config(tmp_path, tiny_model_dir, "deadrank", total_steps=40, eval__every_steps=0,
                        checkpoint__every_steps=2, metrics__wandb_mode="disabled", learner__backend="torch",
                        resources__call_timeout_s=120)
    thread, outcome = _run_in_thread(cfg)
    _wait_step(cfg, thread, 3)
    killed_at = time.monotonic()
    os.kill(_alive_pid("LearnerRank"), signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive(), "the run did not stop after its learner rank died"
    assert time.monotonic() - killed_at < 60  # the dead rank is noticed at its next call, not at a timeout
    import ray

    exc = outcome.get("error")
    assert isinstance(exc, ray.exceptions.RayActorError), outcome
    ck, _ = latest_valid(cfg.run_dir)
    assert ck is not None and ck.step >= 2
    notes = " ".join(getattr(exc, "__notes__", []))
    assert f"a resume will use {ck.path} (step {ck.step})" in notes, notes


def test_a_dead_vllm_engine_is_replaced_by_the_health_check(tmp_path, ray_local, tiny_model_dir):
    pytest.importorskip("vllm")
    cfg = system_config(tmp_path, tiny_model_dir, "deadengine", total_steps=6, rollout__engine="vllm",
                        eval__every_steps=0, eval__sampled=False, checkpoint__every_steps=0,
                        metrics__wandb_mode="disabled", learner__backend="torch", resources__call_timeout_s=300)
    thread, outcome = _run_in_thread(cfg)
    _wait_step(cfg, thread, 2)
    worker = _alive_pid("RolloutWorker")
    engine = _children(worker)  # vLLM's engine-core process (and its helpers)
    assert engine, "the vLLM engine has no child process"
    for pid in engine:
        os.kill(pid, signal.SIGKILL)
    thread.join(600)
    assert not thread.is_alive()
    assert "result" in outcome, outcome
    assert outcome["result"].steps == cfg.total_steps
    last = [r for r in read_jsonl_metrics(cfg.run_dir / "metrics.jsonl") if "train/loss" in r][-1]
    assert last["faults/unhealthy_engines"] >= 1
    assert last["faults/rollout_restarts"] >= 1
    assert last["rollout/worker0/version"] == cfg.total_steps  # the new engine got the weights
