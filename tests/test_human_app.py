"""The human teacher's web app over real HTTP on 127.0.0.1: tokens, CSRF, body limits, text-only
rendering (checked in headless Chromium too), leases through the API, and a short in-process
training run fed by a scripted annotator that answers through the HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from correction_rl.teachers.human.app import create_app, parse_tokens, serve
from correction_rl.teachers.human.queue import CorrectionQueue
from correction_rl.types import Prompt, Rollout

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


CHROMIUM = shutil.which("chromium")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path: Path, url: str, *mode: str) -> str:
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    out = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                          *mode, url], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_headless_chromium_shows_a_script_response_as_text_and_does_not_run_it(app_server, tmp_path):
    queue, server = app_server
    queue.lease_timeout_s = 60.0
    (item_id,) = queue.enqueue(rollouts([EVIL]))
    dom = chromium(tmp_path, f"{server.url}/#token={ALICE}", "--dump-dom")
    assert "<title>correction-rl: correct responses</title>" in dom  # PWNED would replace it
    assert "annotator: alice" in dom and "done by you: 0" in dom
    assert "&lt;script&gt;document.title='PWNED'&lt;/script&gt;" in dom  # shown, escaped, in the page
    assert "<script>document.title" not in dom and "<img src=" not in dom
    assert queue.get(item_id).lease_owner == "alice"  # the page leased it through the API
    no_token = chromium(tmp_path, f"{server.url}/", "--dump-dom")
    assert 'id="login"' in no_token and "annotator: alice" not in no_token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scripted_annotator(url: str, token: str, stop: threading.Event, saved: list[int], pause_s: float = 0.0) -> None:
    """Answers every item with the oracle's minimal correction, through the HTTP API only."""
    from correction_rl.tasks import get_task

    with httpx.Client(base_url=url, timeout=10) as c:
        while not stop.is_set():
            try:
                item = c.post("/api/next", json={}, headers=auth(token, **POST)).json()["item"]
            except httpx.TransportError:  # the run has not started the app yet
                time.sleep(0.2)
                continue
            if item is None:
                time.sleep(0.1)
                continue
            prompt = Prompt(prompt_id="human", text=item["prompt"], task=item["task"])
            fixed = get_task(item["task"]).minimal_correction(prompt, item["response"])
            r = c.post("/api/submit", json={"item_id": item["item_id"], "corrected_text": fixed},
                       headers=auth(token, **POST))
            assert r.status_code == 200, r.text
            saved.append(r.json()["edit_distance"])
            time.sleep(pause_s)  # leave some items to the (slower) person in the browser


@pytest.mark.slow
def test_training_run_learns_from_corrections_made_through_the_web_app(tmp_path, warm_policy_dir, monkeypatch):
    from correction_rl.config import config_from_dict
    from correction_rl.loop import run

    port = _free_port()
    monkeypatch.setenv("CRL_TEST_HUMAN_TOKENS", f"alice={ALICE},bob={BOB}")
    cfg = config_from_dict({
        "name": "human", "output_dir": str(tmp_path), "mode": "inprocess", "total_steps": 2, "seed": 0,
        "model": {"path": str(warm_policy_dir)},
        "task": {"names": ["addition"], "num_train": 200, "num_eval": 8},
        "rollout": {"engine": "hf", "batch_size": 8, "max_new_tokens": 6},
        "teacher": {"kind": "human", "human_port": port, "human_tokens_env": "CRL_TEST_HUMAN_TOKENS",
                    "human_wait_s": 120, "human_lease_s": 30},
        "objective": {"form": "dpo", "beta": 0.1},
        "learner": {"backend": "torch", "lr": 1e-4, "micro_batch_pairs": 8},
        "buffer": {"min_fresh_pairs": 4, "max_staleness": 1},
        "eval": {"every_steps": 0, "num_prompts": 8, "sampled": False},
        "metrics": {"wandb_mode": "disabled", "console_every_steps": 1},
    })
    stop = threading.Event()
    saved: dict[str, list] = {"alice": [], "bob": []}
    errors: list[BaseException] = []
    proc, ws_url = start_chromium(tmp_path / "profile")

    def browser() -> None:
        import asyncio

        try:
            asyncio.run(browser_annotator(ws_url, f"http://127.0.0.1:{port}/#token={ALICE}", stop, saved["alice"]))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    workers = [threading.Thread(target=browser, daemon=True),
               threading.Thread(target=scripted_annotator, args=(f"http://127.0.0.1:{port}", BOB, stop, saved["bob"], 0.5),
                                daemon=True)]
    for w in workers:
        w.start()
    try:
        result = run(cfg)
    finally:
        stop.set()
        for w in workers:
            w.join(15)
        proc.terminate()
        proc.wait(15)
    assert not errors, errors
    assert saved["alice"], "the person in the browser corrected nothing"
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


def start_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    """Headless Chromium with its DevTools endpoint on loopback; returns it and the endpoint."""
    import re

    proc = subprocess.Popen([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if m := re.search(r"DevTools listening on (ws://\S+)", line):
            return proc, m.group(1)
    proc.terminate()
    raise AssertionError("chromium did not print its DevTools address")


class DevTools:
    """A minimal Chrome DevTools Protocol client (over ``websockets``) for one page: enough to
    type, press keys, read the DOM and take a screenshot like a person at the keyboard would."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str):
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return out["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 20.0):
        import asyncio

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = await self.js(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expression!r}")

    async def key(self, key: str, code: str, vk: int, modifiers: int = 0) -> None:
        for kind in ("rawKeyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code,
                            windowsVirtualKeyCode=vk, modifiers=modifiers)


async def new_page(ws_url: str) -> str:
    """Opens a tab; returns its DevTools websocket address."""
    import websockets

    async with websockets.connect(ws_url, max_size=None) as ws:
        target = await DevTools(ws).call("Target.createTarget", url="about:blank")
    return ws_url.rsplit("/devtools/", 1)[0] + f"/devtools/page/{target['targetId']}"


async def browser_annotator(ws_url: str, page_url: str, stop: threading.Event, saved: list[str]) -> None:
    """A person in Chromium: reads each item, types the oracle's minimal correction over the
    response (or presses "correct as is"), and submits with the keyboard."""
    import asyncio

    import websockets

    from correction_rl.tasks import get_task

    async with websockets.connect(await new_page(ws_url), max_size=None) as ws:
        page = DevTools(ws)
        await page.call("Page.navigate", url=page_url)
        while not stop.is_set():
            if not await page.js("!document.getElementById('work').hidden"):
                await asyncio.sleep(0.2)
                continue
            shown = await page.js("document.body.dataset.item")
            prompt = await page.js("document.getElementById('prompt').textContent")
            response = await page.js("document.getElementById('edit').value")
            task = (await page.js("document.getElementById('task').textContent")).removeprefix("task: ")
            fixed = get_task(task).minimal_correction(Prompt(prompt_id="b", text=prompt, task=task), response)
            await page.js("document.getElementById('status').textContent = ''; true")
            if fixed == response:
                await page.key("a", "KeyA", 65, modifiers=1)  # Alt+A: correct as is
            else:
                await page.js("const e = document.getElementById('edit'); e.focus(); e.select(); true")
                await page.call("Input.insertText", text=fixed)
                await page.key("Enter", "Enter", 13, modifiers=2)  # Ctrl+Enter: submit
            status = await page.wait_for("document.getElementById('status').textContent")
            assert status.startswith("saved"), status
            saved.append(fixed)
            await page.wait_for(f"document.body.dataset.item !== {json.dumps(shown)}")


async def _drive_page(ws_url: str, page_url: str, screenshot: Path) -> dict:
    import base64

    import websockets

    async with websockets.connect(await new_page(ws_url), max_size=None) as ws:
        page = DevTools(ws)
        await page.call("Emulation.setDeviceMetricsOverride", width=900, height=640, deviceScaleFactor=1, mobile=False)
        await page.call("Page.navigate", url=page_url)
        await page.wait_for("document.getElementById('work') && !document.getElementById('work').hidden")
        seen = {"title_before": await page.js("document.title"),
                "prompt": await page.js("document.getElementById('prompt').textContent"),
                "textarea": await page.js("document.getElementById('edit').value")}
        # Like a person: put the cursor on the wrong digit and retype it.
        await page.js("const e = document.getElementById('edit'); e.focus(); e.setSelectionRange(10, 11); true")
        await page.key("Backspace", "Backspace", 8)
        await page.call("Input.insertText", text="6")
        seen["diff"] = await page.wait_for("document.querySelector('#diff .ins') && document.getElementById('diff').textContent")
        shot = await page.call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        await page.key("Enter", "Enter", 13, modifiers=2)  # Ctrl+Enter: submit
        await page.wait_for("document.getElementById('status').textContent.startsWith('saved')")
        seen["status"] = await page.js("document.getElementById('status').textContent")
        seen["next_textarea"] = await page.wait_for(
            "document.getElementById('edit').value.includes('<script>') && document.getElementById('edit').value")
        seen["next_diff_html"] = await page.js("document.getElementById('diff').innerHTML")
        seen["title_after"] = await page.js("document.title")
        return seen


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_annotator_edits_and_submits_in_headless_chromium(app_server, tmp_path):
    import asyncio
    import re

    queue, server = app_server
    queue.lease_timeout_s = 60.0
    first, second = queue.enqueue(rollouts(["12 + 4 = 15", EVIL]))
    proc, ws_url = start_chromium(tmp_path / "cdp-profile")
    try:
        shot = tmp_path / "human_teacher.png"
        seen = asyncio.run(asyncio.wait_for(_drive_page(ws_url, f"{server.url}/#token={ALICE}", shot), 60))
    finally:
        proc.terminate()
        proc.wait(15)
    assert seen["prompt"] == "Prompt 0: 12 + 4 = 15" and seen["textarea"] == "12 + 4 = 15"
    assert seen["status"] == "saved (edit distance 1)"
    done = queue.get(first)
    assert (done.state, done.corrected, done.annotator) == ("done", "12 + 4 = 16", "alice")
    assert "15" in seen["diff"] and "16" in seen["diff"]
    assert seen["next_textarea"] == EVIL  # the <script> response, as text in the editor
    assert "&lt;script&gt;" in seen["next_diff_html"] and "<script>" not in seen["next_diff_html"]
    assert seen["title_before"] == seen["title_after"] == "correction-rl: correct responses"
    assert queue.get(second).lease_owner == "alice" and shot.stat().st_size > 5000
    if os.environ.get("CORRECTION_RL_UPDATE_DOCS_IMG"):  # refresh docs/human-teachers.md's screenshot
        shutil.copy(shot, Path(__file__).resolve().parents[1] / "docs" / "img" / "human_teacher.png")
