"""The HTTP teacher against real servers on 127.0.0.1: a scripted fault-injection server
(aiohttp) and vLLM's own OpenAI-compatible server over a teacher model the project trained."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import Counter, deque
from pathlib import Path

import pytest

from correction_rl.teachers.http_teacher import HTTPTeacher
from correction_rl.teachers.templates import TemplateSet
from correction_rl.types import Prompt, Rollout

SECRET = "sk-test-7f3a9c-never-log-me"
_WORD = re.compile(r"rev:([a-z]+)=")


class FaultServer:
    """An OpenAI-compatible server that answers the ``reverse`` task correctly, except for the
    scripted faults it serves first, one per request, in order: ``429``, ``500``, ``timeout``
    (no answer for ``hang_s``), ``malformed`` (broken JSON), ``nochoices`` (JSON without
    choices), and the bad answers ``empty``, ``refusal``, ``echo``, ``blowup``, ``nontext``,
    ``unparseable``. ``fail_always`` turns every request into a 500."""

    def __init__(self, script: list[str], hang_s: float = 8.0) -> None:
        self.script = deque(script)
        self.hang_s = hang_s
        self.fail_always = False
        self.served: Counter[str] = Counter()
        self.good_answers: list[str] = []  # prompt texts answered correctly
        self.auth_headers: set[str] = set()
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    async def _start(self) -> int:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return self.runner.addresses[0][1]

    async def _handle(self, request):
        from aiohttp import web

        body = json.loads(await request.read())
        self.auth_headers.add(request.headers.get("Authorization", ""))
        with self.lock:
            item = "500" if self.fail_always else (self.script.popleft() if self.script else "ok")
            self.served[item] += 1
        chat = request.path.endswith("/chat/completions")
        source = body["messages"][-1]["content"] if chat else body["prompt"]
        word = _WORD.search(source).group(1)
        prompt, answer = f"rev:{word}=", word[::-1]
        if item == "429":
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0"})
        if item == "500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if item == "timeout":
            await asyncio.sleep(self.hang_s)
            return web.json_response({"error": {"message": "too late"}}, status=504)
        if item == "malformed":
            return web.Response(text='{"choices": [{"text": "ab', content_type="application/json")
        if item == "nochoices":
            return web.json_response({"id": "x", "object": "text_completion"})
        text = {
            "empty": "",
            "refusal": "I'm sorry, but I can't help with that request.",
            "echo": prompt + answer,
            "blowup": answer * 200,
            "nontext": answer + "\x00\x01",
            "unparseable": answer,  # chat answers must use markers
            "ok": answer,
        }[item]
        if chat and item not in ("unparseable", "empty"):
            text = f"Here you go:\n<corrected>{text}</corrected>"
        if item == "ok":
            with self.lock:
                self.good_answers.append(prompt)
        usage = {"prompt_tokens": len(source), "completion_tokens": len(text), "total_tokens": len(source) + len(text)}
        choice = {"index": 0, "finish_reason": "stop"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return web.json_response({"id": "c", "object": "chat.completion" if chat else "text_completion",
                                  "created": 0, "model": "teacher", "choices": [choice], "usage": usage})

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def fault_server(request):
    servers: list[FaultServer] = []

    def make(script: list[str], hang_s: float = 8.0) -> FaultServer:
        servers.append(FaultServer(script, hang_s))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def rollouts(words: list[str]) -> list[Rollout]:
    return [Rollout(Prompt(f"p{i}", f"rev:{w}=", "reverse"), [1], [2], w[:2], 0) for i, w in enumerate(words)]


def teacher(url: str, monkeypatch, **kw) -> HTTPTeacher:
    monkeypatch.setenv("CRL_TEST_TEACHER_KEY", SECRET)
    template = kw.pop("template", "instruct")
    settings = dict(api_key_env="CRL_TEST_TEACHER_KEY", timeout_s=2.0, max_retries=3, max_concurrency=1,
                    backoff_base_s=0.01, backoff_max_s=0.05)
    settings.update(kw)
    return HTTPTeacher(url, "teacher", TemplateSet(template), **settings)


WORDS = ["abc", "hello", "xyz", "qwerty", "mno", "zzyx", "kite", "lamp"]


def test_transport_failures_are_retried_and_counted_by_kind(fault_server, monkeypatch):
    script = ["429", "500", "timeout", "malformed", "nochoices", "429"]
    server = fault_server(script, hang_s=6.0)
    t = teacher(server.base_url, monkeypatch, timeout_s=1.0, max_retries=6, max_concurrency=2, breaker_failures=10)
    try:
        out = t.correct(rollouts(WORDS[:4]))
    finally:
        t.close()
    assert [c.corrected_text for c in out] == [w[::-1] for w in WORDS[:4]]
    m = t.metrics()
    assert {k: m[k] for k in m if k.startswith("teacher/errors/")} == {
        "teacher/errors/http_429": 2, "teacher/errors/http_5xx": 1, "teacher/errors/timeout": 1,
        "teacher/errors/malformed_response": 2,
    }
    assert m["teacher/retries"] == 6 and m["teacher/accepted"] == 4 and m["teacher/requests"] == 4
    assert not any(k.startswith("teacher/rejected/") for k in m)
    assert server.auth_headers == {f"Bearer {SECRET}"}  # the key from the env var was sent ...
    assert SECRET not in repr(t) and SECRET not in json.dumps(m)  # ... and is nowhere else
    assert SECRET not in json.dumps({k: repr(v) for k, v in vars(t).items() if k != "_client"})


def test_bad_answers_are_rejected_by_reason_and_dropped_or_retried(fault_server, monkeypatch):
    bad = ["empty", "refusal", "echo", "blowup", "nontext", "unparseable"]
    server = fault_server(list(bad))
    t = teacher(server.base_url, monkeypatch, on_rejection="drop")
    try:
        out = t.correct(rollouts(WORDS[:7]))
        m = t.metrics()
    finally:
        t.close()
    reasons = {"empty": "empty", "refusal": "refusal", "echo": "prompt_echo", "blowup": "length_blowup",
               "nontext": "non_text", "unparseable": "unparseable"}
    assert [c.rejection for c in out] == [reasons[b] for b in bad] + [None]
    assert out[-1].corrected_text == WORDS[6][::-1]
    assert {k.removeprefix("teacher/rejected/"): v for k, v in m.items() if k.startswith("teacher/rejected/")} == {
        r: 1 for r in reasons.values()}
    assert m["teacher/accepted"] == 1 and m["teacher/rollouts"] == 7

    server = fault_server(["refusal", "empty"])
    t = teacher(server.base_url, monkeypatch, on_rejection="retry", max_retries=2)
    try:
        out = t.correct(rollouts(WORDS[:2]))
        m = t.metrics()
    finally:
        t.close()
    assert [c.corrected_text for c in out] == [WORDS[0][::-1], WORDS[1][::-1]]
    assert m["teacher/errors/refusal"] == 1 and m["teacher/errors/empty"] == 1 and m["teacher/retries"] == 2


def test_circuit_breaker_fails_fast_then_recovers(fault_server, monkeypatch):
    server = fault_server([])
    server.fail_always = True
    t = teacher(server.base_url, monkeypatch, max_retries=0, breaker_failures=3, breaker_cooldown_s=0.5)
    try:
        out = t.correct(rollouts(WORDS))
        m = t.metrics()
        assert server.served["500"] == 3  # the breaker stopped sending after 3 failures
        assert [c.rejection for c in out] == ["http_5xx"] * 3 + ["circuit_open"] * 5
        assert m["teacher/circuit_open"] == 1 and m["teacher/circuit_state_open"] == 1
        assert m["teacher/rejected/circuit_open"] == 5
        server.fail_always = False
        import time

        time.sleep(0.6)  # cooldown over: one trial request closes the circuit
        out = t.correct(rollouts(WORDS[:3]))
        assert [c.corrected_text for c in out] == [w[::-1] for w in WORDS[:3]]
        assert t.metrics()["teacher/circuit_state_open"] == 0
    finally:
        t.close()


def test_unreachable_endpoint_is_a_counted_rejection(monkeypatch):
    from _helpers import free_loopback_port

    t = teacher(f"http://127.0.0.1:{free_loopback_port()}/v1", monkeypatch, max_retries=1)
    try:
        out = t.correct(rollouts(WORDS[:2]))
    finally:
        t.close()
    assert [c.rejection for c in out] == ["connection", "connection"]
    assert t.metrics()["teacher/errors/connection"] == 4


def _run_config(tmp_path, policy_dir, name: str, teacher_cfg: dict, wandb: str = "disabled"):
    from correction_rl.config import config_from_dict

    return config_from_dict({
        "name": name, "output_dir": str(tmp_path), "mode": "inprocess", "total_steps": 3, "seed": 0,
        "model": {"path": str(policy_dir)},
        "task": {"names": ["reverse"], "num_train": 300, "num_eval": 8},
        "rollout": {"engine": "hf", "batch_size": 16, "max_new_tokens": 10},
        "teacher": teacher_cfg,
        "objective": {"form": "dpo", "beta": 0.1, "noop_policy": "drop"},
        "learner": {"backend": "torch", "lr": 1e-4, "micro_batch_pairs": 8},
        "buffer": {"min_fresh_pairs": 8, "max_staleness": 1},
        "eval": {"every_steps": 0, "num_prompts": 8, "sampled": False},
        "metrics": {"wandb_mode": wandb, "console_every_steps": 1},
    })


def _last_metrics(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    return train[-1]


@pytest.mark.slow
def test_training_run_through_faults_counts_every_failure_and_loses_no_pair(
    tmp_path, fault_server, monkeypatch, capfd, reverse_policy_dir
):
    from correction_rl.buffer.correction_log import read
    from correction_rl.run.inprocess import run
    from correction_rl.models import load_tokenizer
    from correction_rl.tasks import get_task

    script = ["429", "500", "429", "timeout", "malformed", "empty", "500", "refusal", "nochoices",
              "echo", "503", "blowup", "nontext", "unparseable", "429"]
    script = [s.replace("503", "500") for s in script]
    server = fault_server(script, hang_s=8.0)
    monkeypatch.setenv("CRL_TEST_TEACHER_KEY", SECRET)
    cfg = _run_config(tmp_path, reverse_policy_dir, "faults", {
        "kind": "http", "http": {"base_url": server.base_url, "model": "teacher",
                                 "api_key_env": "CRL_TEST_TEACHER_KEY"},
        "template": "instruct", "timeout_s": 3.0, "max_concurrency": 4, "on_rejection": "retry",
        "retry": {"max_retries": len(script), "backoff_base_s": 0.02, "backoff_max_s": 0.1,
                  "breaker_failures": 100},
    }, wandb="offline")
    result = run(cfg)
    assert result.steps == 3
    assert not server.script  # every scripted fault was served

    m = _last_metrics(result.run_dir)
    expected = Counter({"http_429": 3, "http_5xx": 3, "timeout": 1, "malformed_response": 2, "empty": 1,
                        "refusal": 1, "prompt_echo": 1, "length_blowup": 1, "non_text": 1, "unparseable": 1})
    # the last step's row has the teacher's cumulative counters, but the final evaluation
    # (after the last row) also asks the teacher: read the counters from the teacher metrics row
    errors = {k.removeprefix("teacher/errors/"): v for k, v in m.items() if k.startswith("teacher/errors/")}
    assert errors == dict(expected), errors
    assert not any(k.startswith("teacher/rejected/") for k in m)  # retries recovered every rollout

    # Every correct answer the server gave for a training prompt is exactly one pair in the log.
    tokenizer = load_tokenizer(reverse_policy_dir)
    task = get_task("reverse")
    pairs = list(read(result.run_dir / "corrections.jsonl"))
    ids = [p.pair_id for p in pairs]
    assert len(ids) == len(set(ids)) > 0
    served_train = [p for p in server.good_answers if task.split_of(p) == "train"]
    assert len(pairs) == len(served_train)
    assert m["teacher/accepted"] >= len(pairs)
    for pair in pairs:
        chosen = tokenizer.decode(pair.chosen_ids, skip_special_tokens=True)
        prompt = tokenizer.decode(pair.prompt_ids, skip_special_tokens=True)
        assert chosen == task.solve(prompt), (prompt, chosen)
    assert sorted(tokenizer.decode(p.prompt_ids, skip_special_tokens=True) for p in pairs) == sorted(served_train)

    # The key reached the server and no file of the run or console line.
    assert server.auth_headers == {f"Bearer {SECRET}"}
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    for path in result.run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_training_run_with_vllm_server_as_http_teacher(tmp_path, vllm_teacher_server, reverse_policy_dir, monkeypatch):
    from correction_rl.buffer.correction_log import read
    from correction_rl.run.inprocess import run
    from correction_rl.models import load_tokenizer
    from correction_rl.tasks import get_task

    monkeypatch.delenv("CORRECTION_RL_API_KEY", raising=False)
    cfg = _run_config(tmp_path, reverse_policy_dir, "vllm-server", {
        "kind": "http", "http": {"base_url": vllm_teacher_server, "model": "teacher"}, "template": "task_answer",
        "max_new_tokens": 16, "timeout_s": 60.0, "max_concurrency": 8,
    })
    with pytest.warns(UserWarning, match="CORRECTION_RL_API_KEY"):
        result = run(cfg)
    assert result.steps == 3
    m = _last_metrics(result.run_dir)
    assert m["teacher/accepted"] >= 24 and m["teacher/requests"] >= m["teacher/accepted"]
    assert m["teacher/prompt_tokens"] > 0 and m["teacher/completion_tokens"] > 0
    assert 0 < m["teacher/latency_p50_s"] <= m["teacher/latency_p99_s"] < 60
    assert m["teacher/corrections_per_s"] > 0 and m["teacher/accepted_edit_distance_mean"] > 0

    # The teacher model (held-out accuracy >= 0.9) wrote most chosen answers right.
    tokenizer = load_tokenizer(reverse_policy_dir)
    task = get_task("reverse")
    pairs = list(read(result.run_dir / "corrections.jsonl"))
    right = [tokenizer.decode(p.chosen_ids, skip_special_tokens=True)
             == task.solve(tokenizer.decode(p.prompt_ids, skip_special_tokens=True)) for p in pairs]
    assert len(pairs) >= 8 and sum(right) / len(right) >= 0.75, (sum(right), len(right))


def test_teacher_worker_reports_the_teachers_metrics(fault_server, monkeypatch, tiny_model_dir, tiny_tokenizer):
    """The Ray teacher actor's class (used here as a plain object) adds ``teacher.metrics()``."""
    from correction_rl.config import config_from_dict
    from correction_rl.distributed.actors import TeacherWorker

    server = fault_server(["429", "refusal"])
    monkeypatch.setenv("CRL_TEST_TEACHER_KEY", SECRET)
    cfg = config_from_dict({
        "model": {"path": str(tiny_model_dir)}, "objective": {"form": "logistic"},
        "teacher": {"kind": "http", "max_concurrency": 1, "retry": {"backoff_base_s": 0.01},
                    "http": {"base_url": server.base_url, "model": "teacher", "api_key_env": "CRL_TEST_TEACHER_KEY"}},
    })
    worker = TeacherWorker(cfg, worker_id=0)
    try:
        batch = []
        for i, word in enumerate(WORDS[:3]):
            r = rollouts([word])[0]
            ids = tiny_tokenizer(r.response_text, add_special_tokens=False)["input_ids"]
            prompt_ids = tiny_tokenizer(r.prompt.text)["input_ids"]
            batch.append(Rollout(r.prompt, prompt_ids, ids, r.response_text, 0))
        pairs = worker.correct(batch)
        m = worker.metrics()
    finally:
        worker.close()
    assert len(pairs) == 2 and m["teacher/worker0/pairs"] == 2
    assert m["teacher/skipped/rejected:refusal"] == 1 and m["teacher/rejected/refusal"] == 1
    assert m["teacher/errors/http_429"] == 1 and m["teacher/accepted"] == 2
