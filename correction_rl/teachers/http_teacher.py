"""A teacher behind any OpenAI-compatible endpoint (a hosted API, ``vllm serve``, a gateway).

Why the ``openai`` client library: it already speaks every OpenAI-compatible server's dialect
(chat and plain completions, usage, error bodies) and maps HTTP failures to typed exceptions,
which is exactly what a retry policy needs; hand-rolled HTTP would re-implement that. Its own
retries are switched off (``max_retries=0``) so that every failed attempt is counted here by
reason (``teacher/errors/http_429`` ...) and the backoff is ours.

The request path of one rollout::

    template -> request --(429 / 5xx / timeout / connection / malformed JSON)--> backoff, retry
                   |                                      (up to teacher.retry.max_retries)
                   v
               validate(answer) --rejected--> re-ask (on_rejection: retry) or drop, counted
                   v
               Correction(y')

Concurrency is bounded by an ``asyncio.Semaphore`` (``teacher.max_concurrency`` requests in
flight); backoff sleeps happen outside it, so a throttled request does not hold a slot. A
circuit breaker (``CircuitBreaker``) stops sending after ``breaker_failures`` consecutive
transport failures and fails fast (``circuit_open``) for ``breaker_cooldown_s``, then lets one
trial request through: a dead endpoint costs the run a counted rejection per rollout instead of
``timeout_s x retries`` each.

The API key is read from the environment variable NAMED in ``teacher.http.api_key_env`` when the
teacher is built and is handed only to the client: it is not an attribute of this class, not in
any message, metric or ``repr``, and the config (hence W&B and ``config.yaml``) holds only the
variable's name.

``correct`` is synchronous (the ``Teacher`` protocol); the async work runs on an event loop owned
by the teacher in a daemon thread, so it works the same in a plain script, in pytest and inside
a Ray actor. Every wait on it has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import threading
import time
import warnings
from typing import Any, Sequence

from correction_rl.teachers.metrics import TeacherMetrics
from correction_rl.teachers.templates import CorrectionTemplate, TemplateSet
from correction_rl.teachers.validation import ValidationRules, asks_per_rollout, validate
from correction_rl.types import Correction, Rollout

RETRYABLE = frozenset({"http_429", "http_5xx", "timeout", "connection", "malformed_response"})
"""Failure kinds worth another attempt; other 4xx (bad request, auth, unknown model) are not."""


class CircuitBreaker:
    """closed -> (``threshold`` consecutive failures) -> open -> (``cooldown_s``) -> half-open:
    one trial request; its success closes the circuit, its failure opens it again.
    Used from the teacher's event-loop thread only."""

    def __init__(self, threshold: int, cooldown_s: float, clock=time.monotonic) -> None:
        if threshold < 1:
            raise ValueError(f"teacher.retry.breaker_failures must be >= 1, got {threshold}")
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.state = "closed"
        self.opened_at = 0.0
        self.trial_inflight = False

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open" and self.clock() - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
        if self.state == "half_open" and not self.trial_inflight:
            self.trial_inflight = True
            return True
        return False

    def success(self) -> None:
        self.state, self.failures, self.trial_inflight = "closed", 0, False

    def failure(self) -> bool:
        """Record a failure; True when this failure opened the circuit."""
        self.failures += 1
        reopened = self.state == "half_open"
        self.trial_inflight = False
        if reopened or (self.state == "closed" and self.failures >= self.threshold):
            self.state, self.opened_at = "open", self.clock()
            return True
        return False


class _Loop:
    """An asyncio event loop in a daemon thread; ``run(coro, timeout)`` waits with a deadline."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="http-teacher-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"HTTP teacher: a batch did not finish within {timeout:.0f} s (the bound from "
                "teacher.timeout_s, teacher.retry and teacher.max_concurrency); is the event loop "
                "blocked?"
            ) from None

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


class HTTPTeacher:
    """``Teacher`` over an OpenAI-compatible ``/v1/chat/completions`` or ``/v1/completions``."""

    def __init__(
        self,
        base_url: str,
        model: str,
        templates: TemplateSet | None = None,
        rules: ValidationRules | None = None,
        *,
        api: str = "auto",
        api_key_env: str = "CORRECTION_RL_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 2,
        max_concurrency: int = 8,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 30.0,
        on_rejection: str = "drop",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        name: str = "http",
    ) -> None:
        if not base_url:
            raise ValueError("teacher.http.base_url is required for teacher.kind 'http' (e.g. http://127.0.0.1:8000/v1)")
        if not model:
            raise ValueError("teacher.http.model must name the model to request for teacher.kind 'http'")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError(
                f"teacher: need max_concurrency >= 1, max_retries >= 0, timeout_s > 0; got "
                f"{max_concurrency}, {max_retries}, {timeout_s}"
            )
        self.name = name
        self.base_url = base_url
        self.model = model
        self.templates = templates or TemplateSet("instruct")
        self.rules = rules or ValidationRules()
        self.api = api
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.on_rejection = on_rejection
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.rng = random.Random(seed)
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s)
        self.stats = TeacherMetrics()
        self._loop = _Loop()
        self._client = self._make_client(api_key_env)
        self._semaphore: asyncio.Semaphore | None = None

    def __repr__(self) -> str:  # never the key: it lives only inside the client
        return f"HTTPTeacher(base_url={self.base_url!r}, model={self.model!r}, api={self.api!r})"

    def _make_client(self, api_key_env: str):
        from openai import AsyncOpenAI

        key = os.environ.get(api_key_env)
        if not key:
            warnings.warn(
                f"HTTP teacher: environment variable {api_key_env} (teacher.http.api_key_env) is not "
                "set; sending a placeholder key (fine for local vLLM servers, hosted APIs will "
                "answer 401)",
                stacklevel=3,
            )
            key = "EMPTY"
        # the client holds the key; nothing else in this object does
        return AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=self.timeout_s)

    # --- the Teacher protocol ------------------------------------------------------------

    def correct(self, rollouts: Sequence[Rollout]) -> list[Correction]:
        if not rollouts:
            return []
        start = time.perf_counter()
        try:
            return self._loop.run(self._correct_all(list(rollouts)), self._batch_deadline(len(rollouts)))
        finally:
            self.stats.add_busy(time.perf_counter() - start)

    def metrics(self) -> dict[str, float]:
        out = self.stats.snapshot()
        out["teacher/circuit_state_open"] = float(self.breaker.state != "closed")
        return out

    def close(self) -> None:
        try:
            self._loop.run(self._client.close(), timeout=10)
        except Exception:  # closing is best effort: the process may be exiting
            pass
        self._loop.close()

    # --- the request path ----------------------------------------------------------------

    def _batch_deadline(self, n: int) -> float:
        asks = asks_per_rollout(self.on_rejection, self.max_retries)
        per_rollout = asks * (self.max_retries + 1) * (self.timeout_s + self.backoff_max_s)
        return math.ceil(n / self.max_concurrency) * per_rollout + 30.0

    async def _correct_all(self, rollouts: list[Rollout]) -> list[Correction]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return list(await asyncio.gather(*(self._correct_one(r) for r in rollouts)))

    async def _correct_one(self, rollout: Rollout) -> Correction:
        template = self.templates.for_rollout(rollout)
        start = time.perf_counter()
        asks = asks_per_rollout(self.on_rejection, self.max_retries)
        reason: str | None = None
        try:
            for ask in range(asks):
                answer, finish, failure = await self._request(template, rollout)
                if failure is not None:
                    reason = failure  # transport retries are exhausted: do not re-ask
                    break
                verdict = validate(answer, rollout, template, self.rules, finish)
                reason = verdict.reason
                if verdict.accepted:
                    self.stats.outcome(rollout.response_text, verdict.text, None)
                    return Correction(rollout, verdict.text, self.name, latency_s=time.perf_counter() - start)
                self.stats.error(reason or "unknown")
                if ask + 1 < asks:
                    self.stats.retry()
        except Exception as exc:  # one bad sample never stops the run: count it
            reason = f"error:{type(exc).__name__}"
            self.stats.error(reason)
        self.stats.outcome(rollout.response_text, None, reason)
        return Correction(rollout, None, self.name, rejection=reason, latency_s=time.perf_counter() - start)

    async def _request(
        self, template: CorrectionTemplate, rollout: Rollout
    ) -> tuple[str | None, str | None, str | None]:
        """(answer, finish_reason, None) or (None, None, failure kind) after the retries."""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            assert self._semaphore is not None
            async with self._semaphore:
                # asked inside the slot: requests queued behind a failing one see its outcome
                if not self.breaker.allow():
                    self.stats.error("circuit_open")
                    return None, None, "circuit_open"
                t0 = time.perf_counter()
                try:
                    answer, finish, usage = await self._call(template, rollout)
                    failure = None
                except Exception as exc:
                    failure, retry_after = classify(exc)
            if failure is None:
                self.breaker.success()
                self.stats.request(time.perf_counter() - t0, *usage)
                return answer, finish, None
            self.stats.error(failure)
            if self.breaker.failure():
                self.stats.circuit_opened()
            if failure not in RETRYABLE or attempt == self.max_retries:
                return None, None, failure
            self.stats.retry()
            await asyncio.sleep(self._backoff(attempt, retry_after))
        return None, None, "unknown"  # not reached

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter in [base*2^a / 2, base*2^a], capped; a
        server's ``Retry-After`` is honoured up to the cap."""
        delay = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        delay = delay * (0.5 + 0.5 * self.rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    async def _call(self, template: CorrectionTemplate, rollout: Rollout) -> tuple[str | None, str | None, tuple[int, int]]:
        api = template.api if self.api == "auto" else self.api
        common: dict[str, Any] = {"model": self.model, "max_tokens": self.max_new_tokens, "temperature": self.temperature}
        if api == "chat":
            resp = await self._client.chat.completions.create(messages=template.messages(rollout), **common)
            choice = _first_choice(resp)
            message = getattr(choice, "message", None)
            text = getattr(message, "content", None) if message is not None else None
        else:
            resp = await self._client.completions.create(prompt=template.completion_prompt(rollout), **common)
            choice = _first_choice(resp)
            text = getattr(choice, "text", None)
        if text is not None and not isinstance(text, str):
            raise MalformedResponse(f"answer text is a {type(text).__name__}")
        usage = getattr(resp, "usage", None)
        tokens = (int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
        return text, getattr(choice, "finish_reason", None), tokens


class MalformedResponse(ValueError):
    """A 2xx answer without the fields of a (chat) completion."""


def _first_choice(resp: Any) -> Any:
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse("response has no choices")
    return choices[0]


def classify(exc: BaseException) -> tuple[str, float | None]:
    """Failure kind of one attempt (a metric name suffix) and the server's Retry-After, if any."""
    import openai

    retry_after = None
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            retry_after = float(response.headers.get("retry-after"))
        except (TypeError, ValueError):
            retry_after = None
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None
    if isinstance(exc, openai.RateLimitError):
        return "http_429", retry_after
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return ("http_5xx" if status >= 500 else f"http_{status}"), retry_after
    if isinstance(exc, (MalformedResponse, json.JSONDecodeError, openai.APIResponseValidationError, UnicodeDecodeError)):
        return "malformed_response", None
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout", None
    return f"error:{type(exc).__name__}", None
