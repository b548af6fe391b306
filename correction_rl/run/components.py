"""Builds each component from the config: the one place that maps a config ``kind`` to a class.

Both drivers use it — the in-process loop (``loop.py``) and the Ray actors
(``correction_rl.distributed``) — so a run configured one way gets the same components in
either mode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from correction_rl.config import BufferConfig, RunConfig, to_dict
from correction_rl.observe.metrics import JsonlSink, MetricSink, MultiSink, WandbSink
from correction_rl.rollout.base import Generator
from correction_rl.teachers.base import Teacher
from correction_rl.types import Sampling


def buffer_config(cfg: RunConfig) -> BufferConfig:
    """The buffer's config with the run-dependent defaults filled in: no-op pairs kept out of
    memory when the learner would drop them anyway (they are still logged and counted), and
    ``max_pending`` = one learner step's worth of pairs when unset."""
    buffer = cfg.buffer
    if cfg.objective.noop_policy == "drop" and buffer.admit_noops:
        buffer = dataclasses.replace(buffer, admit_noops=False)
    if buffer.max_pending is None:
        per_step = cfg.learner.micro_batch_pairs * cfg.learner.grad_accum * cfg.resources.num_learner_ranks
        buffer = dataclasses.replace(buffer, max_pending=min(buffer.capacity, max(per_step, buffer.min_fresh_pairs)))
    return buffer


def build_generator(cfg: RunConfig, seed_offset: int = 0) -> Generator:
    """The configured rollout engine over ``model.path`` (GPU when the process has one)."""
    import torch

    from correction_rl.rollout import build_generator as build_engine

    return build_engine(
        cfg.rollout.engine,
        cfg.model.path,
        seed=cfg.seed + seed_offset,
        device="cuda" if torch.cuda.is_available() else "cpu",
        max_model_len=cfg.model.max_seq_len,
        kv_cache_gb=cfg.rollout.vllm_kv_cache_gb,
        gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
        chat_template=cfg.model.chat_template,
        system_prompt=cfg.model.system_prompt,
        lora=cfg.learner.lora if cfg.learner.lora.enabled and not cfg.sync.lora_merge else None,
        lora_keep=cfg.buffer.max_staleness + 1,  # vLLM: adapter versions a request may still use
    )


def build_teacher(cfg: RunConfig) -> Teacher:
    if cfg.teacher.kind == "oracle":
        from correction_rl.teachers.oracle import OracleTeacher

        return OracleTeacher(correction=cfg.teacher.oracle_correction)
    if cfg.teacher.kind in ("vllm", "http"):
        return build_llm_teacher(cfg)
    if cfg.teacher.kind == "human":
        return build_human_teacher(cfg)
    raise ValueError(f"teacher.kind={cfg.teacher.kind!r}: unknown (allowed: oracle, vllm, http, human)")


def build_llm_teacher(cfg: RunConfig) -> Teacher:
    """A vLLM or HTTP teacher with the configured templates, validation and retry policy
    (docs/teachers.md)."""
    from correction_rl.teachers.templates import TemplateSet
    from correction_rl.teachers.validation import DEFAULT_REFUSAL_PATTERNS, ValidationRules

    t = cfg.teacher
    templates = TemplateSet.from_config(t)
    rules = ValidationRules(
        max_length_ratio=t.max_length_ratio,
        length_floor_chars=t.length_floor_chars,
        max_edit_ratio=t.max_edit_ratio,
        refusal_patterns=tuple(t.refusal_patterns) if t.refusal_patterns is not None else DEFAULT_REFUSAL_PATTERNS,
    )
    common = dict(
        api=t.api, timeout_s=t.timeout_s, max_retries=t.retry.max_retries, max_concurrency=t.max_concurrency,
        on_rejection=t.on_rejection, max_new_tokens=t.max_new_tokens, temperature=t.temperature, seed=cfg.seed,
    )
    if t.kind == "vllm":
        from correction_rl.teachers.vllm_teacher import VLLMTeacher

        return VLLMTeacher(
            t.vllm.model_path or "", templates, rules, max_model_len=t.vllm.max_model_len,
            kv_cache_gb=t.vllm.kv_cache_gb, gpu_memory_utilization=t.vllm.gpu_memory_utilization,
            system_prompt=cfg.model.system_prompt, **common,
        )
    from correction_rl.teachers.http_teacher import HTTPTeacher

    r = t.retry
    return HTTPTeacher(
        t.http.base_url or "", t.http.model or "", templates, rules, api_key_env=t.http.api_key_env,
        backoff_base_s=r.backoff_base_s, backoff_max_s=r.backoff_max_s,
        breaker_failures=r.breaker_failures, breaker_cooldown_s=r.breaker_cooldown_s, **common,
    )


def build_human_teacher(cfg: RunConfig) -> Teacher:
    """The human teacher over its SQLite queue, with a share of the web app unless
    ``teacher.human.serve`` is off (docs/human-teachers.md).

    Every process that builds one (in the Ray modes: each teacher worker) opens the same queue
    file and competes for its lock; the holder serves the app on ``teacher.human.host:port`` and
    the others take over when it dies (``teachers/human/host.py``), so one app serves the queue
    however many teacher workers there are."""
    import os

    from correction_rl.teachers.human.queue import CorrectionQueue
    from correction_rl.teachers.human.teacher import HumanTeacher

    h = cfg.teacher.human
    db = Path(h.db)
    db = db if db.is_absolute() else cfg.run_dir / db
    queue = CorrectionQueue(db, lease_timeout_s=h.lease_s)
    fallback = None
    if h.fallback == "oracle":
        from correction_rl.teachers.oracle import OracleTeacher

        fallback = OracleTeacher()
    server = None
    if h.serve:
        from correction_rl.config import warn_config
        from correction_rl.teachers.human.app import TokenSpecError, create_app, parse_tokens
        from correction_rl.teachers.human.host import acquire_host

        warn_config(cfg)  # a non-loopback host: tokens in clear text
        spec = os.environ.get(h.tokens_env)
        if not spec:
            raise TokenSpecError(f"teacher.human.tokens_env: environment variable {h.tokens_env} is not set "
                             f"in this process (pid {os.getpid()}; expected name=token[,name=token...]). In the "
                             "Ray modes the teacher workers need it: export it where Ray starts (the shell "
                             "that runs the training, or `ray start` on the teacher node)")
        tokens = parse_tokens(spec)  # a bad token list fails here, in every process, not at takeover

        def announce(url: str) -> None:
            print(f"human teacher: annotators open {url}/#token=<their token> (pid {os.getpid()})", flush=True)

        server = acquire_host(db, lambda: create_app(queue, tokens, h.max_body_bytes),
                              h.host, h.port, announce=announce)
    return HumanTeacher(queue, wait_s=h.wait_s, fallback=fallback, server=server)


def build_eval_teacher(cfg: RunConfig) -> Teacher:
    """The teacher that measures held-out correction (``eval.teacher``)."""
    if cfg.eval.teacher == "oracle":
        from correction_rl.teachers.oracle import OracleTeacher

        return OracleTeacher()
    return build_teacher(cfg)


def build_sink(cfg: RunConfig, run_dir: Path, extra_config: dict[str, Any] | None = None,
               resume_id: str | None = None) -> MetricSink:
    """``resume_id``: the W&B run id to continue (a resumed run, docs/reliability.md)."""
    from correction_rl.observe.progress import ProgressSink  # live bar on a terminal, lines otherwise

    sinks: list[MetricSink] = [
        ProgressSink(cfg.total_steps, cfg.metrics.console_every_steps, mode=cfg.metrics.progress),
        JsonlSink(run_dir / "metrics.jsonl"),
    ]
    if cfg.metrics.wandb_mode != "disabled":
        sinks.append(WandbSink(cfg.metrics, run_dir, {**to_dict(cfg), **(extra_config or {})},
                               resume_id=resume_id))
    return MultiSink(sinks)


def eval_modes(cfg: RunConfig) -> tuple[str, ...]:
    return ("greedy", "sampled") if cfg.eval.sampled else ("greedy",)


def rollout_sampling(cfg: RunConfig, seed: int) -> Sampling:
    r = cfg.rollout
    return Sampling(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, seed=seed)
