"""The learner: one ``train_step`` that lowers the amount of correction on a batch of pairs.

The step itself (collate -> score pairs -> correction loss -> backward -> update) is the same for
every backend; what differs is only who owns the optimizer and how gradients are reduced, so
that is the one thing behind the ``_Backend`` seam: a plain torch AdamW for tiny runs and
debugging, and a DeepSpeed engine (ZeRO 0-3) for everything else. Both are fed the same
micro-batches and the same loss scaling, which is what lets a test check that they produce the
same weights.

Gradient accumulation is done here, not by DeepSpeed's internal micro-step counter
(``managed_gradient_accumulation: false``), so a micro-batch whose loss is NaN/inf can be left
out of the step without desynchronising DeepSpeed's counters; a step whose every micro-batch is
non-finite is skipped entirely (docs/learner.md).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from correction_rl.collate import collate_pairs
from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
from correction_rl.objectives import correction_loss, needs_reference
from correction_rl.reference import ReferenceScorer
from correction_rl.shared_prefix import score_pairs
from correction_rl.types import CorrectionPair, StepStats, TrainBatch


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


class _TorchBackend:
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


class _DeepSpeedBackend:
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


@dataclass
class LearnerCounters:
    steps: int = 0
    skipped_steps: int = 0
    nonfinite_microbatches: int = 0
    dropped_by_truncation: int = 0
    dropped_noop: int = 0


class Learner:
    """Owns the policy being trained, its optimizer, and (for pi/pi_ref forms) the reference.

    ``version`` is the policy version: it starts at 0 (the weights the rollout engines were
    started with) and increases by one per optimizer step that was applied.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        learner_cfg: LearnerConfig,
        objective_cfg: ObjectiveConfig,
        model_cfg: ModelConfig,
        total_steps: int,
        device: str | None = None,
    ):
        self.cfg = learner_cfg
        self.objective = objective_cfg
        self.model_cfg = model_cfg
        self.pad_id = pad_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(model_cfg, learner_cfg)
        model = model.to(self.device, dtype=self.dtype)
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        # pi_ref is the starting policy: frozen, never synced, used once per pair at ingestion.
        self.reference = (
            ReferenceScorer(model, pad_id, objective_cfg, model_cfg, learner_cfg.micro_batch_pairs)
            if needs_reference(objective_cfg)
            else None
        )
        model.train()
        if learner_cfg.backend == "deepspeed":
            self.backend = _DeepSpeedBackend(model, learner_cfg, total_steps, self.dtype)
        else:
            self.backend = _TorchBackend(model, learner_cfg, total_steps)
        self.version = 0
        self.counters = LearnerCounters()

    @property
    def model(self) -> torch.nn.Module:
        """The underlying HF model (DeepSpeed's ``engine.module`` when wrapped)."""
        return self.backend.module

    # ------------------------------------------------------------------------------------------
    def attach_reference(self, pairs: Sequence[CorrectionPair]) -> list[CorrectionPair]:
        """Fill ``ref_logps`` once per pair (no-op for reference-free forms)."""
        return self.reference.attach(pairs) if self.reference is not None else list(pairs)

    def _collate(self, pairs: Sequence[CorrectionPair], count_drops: bool = True):
        batch, dropped = collate_pairs(
            pairs, self.pad_id, self.model_cfg.max_seq_len, self.model_cfg.truncation
        )
        if count_drops:
            self.counters.dropped_by_truncation += dropped
        return (self._to_device(batch) if batch is not None else None), dropped

    def _to_device(self, batch: TrainBatch) -> TrainBatch:
        for name, value in vars(batch).items():
            if isinstance(value, torch.Tensor):
                setattr(batch, name, value.to(self.device))
        return batch

    def _select(self, pairs: Sequence[CorrectionPair]) -> list[CorrectionPair]:
        if self.objective.noop_policy != "drop":
            return list(pairs)
        kept = [p for p in pairs if not p.is_noop]
        self.counters.dropped_noop += len(pairs) - len(kept)
        return kept

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        """Every rank must agree to skip a micro-batch, or the next collective deadlocks."""
        import torch.distributed as dist

        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item() > 0)

    def train_step(self, pairs: Sequence[CorrectionPair]) -> StepStats:
        """One optimizer step over ``pairs`` split into ``grad_accum`` micro-batches."""
        start = time.perf_counter()
        pairs = self._select(pairs)
        micro = max(1, math.ceil(len(pairs) / max(1, self.cfg.grad_accum)))
        chunks = [pairs[i : i + micro] for i in range(0, len(pairs), micro)] or [[]]
        totals = {"loss": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0}
        extra: dict[str, float] = {}
        n_pairs = n_tokens = applied = 0
        for chunk in chunks:
            batch, _ = self._collate(chunk) if chunk else (None, 0)
            if batch is None:
                continue
            scores = score_pairs(self.backend_forward_model, batch, self.objective)
            out = correction_loss(
                scores, batch.ref_chosen_logps, batch.ref_rejected_logps, self.objective, batch.noop
            )
            if not self._all_ranks_finite(out.loss):
                self.counters.nonfinite_microbatches += 1
                continue
            self.backend.backward(out.loss / len(chunks))
            applied += 1
            k = batch.num_pairs
            n_pairs += k
            n_tokens += int(batch.response_mask.sum())
            totals["loss"] += float(out.loss.detach()) * k
            totals["margin"] += float(out.margin) * k
            totals["chosen"] += float(scores.chosen_logps.detach().mean()) * k
            totals["rejected"] += float(scores.rejected_logps.detach().mean()) * k
            for key, value in out.metrics().items():
                extra[key] = extra.get(key, 0.0) + float(value) * k
        skipped = applied == 0
        grad_norm = float("nan")
        if skipped:
            self.backend.zero_grad()
            self.counters.skipped_steps += 1
        else:
            grad_norm = self.backend.step()
            self.version += 1
            self.counters.steps += 1
        denom = max(1, n_pairs)
        extra = {k: v / denom for k, v in extra.items()}
        extra.update(
            skipped_steps=self.counters.skipped_steps,
            nonfinite_microbatches=self.counters.nonfinite_microbatches,
            dropped_noop=self.counters.dropped_noop,
            dropped_by_truncation=self.counters.dropped_by_truncation,
        )
        return StepStats(
            step=self.version,
            loss=totals["loss"] / denom,
            margin=totals["margin"] / denom,
            chosen_logp=totals["chosen"] / denom,
            rejected_logp=totals["rejected"] / denom,
            grad_norm=grad_norm,
            lr=self.backend.lr(),
            num_pairs=n_pairs,
            num_tokens=n_tokens,
            seconds=time.perf_counter() - start,
            skipped=skipped,
            extra=extra,
        )

    @property
    def backend_forward_model(self):
        """What the forward pass is called on: DeepSpeed's engine (its hooks matter for ZeRO-3)."""
        return getattr(self.backend, "engine", self.backend.module)

    # ------------------------------------------------------------------------------------------
    def save_state(self, directory: str | Path, rank: int = 0) -> None:
        """Everything an exact resume of the learner needs, into ``directory``: model, optimizer
        and LR-scheduler state (``learner.pt``, or DeepSpeed's checkpoint under ``deepspeed/``
        written by every rank), the policy version and counters, and the torch RNG state
        (``learner.json`` / ``rng-rank<k>.pt``). Under DeepSpeed every rank must call it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(directory, rank)
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   directory / f"rng-rank{rank}.pt")
        if rank == 0:
            meta = {"version": self.version, "counters": asdict(self.counters), "backend": self.cfg.backend}
            (directory / "learner.json").write_text(json.dumps(meta) + "\n")

    def load_state(self, directory: str | Path, rank: int = 0) -> None:
        """Restore what ``save_state`` wrote (same backend, ZeRO stage and world size)."""
        directory = Path(directory)
        meta = json.loads((directory / "learner.json").read_text())
        if meta["backend"] != self.cfg.backend:
            raise ValueError(f"{directory}: learner state of backend {meta['backend']!r}, "
                             f"this learner is {self.cfg.backend!r} (learner.backend)")
        self.backend.load(directory)
        self.version = int(meta["version"])
        self.counters = LearnerCounters(**meta["counters"])
        rng_file = directory / f"rng-rank{rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def lr(self) -> float:
        return self.backend.lr()

    # ------------------------------------------------------------------------------------------
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full (gathered) parameters by HF name, for weight sync and saving.

        Under ZeRO-3 each parameter is partitioned across ranks; it is gathered one layer at a
        time so that exporting never needs the whole model twice in memory.
        """
        module = self.model
        if self.cfg.backend == "deepspeed" and self.cfg.zero_stage == 3:
            import deepspeed

            for name, param in module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.detach().clone()
            return
        for name, param in module.named_parameters():
            yield name, param.detach()

    def save_pretrained(self, path) -> None:
        """Save the current policy as a standard HF directory (rank 0 writes)."""
        state = {name: t.to("cpu") for name, t in self.named_weights()}
        self.model.save_pretrained(path, state_dict=state)
