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
    """Plain AdamW on one process: the readable reference of what DeepSpeed does for us."""

    def __init__(self, model: torch.nn.Module, cfg: LearnerConfig, total_steps: int):
        self.model = model
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, total_steps)
        )

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        """Model, AdamW moments and LR-schedule position: what an exact resume needs."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            torch.save(self.state_dict(), directory / "learner.pt")

    def load(self, directory: Path) -> None:
        self.load_state_dict(torch.load(directory / "learner.pt", map_location="cpu", weights_only=False))


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
    """The DeepSpeed JSON config this learner runs with (written next to the run's outputs)."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2, 3):
        # Our own accumulation (unmanaged mode) only supports overlap_comm with stage 2.
        zero["overlap_comm"] = False
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


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
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state",
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"{directory / 'deepspeed'}: no DeepSpeed checkpoint 'state'")
