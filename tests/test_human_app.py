"""The human teacher's web app over real HTTP on 127.0.0.1: tokens, CSRF, body limits, text-only
responses, leases, chat conversations in the API (the same in headless Chromium:
``test_human_browser.py``), the app moving to another process when the serving one dies, and a
short in-process training run fed by a person in the browser and a scripted annotator on the HTTP
API at once."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import httpx
import pytest

from correction_rl.teachers.human.app import create_app, parse_tokens, serve
from correction_rl.teachers.human.queue import CorrectionQueue
from correction_rl.types import Prompt, Rollout

from _browser import _MISSING, browser_annotator

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abc"
EVIL = "<img src=x onerror=\"document.title='PWNED'\"><script>document.title='PWNED'</script>"
POST = {"X-CRL-Request": "1"}


def auth(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def rollouts(texts: list[str]) -> list[Rollout]:
    return [Rollout(prompt=Prompt(prompt_id=f"p{k}", text=f"Prompt {k}: {t}", task="addition"),
                    prompt_ids=[1], response_ids=[2], response_text=t, policy_version=0)
            for k, t in enumerate(texts)]


@pytest.fixture
def app_server(tmp_path):
    queue = CorrectionQueue(tmp_path / "q.sqlite", lease_timeout_s=1.0)
    server = serve(create_app(queue, parse_tokens(f"alice={ALICE},bob={BOB}"), max_body_bytes=2048))
    yield queue, server
    server.stop()


def test_binds_loopback_and_every_api_request_needs_a_valid_token(app_server):
    queue, server = app_server
    assert server.host == "127.0.0.1"
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/api/me").status_code == 401
        assert c.get("/api/me", headers=auth("wrong-token-0123456789")).status_code == 401
        assert c.post("/api/next", json={}, headers=POST).status_code == 401
        me = c.get("/api/me", headers=auth(ALICE))
        assert me.status_code == 200 and me.json()["annotator"] == "alice"
        assert "default-src 'none'" in me.headers["content-security-policy"]
    with pytest.raises(ValueError, match="entry 2 .*shorter than 16"):
        parse_tokens(f"alice={ALICE},bob=short")


def test_cross_site_and_oversized_requests_are_refused(app_server):
    queue, server = app_server
    queue.enqueue(rollouts(["3"]))
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/api/next", json={}, headers=auth(ALICE))  # no custom header: a form post
        assert r.status_code == 403 and "X-Crl-Request" in r.json()["error"]
        r = c.post("/api/next", json={}, headers=auth(ALICE, **POST, Origin="https://evil.example"))
        assert r.status_code == 403 and "evil.example" in r.json()["error"]
        assert queue.counts()["leased"] == 0  # refused before anything changed
        item = c.post("/api/next", json={}, headers=auth(ALICE, **POST, Origin=server.url)).json()["item"]
        big = {"item_id": item["item_id"], "corrected_text": "x" * 4096}
        r = c.post("/api/submit", json=big, headers=auth(ALICE, **POST))
        assert r.status_code == 413 and queue.counts()["done"] == 0
        assert c.request("DELETE", "/api/next", headers=auth(ALICE, **POST)).status_code == 405


def test_two_annotators_get_different_items_and_an_expired_lease_is_stored_once(app_server):
    queue, server = app_server
    ids = queue.enqueue(rollouts(["1", "2"]))
    with httpx.Client(base_url=server.url) as c:
        a = c.post("/api/next", json={}, headers=auth(ALICE, **POST)).json()["item"]
        b = c.post("/api/next", json={}, headers=auth(BOB, **POST)).json()["item"]
        assert {a["item_id"], b["item_id"]} == set(ids)
        saved = c.post("/api/submit", json={"item_id": b["item_id"], "corrected_text": "20"}, headers=auth(BOB, **POST))
        assert saved.json()["saved"] is True and queue.get(b["item_id"]).corrected == "20"  # committed first
        time.sleep(1.2)  # alice closed her tab: her lease expires
        again = c.post("/api/next", json={}, headers=auth(BOB, **POST)).json()["item"]
        assert again["item_id"] == a["item_id"]
        stale = c.post("/api/submit", json={"item_id": a["item_id"], "corrected_text": "late"},
                       headers=auth(ALICE, **POST))
        assert stale.status_code == 409
        ok = c.post("/api/submit", json={"item_id": a["item_id"], "corrected_text": "10"}, headers=auth(BOB, **POST))
        assert ok.status_code == 200 and ok.json()["progress"] == {"done_by_you": 2, "done": 2, "open": 0}
    assert queue.get(a["item_id"]).corrected == "10" and queue.counts()["done"] == 2


def test_a_double_clicked_submit_is_answered_already_saved(app_server):
    """Two identical submits of one item by the annotator who holds it (a double click; here
    sent at the same moment): one stores, the other is told it is already saved (200), not
    that the lease went to someone else. A different text afterwards is refused (409) and the
    saved one kept; bob, who never held it, still gets the lease error."""
    queue, server = app_server
    (item_id,) = queue.enqueue(rollouts(["1"]))
    body = {"item_id": item_id, "corrected_text": "2"}
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/api/next", json={}, headers=auth(ALICE, **POST)).json()["item"]["item_id"] == item_id
        answers: list = []
        clicks = [threading.Thread(target=lambda: answers.append(
            c.post("/api/submit", json=body, headers=auth(ALICE, **POST)))) for _ in range(2)]
        for t in clicks:
            t.start()
        for t in clicks:
            t.join(20)
        assert sorted(r.status_code for r in answers) == [200, 200]
        assert sorted(bool(r.json().get("already_saved")) for r in answers) == [False, True]
        assert all(r.json()["saved"] is True and r.json()["item_id"] == item_id for r in answers)
        assert [r.json()["progress"]["done_by_you"] for r in answers] == [1, 1]
        changed = c.post("/api/submit", json={**body, "corrected_text": "3"}, headers=auth(ALICE, **POST))
        assert changed.status_code == 409 and "already saved by 'alice'" in changed.json()["error"]
        other = c.post("/api/submit", json=body, headers=auth(BOB, **POST))
        assert other.status_code == 409 and "not leased to 'bob'" in other.json()["error"]
    assert queue.get(item_id).corrected == "2" and queue.counts()["done"] == 1


def test_model_text_is_never_served_as_html(app_server):
    queue, server = app_server
    queue.enqueue(rollouts([EVIL]))
    with httpx.Client(base_url=server.url) as c:
        page = c.get("/")
        assert page.status_code == 200 and "<textarea" in page.text and "PWNED" not in page.text
        data = c.post("/api/next", json={}, headers=auth(ALICE, **POST))
        assert data.headers["content-type"] == "application/json"
        assert data.headers["x-content-type-options"] == "nosniff"
        assert data.json()["item"]["response"] == EVIL
        script = c.get("/app.js").text
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script
    assert "textContent" in script


# -- a chat prompt: the whole conversation on the page ------------------------------------------

CONVERSATION = [{"role": "system", "content": "You fix spelling. <b>Only</b> spelling."},
                {"role": "user", "content": "Fix: teh cat"},
                {"role": "assistant", "content": "the cat"},
                {"role": "user", "content": f"Now this: {EVIL}"}]


def chat_rollout(response: str = "Now this: fixed") -> Rollout:
    prompt = Prompt(prompt_id="chat0", text=CONVERSATION[-1]["content"], task="spelling", messages=CONVERSATION)
    return Rollout(prompt=prompt, prompt_ids=[1], response_ids=[2], response_text=response, policy_version=0)


def test_a_chat_item_carries_its_whole_conversation_and_old_queue_files_open(app_server, tmp_path):
    """The API hands the page every turn, in order, as JSON text; a plain prompt has none; a
    queue file written before conversations were stored gains the column and still serves."""
    queue, server = app_server
    chat_id, plain_id = queue.enqueue([chat_rollout(), *rollouts(["1 + 1 = 3"])])
    with httpx.Client(base_url=server.url) as c:
        first = c.post("/api/next", json={}, headers=auth(ALICE, **POST)).json()["item"]
        second = c.post("/api/next", json={}, headers=auth(BOB, **POST)).json()["item"]
    assert first["item_id"] == chat_id and first["messages"] == CONVERSATION
    assert first["prompt"] == f"Now this: {EVIL}"  # the last user turn, as before
    assert second["item_id"] == plain_id and second["messages"] is None
    import sqlite3

    old = tmp_path / "old.sqlite"  # the schema before the messages column
    with sqlite3.connect(old) as db:
        db.executescript(SCHEMA_BEFORE_MESSAGES)
        db.execute("INSERT INTO items (item_id, prompt_id, prompt, response, task, enqueued_at) "
                   "VALUES ('i1', 'p1', 'Prompt 1', '2 + 2 = 5', 'addition', 1.0)")
    reopened = CorrectionQueue(old)
    assert reopened.lease("alice").public()["messages"] is None
    (added,) = reopened.enqueue([chat_rollout()])
    assert reopened.get(added).public()["messages"] == CONVERSATION


SCHEMA_BEFORE_MESSAGES = """
CREATE TABLE items (item_id TEXT PRIMARY KEY, prompt_id TEXT NOT NULL, prompt TEXT NOT NULL,
    response TEXT NOT NULL, task TEXT NOT NULL DEFAULT '', state TEXT NOT NULL DEFAULT 'pending',
    enqueued_at REAL NOT NULL, lease_owner TEXT, leased_at REAL, lease_expires REAL,
    leases INTEGER NOT NULL DEFAULT 0, corrected TEXT, annotator TEXT, done_at REAL, edit_distance INTEGER);
CREATE TABLE skips (item_id TEXT NOT NULL, annotator TEXT NOT NULL, PRIMARY KEY (item_id, annotator));
"""


# -- one app per queue file, whichever process holds its lock ----------------------------------

SERVE_CHILD = """
import sys, time
from pathlib import Path
from correction_rl.teachers.human.app import create_app, parse_tokens
from correction_rl.teachers.human.host import AppHost
from correction_rl.teachers.human.queue import CorrectionQueue
db = Path(sys.argv[1])
queue = CorrectionQueue(db, lease_timeout_s=60)
host = AppHost(db, lambda: create_app(queue, parse_tokens(sys.argv[2])), port=int(sys.argv[3])).start()
print(host.serving, host.url, flush=True)
time.sleep(600)
"""


def test_the_app_moves_to_another_process_when_the_serving_one_is_killed(tmp_path):
    import signal
    import sys

    from correction_rl.teachers.human.host import AppHost, acquire_host, url_path

    db, port, spec = tmp_path / "q.sqlite", _free_port(), f"alice={ALICE},bob={BOB}"
    child = subprocess.Popen([sys.executable, "-c", SERVE_CHILD, str(db), spec, str(port)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["True", f"http://127.0.0.1:{port}"]
        queue = CorrectionQueue(db, lease_timeout_s=60)
        ours = AppHost(db, lambda: create_app(queue, parse_tokens(spec)), port=port, retry_s=0.2).start()
        assert not ours.serving and ours.url == f"http://127.0.0.1:{port}"  # published by the child
        (item_id,) = queue.enqueue(rollouts(["1"]))
        with httpx.Client(base_url=ours.url, timeout=10) as c:
            assert c.post("/api/next", json={}, headers=auth(ALICE, **POST)).json()["item"]["item_id"] == item_id
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            deadline = time.monotonic() + 10
            while not ours.serving and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ours.serving, ours.last_error
            # same address, same queue: alice's page gets her leased item back and saves it
            again = c.post("/api/next", json={}, headers=auth(ALICE, **POST)).json()["item"]
            assert again["item_id"] == item_id
            assert c.post("/api/submit", json={"item_id": item_id, "corrected_text": "2"},
                          headers=auth(ALICE, **POST)).status_code == 200
        ours.close()
        assert not url_path(db).exists()
        # within one process, teachers share one host; the last one to stop releases the lock
        a = acquire_host(db, lambda: create_app(queue, parse_tokens(spec)), port=port)
        b = acquire_host(db, lambda: create_app(queue, parse_tokens(spec)), port=port)
        assert a.host is b.host and a.serving
        a.stop()
        assert b.serving
        b.stop()
        assert not b.serving and not url_path(db).exists()
    finally:
        child.kill()
        child.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scripted_annotator(url: str, token: str, stop: threading.Event, saved: list[tuple[float, int]],
                       pause_s: float = 0.0, answering: threading.Event | None = None) -> None:
    """A person at the page, scripted: answers every item with the task's minimal correction,
    through the HTTP API only (while ``answering`` is set, if given), and records (when, edit
    distance) of each save; rides out the app being down or moving to another process."""
    from correction_rl.tasks import get_task

    with httpx.Client(base_url=url, timeout=10) as c:
        while not stop.is_set():
            if answering is not None and not answering.wait(0.1):
                continue
            try:
                item = c.post("/api/next", json={}, headers=auth(token, **POST)).json()["item"]
                if item is None:
                    time.sleep(0.1)
                    continue
                prompt = Prompt(prompt_id="human", text=item["prompt"], task=item["task"])
                fixed = get_task(item["task"]).minimal_correction(prompt, item["response"])
                r = c.post("/api/submit", json={"item_id": item["item_id"], "corrected_text": fixed},
                           headers=auth(token, **POST))
            except httpx.TransportError:  # the app is not up yet, or moving to another process:
                time.sleep(0.2)           # the next /api/next gives back the item still leased to us
                continue
            assert r.status_code == 200, r.text
            saved.append((time.time(), r.json()["edit_distance"]))
            time.sleep(pause_s)  # leave some items to the (slower) person in the browser


@pytest.mark.slow
def test_training_run_learns_from_corrections_made_through_the_web_app(tmp_path, warm_policy_dir, monkeypatch):
    """Without Chromium the run is fed by the scripted annotator alone (the browser part is what
    the skip reason of the other browser tests names)."""
    from correction_rl.config import config_from_dict
    from correction_rl.run.inprocess import run

    port = _free_port()
    monkeypatch.setenv("CRL_TEST_HUMAN_TOKENS", f"alice={ALICE},bob={BOB}")
    cfg = config_from_dict({
        "name": "human", "output_dir": str(tmp_path), "mode": "inprocess", "total_steps": 2, "seed": 0,
        "model": {"path": str(warm_policy_dir)},
        "task": {"names": ["addition"], "num_train": 200, "num_eval": 8},
        "rollout": {"engine": "hf", "batch_size": 8, "max_new_tokens": 6},
        "teacher": {"kind": "human", "human": {"port": port, "tokens_env": "CRL_TEST_HUMAN_TOKENS",
                                               "wait_s": 120, "lease_s": 30}},
        "objective": {"form": "dpo", "beta": 0.1},
        "learner": {"backend": "torch", "lr": 1e-4, "micro_batch_pairs": 8},
        "buffer": {"min_fresh_pairs": 4, "max_staleness": 1},
        "eval": {"every_steps": 0, "num_prompts": 8, "sampled": False},
        "metrics": {"wandb_mode": "disabled", "console_every_steps": 1},
    })
    stop = threading.Event()
    saved: dict[str, list] = {"alice": [], "bob": []}
    errors: list[BaseException] = []

    def browser() -> None:
        try:
            browser_annotator(f"http://127.0.0.1:{port}/#token={ALICE}", stop, saved["alice"])
        except BaseException as exc:  # reported by the assertion below
            if not stop.is_set():
                errors.append(exc)

    workers = [threading.Thread(target=scripted_annotator, args=(f"http://127.0.0.1:{port}", BOB, stop, saved["bob"], 0.5),
                                daemon=True)]
    if not _MISSING:
        workers.append(threading.Thread(target=browser, daemon=True))
    for w in workers:
        w.start()
    try:
        result = run(cfg)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert not errors, errors
    assert saved["alice"] or _MISSING, "the person in the browser corrected nothing"
    run_dir = cfg.run_dir
    assert result is not None
    logged = [json.loads(line) for line in (run_dir / "corrections.jsonl").read_text().splitlines()]
    pairs = [r for r in logged if r.get("teacher") == "human" or r.get("pair", {}).get("teacher") == "human"]
    assert len(saved["alice"]) + len(saved["bob"]) >= 8 and pairs
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train/loss" in r][-1]
    assert last["teacher/human/rejected/timeout"] == 0
    assert last["teacher/human/accepted"] >= 8 and last["teacher/human/queue_depth"] == 0
    per_annotator = {k.rsplit("/", 1)[1] for k in last if k.startswith("teacher/human/edit_distance_mean/")}
    assert per_annotator and per_annotator <= {"alice", "bob"}
    assert sum(last[f"teacher/human/corrections/{a}"] for a in per_annotator) >= last["teacher/human/accepted"]
    # every save through the API was stored exactly once (held-out evaluation also asks the teacher)
    done = CorrectionQueue(run_dir / "human_queue.sqlite").counts()["done"]
    assert done == len(saved["alice"]) + len(saved["bob"]) >= len(pairs)


def test_ray_modes_refuse_a_human_wait_longer_than_the_actor_call_timeout(tmp_path, tiny_model_dir):
    from correction_rl.config import config_from_dict
    from correction_rl.distributed.driver import check_settings

    cfg = config_from_dict({"output_dir": str(tmp_path), "mode": "async", "model": {"path": str(tiny_model_dir)},
                            "teacher": {"kind": "human", "human": {"wait_s": 600}},
                            "resources": {"call_timeout_s": 300}})
    with pytest.raises(ValueError, match=r"human.wait_s=600 must be < resources.call_timeout_s=300"):
        check_settings(cfg)
