"""The two learner backends behind one seam: who owns the optimizer and how gradients are reduced.

A plain torch AdamW (tiny runs, debugging, the readable reference) and a DeepSpeed engine
(ZeRO 0-3). Both are fed the same micro-batches and the same loss scaling by
``correction_rl.learner.learner.Learner``, which is what lets a test check that they produce the
same weights.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from correction_rl.config import LearnerConfig, ModelConfig


def resolve_dtype(model_cfg: ModelConfig, learner_cfg: LearnerConfig) -> torch.dtype:
    """bf16 only where the hardware runs it natively (CUDA with bf16 support)."""
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if learner_cfg.bf16 == "on":
        return torch.bfloat16
    if learner_cfg.bf16 == "off" or model_cfg.dtype == "float32":
        return torch.float32
    if model_cfg.dtype == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if cuda_bf16 else torch.float32


def lr_lambda(cfg: LearnerConfig, total_steps: int):
    """Multiplier of the peak LR at optimizer step ``s``: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class TorchBackend:
    """Plain AdamW on one process: the readable reference of what DeepSpeed does for us.

    Mixed precision: when the model's parameters are bf16/fp16 (``learner.bf16`` on, or ``auto``
    on CUDA) AdamW does not run on them. A 1e-6 update of a weight of magnitude 0.02 is far
    below half a bf16 ulp (~8e-5) and rounds away, so plain AdamW on bf16 weights moved them only
    ~20% as far as fp32 did in 30 steps at lr 1e-6 (issue 17). Like DeepSpeed's bf16 optimizer,
    the backend keeps an fp32 *master* copy of every trainable parameter: gradients are upcast
    onto the masters, clipped and stepped there in fp32, and the model's low-precision weights
    are refreshed from the masters after each step (round to nearest), so small updates
    accumulate in the masters instead of vanishing. fp32 models train on their own parameters,
    exactly as before.
    """

    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, total_steps: int):
        self.model = model
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mixed = any(p.dtype != torch.float32 for p in self.params)
        self.masters = (
            [p.detach().float().clone().requires_grad_() for p in self.params] if self.mixed else self.params
        )
        self.optimizer = torch.optim.AdamW(self.masters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, total_steps)
        )

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def master_parameters(self) -> list[torch.Tensor]:
        """The fp32 weights AdamW updates (the model's own parameters when it is fp32)."""
        return self.masters

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        if self.mixed:
            for p, m in zip(self.params, self.masters):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        params = [m for m in self.masters if m.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.mixed:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)  # fp32 -> bf16, round to nearest
        return grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.mixed:
            self.model.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        """Model, fp32 masters (mixed precision), AdamW moments and LR-schedule position: what an
        exact resume needs (the bf16 model alone would lose the masters' sub-ulp progress)."""
        state = {
            "model": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.mixed:
            state["masters"] = [m.detach().clone() for m in self.masters]
        return state

    def load_state_dict(self, state: dict) -> None:
        load_trainable_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.mixed:
            with torch.no_grad():
                saved = state.get("masters")
                sources = saved if saved is not None else [p.detach() for p in self.params]
                for m, src in zip(self.masters, sources):
                    m.copy_(src)

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            torch.save(self.state_dict(), directory / "learner.pt")

    def load(self, directory: Path) -> None:
        self.load_state_dict(torch.load(directory / "learner.pt", map_location="cpu", weights_only=False))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's part of a learner checkpoint: the whole ``state_dict``, or with LoRA only
    what training changes (the adapter): the frozen base is ``model.path`` itself, and saving it
    every checkpoint would cost a model's worth of disk for nothing (docs/lora.md)."""
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if len(trainable) == len(list(model.parameters())):
        return state
    return {n: t for n, t in state.items() if n in trainable}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``trainable_state``: a full state loads strictly; an adapter-only one must
    cover exactly the trainable parameters (a LoRA checkpoint into a full learner, or the other
    way round, fails naming what is missing)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if len(trainable) == len(list(model.parameters())):
        model.load_state_dict(state)
        return
    missing, unexpected = trainable - set(state), set(state) - trainable
    if missing or unexpected:
        raise ValueError(f"learner checkpoint does not match this learner's trainable (LoRA) parameters: "
                         f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]} "
                         f"(learner.lora must match the checkpoint's)")
    model.load_state_dict(state, strict=False)


def ensure_process_group(backend: str) -> None:
    """DeepSpeed needs torch.distributed even on one process; rendezvous over loopback.

    With several ranks the driver (correction_rl.distributed) sets RANK/WORLD_SIZE/MASTER_* before
    this is called; alone we default to a one-process group on a free port.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def deepspeed_config(cfg: LearnerConfig, dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON config this learner runs with (written next to the run's outputs).

    ``learner.offload_optimizer: cpu`` (ZeRO 1-3) moves Adam's moments and the fp32 master
    weights to host memory; ``learner.offload_params: cpu`` (ZeRO-3 only) keeps the parameter
    partitions there between uses. Both trade step time for GPU memory (docs/scaling.md). The
    optimizer stays the torch AdamW every backend uses (``zero_force_ds_cpu_optimizer: false``):
    DeepSpeed's own CPU Adam would need a C++ build at start-up and would change the maths.
    """
    if cfg.offload_optimizer != "none" and cfg.zero_stage == 0:
        raise ValueError("learner.offload_optimizer needs learner.zero_stage 1, 2 or 3 (0 has no "
                         "partitioned optimizer state to offload)")
    if cfg.offload_params != "none" and cfg.zero_stage != 3:
        raise ValueError("learner.offload_params needs learner.zero_stage 3 (only ZeRO-3 partitions "
                         "the parameters)")
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2, 3):
        # Our own accumulation (unmanaged mode) only supports overlap_comm with stage 2.
        zero["overlap_comm"] = False
    if cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if cfg.offload_params != "none":
        zero["offload_param"] = {"device": cfg.offload_params, "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer != "none":
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def uses_zero_init(cfg: LearnerConfig) -> bool:
    """Whether the policy should be built partitioned (``deepspeed.zero.Init``): ZeRO-3 with
    ``learner.zero_init`` on."""
    return cfg.backend == "deepspeed" and cfg.zero_stage == 3 and bool(cfg.zero_init)


def load_policy(path, learner_cfg: LearnerConfig, dtype: torch.dtype):
    """Load the HF policy the learner will train; under ZeRO-3 with ``zero_init`` each rank only
    ever materialises its own partition of every weight (plus one whole tensor at a time).

    Why: a plain ``from_pretrained`` builds the whole model on every rank before DeepSpeed
    partitions it, so a ZeRO-3 run would still need one whole model per GPU, which is exactly the
    memory ZeRO-3 is chosen to avoid. The modules are created inside ``deepspeed.zero.Init``
    (every parameter is partitioned the moment it exists), then the checkpoint is read tensor by
    tensor and each one is written into its partitions under ``GatheredParameters`` (rank 0
    writes, DeepSpeed re-partitions). HF's own route (``HfDeepSpeedConfig`` + ``from_pretrained``)
    does the same but needs ``accelerate``, which this project does not install, and would leave a
    process-global switch on that partitions every later HF load (a rollout engine, a teacher).
    Every rank must call this (the gathers are collectives). Elsewhere it is ``load_model``.
    """
    from correction_rl.models import load_model

    if not uses_zero_init(learner_cfg):
        return load_model(path, dtype=str(dtype).replace("torch.", ""))
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    try:  # skip random init: it would write into empty partitions, and is overwritten anyway
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    ensure_process_group("nccl" if torch.cuda.is_available() else "gloo")
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(learner_cfg, dtype), dtype=dtype), \
            no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=dtype)
    model.tie_weights()  # tied embeddings share one partitioned parameter (no-op when untied)
    tensors = _checkpoint_tensors(Path(path))
    rank0 = dist.get_rank() == 0
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if rank0:
                param.copy_(tensors(name))
    return model


def _checkpoint_tensors(path: Path):
    """``name -> tensor`` over an HF directory's safetensors (single file or sharded), reading
    each tensor only when asked for."""
    import json

    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").exists():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) to load under zero.Init")

    def get(name: str) -> torch.Tensor:
        if name not in weight_map:
            raise KeyError(f"{path}: checkpoint has no tensor {name!r}")
        with safe_open(str(path / weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    return get


class DeepSpeedBackend:
    """A DeepSpeed engine around the same model, AdamW and LR schedule as the torch backend."""

    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, total_steps: int, dtype):
        import deepspeed

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        ensure_process_group(backend)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
        self.ds_config = deepspeed_config(cfg, dtype)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
        )
        self.cfg = cfg

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        # ZeRO 1-3 report the clipped global norm; stage 0 does not, so measure it before the
        # step (on one rank this is the global norm; on several it is rank-local, pre-reduction).
        local = None
        if self.cfg.zero_stage == 0:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            local = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float(local if local is not None else "nan")

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, directory: Path, rank: int) -> None:
        """DeepSpeed's own checkpoint (every rank writes its ZeRO shard: a collective)."""
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=self.cfg.lora.enabled)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state",
            load_optimizer_states=True, load_lr_scheduler_states=True,
            load_module_strict=not self.cfg.lora.enabled,  # LoRA: the adapter only (frozen base excluded)
        )
        if path is None:
            raise FileNotFoundError(f"{directory / 'deepspeed'}: no DeepSpeed checkpoint 'state'")
