"""LoRA in the HF engine: the engine's model carries the same peft adapter as the learner, and an
adapter-only sync copies the adapter's tensors into it.

Why a peft model and not merge-on-load (W = W0 + scale * B @ A written into the base weights):
the learner computes ``base(x) + scale * B(A(x))``; the merged form computes ``(W0 + scale * B @ A)
x``, which rounds differently, so greedy decoding could drift from the learner on a near-tie. With
the same peft layers on both sides the engine runs exactly the learner's arithmetic (dropout is
off in eval), so greedy equality is exact, and applying a sync touches only the adapter: a few
MB, no model rebuild. The base weights are never written after start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from correction_rl.weights.adapter import add_adapter, is_lora_name, wire_name
from correction_rl.weights.sync import copy_by_name
from correction_rl.types import WeightUpdate

if TYPE_CHECKING:
    from correction_rl.config.sections import LoRAConfig


def attach(model: torch.nn.Module, cfg: "LoRAConfig") -> torch.nn.Module:
    """The engine's model with a fresh adapter (B = 0: it serves the base until the first sync)."""
    peft_model = add_adapter(model, cfg)
    return peft_model.eval()


def has_adapter(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def apply_adapter(model: torch.nn.Module, update: WeightUpdate) -> int:
    """Copy an adapter-only ``update`` into ``model``'s adapter; it must cover every adapter
    tensor with matching shapes (a rank or target-module mismatch between learner and engine
    fails here, naming the tensor). Returns the bytes copied."""
    if not has_adapter(model):
        raise ValueError(
            f"weight update v{update.version} holds only LoRA adapter tensors, but this engine has no "
            "adapter: build it with the run's learner.lora (run/components.py does), or set "
            "sync.lora_merge: true to ship merged full weights")
    params = {wire_name(n): p for n, p in model.named_parameters() if is_lora_name(n)}
    return copy_by_name(params, update, "adapter tensor",
                        " (learner.lora.rank and target_modules must match the engine's adapter)")
