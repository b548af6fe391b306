"""The algorithm's config sections: model, tasks, rollout, objective, buffer, learner, sync,
evaluation and metrics (teachers: ``teacher.py``; resources, checkpoints and the whole run:
``run.py``). One dataclass per component, a docstring per field, a rule per value
(``rules.py``)."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from annotated_types import Interval, MinLen

from correction_rl.config.rules import (
    ChatTemplate,
    Count,
    DatasetPath,
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
    chat_template: ChatTemplate = "auto"
    """How a prompt becomes the policy's input: ``auto`` renders it with the tokenizer's chat
    template when it has one (else the plain text), ``none`` always tokenizes the plain text, a
    path names a Jinja chat template file. The same rendering in HF and vLLM rollouts,
    evaluation and pi_ref scoring (docs/models.md)."""
    system_prompt: str | None = None
    """System turn put first in every conversation that has none of its own (needs a chat
    template)."""


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
    dataset: DatasetPath | None = None
    """Prompts from a dataset instead of the tasks: a ``.jsonl``/``.json``/``.parquet`` file, a
    directory of such files, a ``save_to_disk`` directory, or a hub id ``owner/name`` (needs a
    machine that reaches the hub). Its rows are split into training and held-out prompts by
    ``held_out_fraction`` and ``split_seed``; they carry no task an oracle can check, so use an
    LLM or human teacher and ``eval.teacher: run`` (docs/models.md)."""
    dataset_split: str = "train"
    """The dataset's own split to read (``save_to_disk`` ``DatasetDict`` keys, hub splits; local
    files have one split, ``train``)."""
    prompt_field: str = "prompt"
    """Column holding the prompt text (a non-empty string); unused when ``messages_field`` is set."""
    messages_field: str | None = None
    """Column holding a chat conversation (a list of ``{role, content}`` ending with a user turn),
    rendered with ``model.chat_template``; takes precedence over ``prompt_field``."""
    answer_field: str | None = None
    """Column holding a reference answer (a string or null), kept with the prompt for evaluation."""
    id_field: str | None = None
    """Column holding a stable row id (string or int): the prompt id and the split key, so the
    split survives reordering and appending rows. None: the row index."""
    held_out_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.05
    """Share of the dataset's rows held out for evaluation (decided row by row from a hash of
    ``split_seed`` and the row key; never trained on)."""
    split_seed: int = 0
    """Seed of the train / held-out split; separate from the run's ``seed`` so runs with
    different seeds train and evaluate on the same rows."""


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
    policy: Literal["current", "initial"] = "current"
    """Which policy the training rollouts come from: ``current`` (on-policy: the engines get the
    learner's weights every ``sync.every_steps``) or ``initial`` (offline corrections: the engine
    keeps the starting policy for the whole run, so every correction is one of pi_init's
    responses; staleness is then not bounded and evaluation uses a second engine that does get
    the new weights). ``mode: inprocess`` only (docs/objectives.md, "Experiment knobs")."""


@section
class LengthPriorConfig:
    mean: PosFloat = 8.0
    """Mean response length (tokens) of the negative-binomial length prior l(y)."""
    dispersion: PosFloat = 4.0
    """Negative-binomial dispersion r: smaller is wider."""


@section
class ObjectiveConfig:
    form: Literal["plain", "logistic", "dpo", "ipo", "cpl", "sft"] = "dpo"
    """Which amount-of-correction loss to minimize (docs/objectives.md); ``sft`` is the
    non-pairwise baseline -log pi(y'|x) alone (supervised fine-tuning on the teacher's y')."""
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
class LoRAConfig:
    enabled: bool = False
    """Train a LoRA adapter (``peft``) instead of every weight: only the adapter gets gradients and
    optimizer state, syncs ship only the adapter, and pi_ref is the base with the adapter
    disabled (docs/lora.md)."""
    rank: Count = 16
    """Adapter rank r (the inner dimension of B @ A)."""
    alpha: PosFloat = 32.0
    """LoRA alpha; the adapter's output is scaled by alpha / rank."""
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    """Dropout on the adapter's input during training (0 keeps learner and engines bit-identical
    in greedy decoding; dropout is off in evaluation either way)."""
    target_modules: Annotated[list[str], MinLen(1)] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names (last path component) of the Linear layers that get an adapter, e.g. ``q_proj``,
    ``v_proj``, ``gate_proj``; a name no layer of the policy has is an error."""
    export: Literal["merged", "adapter"] = "merged"
    """How ``<run_dir>/policy`` is written at the end: ``merged`` (a plain HF model, W0 + scale *
    B @ A) or ``adapter`` (a peft adapter directory over ``model.path``)."""


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
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapter training (off by default; docs/lora.md)."""


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
    lora_merge: bool = False
    """With ``learner.lora.enabled``: merge the adapter into the base weights on the learner and
    ship full weights (for engines without LoRA support), instead of shipping only the adapter
    tensors (docs/lora.md)."""


@section
class EvalConfig:
    every_steps: NonNegInt = 10
    """Held-out evaluation period in learner steps (0: only before and after training)."""
    num_prompts: Count = 100
    """Held-out prompts per task per evaluation."""
    sampled: bool = True
    """Also evaluate with sampled decoding (at the rollout temperature), not only greedy."""
    tasks: TaskNames | None = None
    """Tasks evaluated on held-out prompts; None: the training tasks (``task.names``). Name tasks
    you do not train on to measure what training on one task does to another (per-task metrics
    are logged as ``eval/<mode>/<task>/<metric>``)."""
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
