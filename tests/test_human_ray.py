"""The human teacher in the Ray modes: two teacher-worker actors build a ``HumanTeacher`` each
over the run's one SQLite queue; exactly one of them serves the web app, a scripted annotator
answers through the real HTTP API, and when the serving actor is killed mid-run the app comes
back on the same address (another worker, or the restarted one, takes the queue's lock) and the
run reaches ``total_steps`` with the people's corrections in its correction log."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import httpx
import pytest

from correction_rl.observe.metrics import read_jsonl_metrics
from correction_rl.teachers.human.host import lock_path, url_path

from test_distributed import system_config
from test_human_app import ALICE, BOB, _free_port, auth, scripted_annotator

pytestmark = pytest.mark.slow

# Teacher-worker actors read the tokens from *their* environment. Ray's workers inherit the
# environment of the process that started Ray (here: the session's ``ray_local``, started after
# collection), just as they inherit a variable exported in the shell that starts a real run.
TOKENS_ENV = "CRL_TEST_HUMAN_RAY_TOKENS"
os.environ.setdefault(TOKENS_ENV, f"alice={ALICE},bob={BOB}")


def lock_holder(lock_file) -> int | None:
    """The pid holding the ``flock`` on ``lock_file`` (from /proc/locks), if any."""
    if not lock_file.exists():
        return None
    inode = os.stat(lock_file).st_ino
    for line in open("/proc/locks"):
        parts = line.split()
        if "FLOCK" in parts and int(parts[-3].rsplit(":", 1)[1]) == inode:
            return int(parts[4] if parts[1] == "FLOCK" else parts[5])
    return None


def test_two_teacher_workers_share_one_app_that_survives_its_process(tmp_path, ray_local, tiny_model_dir):
    from correction_rl.buffer.correction_log import read
    from correction_rl.distributed.driver import run
    from correction_rl.models import load_tokenizer

    port = _free_port()
    cfg = system_config(
        tmp_path, tiny_model_dir, "human-ray", total_steps=8,
        task__num_train=200, task__num_eval=4, eval__every_steps=0, eval__num_prompts=4, eval__sampled=False,
        # max_pending bounds what the annotator can answer before it pauses after step 1: at most
        # 15 unsampled pairs (a batch of 8 is drawn while fewer than 8 wait), 4 lent for the next
        # step and step 1's 4, under 6 steps' pairs; so the last steps need corrections saved
        # through the app's new process (with the default room, 4 steps were once all answered
        # before the kill)
        rollout__batch_size=8, buffer__min_fresh_pairs=4, buffer__max_staleness=2, buffer__max_pending=8,
        learner__backend="torch", learner__micro_batch_pairs=4, checkpoint__every_steps=0,
        metrics__wandb_mode="disabled",
        teacher__kind="human", teacher__human__port=port, teacher__human__tokens_env=TOKENS_ENV,
        teacher__human__wait_s=90, teacher__human__lease_s=20,
        resources__num_teacher_workers=2, resources__call_timeout_s=120, resources__max_actor_restarts=2,
    )
    db = cfg.run_dir / "human_queue.sqlite"
    lock_file = lock_path(db)
    stop, answering = threading.Event(), threading.Event()
    answering.set()
    saved: list = []
    outcome: dict = {}
    annotator = threading.Thread(target=scripted_annotator, args=(f"http://127.0.0.1:{port}", BOB, stop, saved, 0.0, answering),
                                 daemon=True)
    runner = threading.Thread(target=lambda: outcome.update(result=run(cfg)), daemon=True)
    annotator.start()
    runner.start()
    metrics = cfg.run_dir / "metrics.jsonl"

    def wait_for(what: str, check, timeout_s: float = 300.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and runner.is_alive():
            value = check()
            if value:
                return value
            time.sleep(0.2)
        pytest.fail(f"{what}: not within {timeout_s:.0f} s (run alive: {runner.is_alive()}, {outcome})")

    try:
        wait_for("step 1", lambda: metrics.exists() and any(
            "train/loss" in r for r in read_jsonl_metrics(metrics)))
        answering.clear()  # the annotator pauses, so the run cannot finish while the app moves
        server_pid = lock_holder(lock_file)
        assert server_pid is not None
        assert open(f"/proc/{server_pid}/cmdline").read().startswith("ray::TeacherWorker")
        os.kill(server_pid, signal.SIGKILL)
        killed_at = time.time()
        new_pid = wait_for("another process serving", lambda: (p := lock_holder(lock_file)) not in (None, server_pid) and p,
                           timeout_s=60)
        assert open(f"/proc/{new_pid}/cmdline").read().startswith("ray::TeacherWorker")
        with httpx.Client(timeout=10) as c:  # same address, the new process
            me = wait_for("app answering again", lambda: _me(c, f"http://127.0.0.1:{port}"), timeout_s=30)
        assert me["annotator"] == "bob"
        answering.set()
        runner.join(400)
    finally:
        stop.set()
        annotator.join(30)
    assert not runner.is_alive() and "result" in outcome, outcome
    assert outcome["result"].steps == cfg.total_steps
    assert any(t > killed_at for t, _ in saved), "no correction saved after the serving actor died"

    rows = [r for r in read_jsonl_metrics(metrics) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, cfg.total_steps + 1))
    assert rows[-1]["faults/teacher_restarts"] >= 1
    assert rows[-1]["teacher/human/corrections/bob"] >= 1
    # the corrections the people saved are what the buffer logged (the durable correction log)
    with sqlite3.connect(db) as conn:
        corrected = {row[0] for row in conn.execute("SELECT corrected FROM items WHERE state='done'")}
    tok = load_tokenizer(cfg.model.path)
    pairs = list(read(cfg.run_dir / "corrections.jsonl"))
    assert len(pairs) >= cfg.total_steps * cfg.learner.micro_batch_pairs
    assert all(p.teacher == "human" for p in pairs)
    assert all(tok.decode(p.chosen_ids, skip_special_tokens=True) in corrected for p in pairs)
    assert not url_path(db).exists()  # the teachers closed: nobody serves


def _me(client: httpx.Client, url: str):
    try:
        r = client.get(f"{url}/api/me", headers=auth(BOB))
    except httpx.TransportError:
        return None
    return r.json() if r.status_code == 200 else None
