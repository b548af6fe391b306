"""The learner: one ``train_step`` that lowers the amount of correction on a batch of pairs.

The step itself (collate -> score pairs -> correction loss -> backward -> update) is the same for
every backend; what differs is only who owns the optimizer and how gradients are reduced, so
that is the one thing behind the backend seam (``learner/backends.py``): a plain torch AdamW for tiny runs and
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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from correction_rl.learner.backends import DeepSpeedBackend, TorchBackend, resolve_dtype
from correction_rl.learner import lora
from correction_rl.learner.collate import collate_pairs
from correction_rl.config import LearnerConfig, ModelConfig, ObjectiveConfig
from correction_rl.learner.objectives import correction_loss
from correction_rl.learner.shared_prefix import score_pairs
from correction_rl.timing import PhaseClock
from correction_rl.types import CorrectionPair, StepStats, TrainBatch
from correction_rl.weights.export import pack_parameters


@dataclass
class LearnerCounters:
    steps: int = 0
    skipped_steps: int = 0
    nonfinite_microbatches: int = 0
    dropped_by_truncation: int = 0
    dropped_noop: int = 0


class Learner:
    """Owns the policy being trained and its optimizer. It holds no reference model: pi_ref's
    log-probs arrive on the pairs, attached once at ingestion by the one owner of pi_ref
    (``pairs/ingest.py``), so no learner (rank) carries a policy copy it would never call.

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
        lora_merge: bool = False,
    ):
        self.cfg = learner_cfg
        self.lora_merge = lora_merge  # sync.lora_merge: export merged weights instead of the adapter
        self.objective = objective_cfg
        self.model_cfg = model_cfg
        self.pad_id = pad_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(model_cfg, learner_cfg)
        model = model.to(self.device, dtype=self.dtype)
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        model.train()
        if learner_cfg.lora.enabled:  # only the adapter requires grad from here on (learner/lora.py)
            model = lora.wrap(model, learner_cfg.lora, model_cfg.gradient_checkpointing)
        # one flat buffer: exporting the weights borrows it (weights/export.py); ZeRO-1/2 keeps
        # flat ones of its own, ZeRO-3 partitions them, an adapter is exported on its own
        flat = not learner_cfg.lora.enabled and (learner_cfg.backend != "deepspeed" or learner_cfg.zero_stage == 0)
        if flat:
            pack_parameters(model)  # before the optimizer and DeepSpeed see them: a storage move only
        if learner_cfg.backend == "deepspeed":
            self.backend = DeepSpeedBackend(model, learner_cfg, total_steps, self.dtype)
        else:
            self.backend = TorchBackend(model, learner_cfg, total_steps)
        self.version = 0
        self.counters = LearnerCounters()

    @property
    def model(self) -> torch.nn.Module:
        """The underlying HF model (DeepSpeed's ``engine.module`` when wrapped)."""
        return self.backend.module

    # ------------------------------------------------------------------------------------------
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

    def train_step(self, pairs: Sequence[CorrectionPair], before_update: Callable[[], None] | None = None) -> StepStats:
        """One optimizer step over ``pairs`` split into ``grad_accum`` micro-batches.
        ``before_update`` runs just before the optimizer changes the weights: the Ray learner
        waits there until the last export's views of them are published (``actors/learner.py``)."""
        start = time.perf_counter()
        pairs = self._select(pairs)
        micro = max(1, math.ceil(len(pairs) / max(1, self.cfg.grad_accum)))
        chunks = [pairs[i : i + micro] for i in range(0, len(pairs), micro)] or [[]]
        totals = {"loss": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0}
        extra: dict[str, float] = {}
        n_pairs = n_tokens = applied = 0
        clock = PhaseClock(  # phase seconds, train/phase/<name>_s: where a step's time goes (docs/metrics.md)
            ("collate", "forward", "backward", "optimizer"),
            torch.cuda.synchronize if self.device.type == "cuda" else None)
        for chunk in chunks:
            with clock("collate"):
                batch, _ = self._collate(chunk) if chunk else (None, 0)
            if batch is None:
                continue
            with clock("forward"):
                scores = score_pairs(self.backend_forward_model, batch, self.objective)
                out = correction_loss(
                    scores, batch.ref_chosen_logps, batch.ref_rejected_logps, self.objective, batch.noop
                )
            if not self._all_ranks_finite(out.loss):
                self.counters.nonfinite_microbatches += 1
                continue
            with clock("backward"):
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
            if before_update is not None:
                before_update()
            with clock("optimizer"):
                grad_norm = self.backend.step()
            self.version += 1
            self.counters.steps += 1
        denom = max(1, n_pairs)
        extra = {k: v / denom for k, v in extra.items()}
        extra.update(clock.as_metrics("phase/"))
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

        With LoRA: the adapter's tensors alone (an adapter-only sync), or, with
        ``sync.lora_merge``, every base weight with the adapter folded in (``learner/lora.py``).
        """
        module = self.model
        if self.cfg.lora.enabled:
            yield from (lora.merged_weights if self.lora_merge else lora.adapter_weights)(module, self._gather())
            return
        if self.cfg.backend == "deepspeed" and self.cfg.zero_stage == 3:
            import deepspeed

            for name, param in module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.detach().clone()
            return
        for name, param in module.named_parameters():
            yield name, param.detach()

    def _gather(self):
        """ZeRO-3's ``GatheredParameters`` (whole parameters on every rank), else a no-op."""
        if self.cfg.backend == "deepspeed" and self.cfg.zero_stage == 3:
            import deepspeed

            return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return lora._no_gather

    def reference_mode(self):
        """Context in which ``self.model`` is pi_ref: the LoRA base with the adapter disabled
        (docs/lora.md). Only a LoRA learner has one; a full fine-tune moves every weight."""
        if not self.cfg.lora.enabled:
            raise ValueError("Learner.reference_mode needs learner.lora.enabled (a full fine-tune "
                             "keeps no untouched copy of the starting policy)")
        return lora.reference_mode(self.model)

    def save_pretrained(self, path) -> None:
        """Save the current policy as a standard HF directory (rank 0 writes). With LoRA,
        ``learner.lora.export`` picks a merged HF model or a peft adapter directory."""
        if self.cfg.lora.enabled:
            if self.cfg.lora.export == "adapter":
                lora.save_adapter(self.model, path)
            else:
                lora.save_merged(self.model, path, self._gather())
            return
        state = {name: t.to("cpu") for name, t in self.named_weights()}
        self.model.save_pretrained(path, state_dict=state)
