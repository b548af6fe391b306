"""The teacher's config: what every teacher kind shares on ``teacher``, and one sub-section per
kind (``teacher.vllm``, ``teacher.http``, ``teacher.human``) plus ``teacher.retry``.

Why sub-sections: a flat section mixed 33 fields of four kinds, and a reader could not tell
which ones a ``kind: http`` run reads. A kind's section is read only by that kind; the others
keep their defaults and cost nothing.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from correction_rl.config.rules import (
    Count,
    EnvVarName,
    ExistingPath,
    Fraction,
    NonNegFloat,
    NonNegInt,
    Port,
    PosFloat,
    section,
)


@section
class VLLMTeacherConfig:
    model_path: ExistingPath | None = None
    """``kind: vllm``: the teacher model's Hugging Face directory."""
    max_model_len: Count = 1024
    """The teacher engine's context length (template + x + y + y')."""
    kv_cache_gb: Count = 1
    """``VLLM_CPU_KVCACHE_SPACE`` of the teacher engine (CPU build)."""
    gpu_memory_utilization: Fraction = 0.3
    """Fraction of GPU memory the teacher engine may take."""


@section
class HTTPTeacherConfig:
    base_url: str | None = None
    """``kind: http``: OpenAI-compatible endpoint, e.g. ``http://127.0.0.1:8000/v1``."""
    model: str | None = None
    """The model name sent with each request (the server's ``--served-model-name``)."""
    api_key_env: EnvVarName = "CORRECTION_RL_API_KEY"
    """NAME of the environment variable holding the API key (the key itself is never written to
    the config, logs or the correction log, so a value that is not a variable name is refused)."""


@section
class RetryConfig:
    max_retries: NonNegInt = 2
    """Retries of a failed or rejected correction before the rollout is dropped (counted)."""
    backoff_base_s: NonNegFloat = 0.5
    """HTTP: first retry waits ~this long (jittered), doubling per attempt up to ``backoff_max_s``."""
    backoff_max_s: NonNegFloat = 8.0
    """HTTP: longest wait between retries (also caps a server's Retry-After)."""
    breaker_failures: Count = 5
    """HTTP: consecutive failed requests that open the circuit breaker (fail fast, ``circuit_open``)."""
    breaker_cooldown_s: NonNegFloat = 30.0
    """HTTP: seconds the open circuit fails fast before one trial request is let through."""


@section
class HumanTeacherConfig:
    db: str = "human_queue.sqlite"
    """``kind: human``: SQLite correction queue file; a relative path is under the run directory."""
    host: str = "127.0.0.1"
    """Address the web app binds (loopback by default; a non-loopback address sends the tokens
    in clear text and is warned about: expose the app through an authenticating TLS reverse
    proxy instead, docs/human-teachers.md)."""
    port: Port = 8765
    """Web app port (0: a free port, printed at start)."""
    serve: bool = True
    """Start the web app in the training process (False: offline JSONL only)."""
    tokens_env: EnvVarName = "CORRECTION_RL_HUMAN_TOKENS"
    """NAME of the environment variable with the annotators' access tokens,
    ``name=token[,name=token...]`` (tokens >= 16 characters; never in config files or logs)."""
    lease_s: PosFloat = 300.0
    """Seconds an annotator holds an item before it is offered to someone else (the open page
    renews it every 30 s)."""
    wait_s: PosFloat = 600.0
    """Longest a batch waits for its corrections; what is not corrected by then is withdrawn and
    rejected (``timeout``) or sent to ``fallback``."""
    fallback: Literal["none", "oracle"] = "none"
    """Teacher for rollouts nobody corrected in time (``oracle``: the run keeps going with the
    task's programmatic corrections)."""
    max_body_bytes: Count = 65536
    """Largest request body the web app accepts (HTTP 413 above)."""


@section
class TeacherConfig:
    kind: Literal["oracle", "vllm", "http", "human"] = "oracle"
    """Who corrects: a program that knows the answer, a local vLLM model, an HTTP endpoint, or
    people in a web app (``human``, docs/human-teachers.md)."""
    oracle_correction: Literal["minimal", "reference"] = "minimal"
    """``kind: oracle``: y' is the minimal edit of y (``minimal``, the definition of a
    correction) or the task's reference answer whatever y was (``reference``: a full rewrite,
    so with ``objective.form: sft`` this is SFT on gold and with ``dpo`` preference pairs
    (gold, y); a right y that differs from the canonical spelling is still replaced)."""
    max_calls: NonNegInt = 0
    """Stop training once this many rollouts have been sent to the teacher (0: no limit; the
    run then ends at ``total_steps``): arms of an experiment spend the same budget whatever
    their objective does with no-op pairs. Calls are logged as the cumulative ``teacher/calls``;
    the step that crosses the budget finishes, so a run may overshoot by up to one collection
    round (``rollout.batch_size``). ``mode: inprocess`` only."""
    timeout_s: PosFloat = 60.0
    """Per-request timeout; a timed-out correction is retried or dropped with reason ``timeout``."""
    template: str = "instruct"
    """Correction prompt template (docs/teachers.md): ``instruct`` (chat LLMs; y' between
    ``<corrected>`` markers), ``task_answer`` (the teacher answers the task prompt itself: the
    project's own task models), or a name defined in ``template_file``."""
    templates_by_task: dict[str, str] = field(default_factory=dict)
    """Per-task/domain template, e.g. ``{reverse: task_answer}``; other tasks use ``template``."""
    template_file: ExistingPath | None = None
    """YAML file of extra templates ``{name: {user, system, output, start_marker, end_marker, api}}``."""
    api: Literal["auto", "chat", "completions"] = "auto"
    """Request format: chat messages, a plain completion prompt, or ``auto`` (the template's own:
    chat for ``instruct``, completions for ``task_answer``)."""
    max_new_tokens: Count = 256
    """Longest teacher answer in tokens; a raw-format answer cut here is rejected (``truncated``)."""
    temperature: NonNegFloat = 0.0
    """Teacher sampling temperature (0: greedy; re-asking after a rejection needs > 0 to differ)."""
    max_concurrency: Count = 8
    """Requests in flight at once per teacher (HTTP: open requests; vLLM: sequences in the engine)."""
    on_rejection: Literal["drop", "retry"] = "drop"
    """A correction that fails validation: drop the rollout (counted), or ask again up to
    ``retry.max_retries`` times."""
    max_length_ratio: PosFloat = 4.0
    """Validation: reject y' longer than this x max(len(y), ``length_floor_chars``) characters."""
    length_floor_chars: NonNegInt = 32
    """Validation: the length a short y counts as for ``max_length_ratio`` (empty y' are allowed growth)."""
    max_edit_ratio: Fraction | None = None
    """Validation: reject y' whose character edit distance to y, divided by the longer length,
    exceeds this (``over_edit``: a rewrite, not a minimal correction; e.g. 0.3 for the free-form
    ``spelling`` task). None: no bound (an empty y then accepts any y')."""
    refusal_patterns: list[str] | None = None
    """Validation: regexes (case-insensitive, matched at the answer's start) of a refusal; None
    uses the built-in list (``teachers/validation.py``)."""
    retry: RetryConfig = field(default_factory=RetryConfig)
    """Retries and, for HTTP, backoff and the circuit breaker (``vllm`` and ``http``)."""
    vllm: VLLMTeacherConfig = field(default_factory=VLLMTeacherConfig)
    """``kind: vllm``: the local teacher engine."""
    http: HTTPTeacherConfig = field(default_factory=HTTPTeacherConfig)
    """``kind: http``: the endpoint and its key."""
    human: HumanTeacherConfig = field(default_factory=HumanTeacherConfig)
    """``kind: human``: the correction queue and its web app."""
