"""A teacher model on a local vLLM engine: frozen, batched, with a per-request timeout.

The engine is built once per teacher (one per ``TeacherWorker`` actor in the distributed
driver) and never receives weights: this class has no ``load_weights`` and the weight-sync code
only knows rollout generators, so the teacher stays the fixed, stronger model the policy is
pulled towards.

Why drive ``LLMEngine.add_request`` / ``step`` instead of calling ``LLM.generate`` on the whole
batch: ``generate`` has no deadline, while a teacher must not let one runaway request stall
the run. Stepping the engine ourselves gives (1) a concurrency limit — at most
``max_concurrency`` requests are in the engine, the next one is added when one finishes — and
(2) a per-request timeout — a request still unfinished ``timeout_s`` after it was added is
aborted and its rollout rejected with reason ``timeout``. Everything else (templates,
validation, retry policy, metrics) is shared with the HTTP teacher.

vLLM is imported lazily, only here (and in ``rollout/vllm.py``).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from correction_rl.teachers.metrics import TeacherMetrics
from correction_rl.teachers.templates import CorrectionTemplate, TemplateSet
from correction_rl.teachers.validation import ValidationRules, asks_per_rollout, validate
from correction_rl.types import Correction, Rollout


@dataclass
class _Job:
    """One rollout's pending request in the engine."""

    index: int
    rollout: Rollout
    template: CorrectionTemplate
    prompt_ids: list[int]
    asks_left: int
    started: float = field(default_factory=time.perf_counter)
    added: float = 0.0


class VLLMTeacher:
    """``Teacher`` over a frozen ``vllm.LLM``. Call ``close()`` when done."""

    def __init__(
        self,
        model_path: str | Path,
        templates: TemplateSet | None = None,
        rules: ValidationRules | None = None,
        *,
        api: str = "auto",
        timeout_s: float = 60.0,
        max_retries: int = 2,
        max_concurrency: int = 32,
        on_rejection: str = "drop",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        max_model_len: int = 1024,
        kv_cache_gb: int = 1,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        name: str = "vllm",
        system_prompt: str | None = None,
    ) -> None:
        if not model_path:
            raise ValueError("teacher.vllm.model_path must be the teacher model directory for teacher.kind 'vllm'")
        if max_concurrency < 1 or timeout_s <= 0:
            raise ValueError(f"teacher: need max_concurrency >= 1 and timeout_s > 0; got {max_concurrency}, {timeout_s}")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gb))
        from vllm import LLM

        self.name = name
        self.model_path = str(model_path)
        self.templates = templates or TemplateSet("instruct")
        self.rules = rules or ValidationRules()
        self.api = api
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.on_rejection = on_rejection
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.max_model_len = max_model_len
        self.stats = TeacherMetrics()
        self.llm = LLM(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_concurrency,
            enforce_eager=True,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        self.tokenizer = self.llm.get_tokenizer()
        from correction_rl.prompts.render import PromptRenderer, generation_eos_of

        # the teacher's own template (``auto``) over the prompt's conversation, for templates that
        # are the prompt itself (``task_answer``): the policy's rendering rules, the teacher's model
        self.renderer = PromptRenderer.build(self.tokenizer, "auto",
                                             system_prompt if getattr(self.tokenizer, "chat_template", None) else None,
                                             generation_eos_of(self.model_path))
        self._calls = 0
        self._lock = threading.Lock()  # one caller steps the engine at a time (threaded actors)

    def __repr__(self) -> str:
        return f"VLLMTeacher(model_path={self.model_path!r}, max_concurrency={self.max_concurrency})"

    # --- the Teacher protocol ------------------------------------------------------------

    def correct(self, rollouts: Sequence[Rollout]) -> list[Correction]:
        with self._lock:
            return self._correct(rollouts)

    def _correct(self, rollouts: Sequence[Rollout]) -> list[Correction]:
        start = time.perf_counter()
        self._calls += 1
        results: list[Correction | None] = [None] * len(rollouts)
        asks = asks_per_rollout(self.on_rejection, self.max_retries)
        waiting: list[_Job] = []
        for i, rollout in enumerate(rollouts):
            job = self._job(i, rollout, asks)
            if isinstance(job, Correction):
                results[i] = job
            else:
                waiting.append(job)
        try:
            self._run(waiting, results)
        finally:
            self.stats.add_busy(time.perf_counter() - start)
        return [r for r in results if r is not None]

    def metrics(self) -> dict[str, float]:
        return self.stats.snapshot()

    def close(self) -> None:
        from correction_rl.rollout.vllm import close_engine

        close_engine(self)

    # --- requests ------------------------------------------------------------------------

    def _job(self, index: int, rollout: Rollout, asks: int) -> _Job | Correction:
        template = self.templates.for_rollout(rollout)
        ids = self._prompt_ids(template, rollout)
        if len(ids) + self.max_new_tokens > self.max_model_len:
            # a property of this sample, not of the run: counted, not raised
            return self._reject(rollout, "prompt_too_long", time.perf_counter())
        return _Job(index, rollout, template, ids, asks)

    def _prompt_ids(self, template: CorrectionTemplate, rollout: Rollout) -> list[int]:
        if template.answers_prompt and self.api != "completions":
            return self.renderer.ids(rollout.prompt)  # x as a chat: the conversation, rendered
        api = template.api if self.api == "auto" else self.api
        if api == "chat" and getattr(self.tokenizer, "chat_template", None):
            # render to text, then encode without special tokens (the template wrote them), as
            # PromptRenderer does: ``tokenize=True`` returns a BatchEncoding in transformers 5
            text = self.tokenizer.apply_chat_template(template.messages(rollout), add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(template.completion_prompt(rollout))["input_ids"])

    def _params(self, job: _Job):
        from vllm import SamplingParams

        seed = None
        if self.temperature > 0:
            seed = (self.seed * 1_000_003 + self._calls * 7_919 + job.index * 31 + job.asks_left) % (2**31 - 1)
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed,
                              stop_token_ids=list(self.renderer.stop_ids))

    def _run(self, waiting: list[_Job], results: list[Correction | None]) -> None:
        """Keep at most ``max_concurrency`` requests in the engine; step until all are done."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        running: dict[str, _Job] = {}
        while waiting or running:
            while waiting and len(running) < self.max_concurrency:
                job = waiting.pop(0)
                request_id = f"teacher-{uuid.uuid4().hex[:12]}"
                job.added = time.perf_counter()
                engine.add_request(request_id, TokensPrompt(prompt_token_ids=job.prompt_ids), self._params(job))
                running[request_id] = job
            for out in engine.step():
                job = running.get(out.request_id)
                if job is None or not out.finished:
                    continue
                del running[out.request_id]
                completion = out.outputs[0]
                self.stats.request(time.perf_counter() - job.added, len(job.prompt_ids), len(completion.token_ids))
                retry = self._finish(job, completion.text, completion.finish_reason, results)
                if retry:
                    waiting.append(retry)
            now = time.perf_counter()
            expired = [rid for rid, job in running.items() if now - job.added > self.timeout_s]
            if expired:
                engine.abort_request(expired)
                for rid in expired:
                    job = running.pop(rid)
                    self.stats.error("timeout")
                    results[job.index] = self._reject(job.rollout, "timeout", job.started)

    def _finish(self, job: _Job, text: str, finish: str | None, results: list[Correction | None]) -> _Job | None:
        """Validate one answer; returns the job again when the retry policy re-asks."""
        verdict = validate(text, job.rollout, job.template, self.rules, finish)
        if verdict.accepted:
            self.stats.outcome(job.rollout.response_text, verdict.text, None)
            results[job.index] = Correction(job.rollout, verdict.text, self.name, latency_s=time.perf_counter() - job.started)
            return None
        reason = verdict.reason or "unknown"
        self.stats.error(reason)
        job.asks_left -= 1
        if job.asks_left > 0:
            self.stats.retry()
            return job
        results[job.index] = self._reject(job.rollout, reason, job.started)
        return None

    def _reject(self, rollout: Rollout, reason: str, started: float) -> Correction:
        self.stats.outcome(rollout.response_text, None, reason)
        return Correction(rollout, None, self.name, rejection=reason, latency_s=time.perf_counter() - started)

    def __enter__(self) -> "VLLMTeacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
