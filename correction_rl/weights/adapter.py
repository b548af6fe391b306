"""The wire format of a LoRA adapter sync, shared by the learner (export) and the engines (apply).

Why its own module, down here in ``weights/``: the learner (layer 3) writes adapter updates and
the rollout engines (layer 2) read them, so the naming rule and the peft config both sides build
their adapters from must live in a layer both may import. An adapter update is an ordinary
``WeightUpdate`` (same buckets, same transports); what makes it one is that every tensor in it is
a LoRA tensor, named as peft names them in an adapter file (``adapter_model.safetensors``):
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``, i.e. the in-memory
parameter name with the adapter's name (``.default``) taken out. That is also the name vLLM
reads from an adapter directory, so the vLLM engine writes the tensors to disk unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from correction_rl.types import WeightUpdate

if TYPE_CHECKING:
    from correction_rl.config.sections import LoRAConfig

ADAPTER = "default"
"""The one adapter name every peft model here uses (peft's default)."""
_MARKERS = (".lora_A.", ".lora_B.")


def is_lora_name(name: str) -> bool:
    return any(m in name for m in _MARKERS)


def wire_name(param_name: str) -> str:
    """``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight`` (peft's file naming)."""
    return param_name.replace(f".{ADAPTER}.", ".")


def is_adapter_update(update: WeightUpdate) -> bool:
    """True when every tensor of ``update`` is a LoRA tensor (an adapter-only sync). A mixed
    update is refused: it would mean a learner exporting half a merge."""
    flags = {is_lora_name(name) for name, *_ in update.layout}
    if flags == {True, False}:
        raise ValueError(f"weight update v{update.version} mixes LoRA tensors with full weights; an "
                         "update is either the adapter alone or the whole model")
    return flags == {True}


def peft_config(cfg: "LoRAConfig") -> Any:
    """The ``peft.LoraConfig`` every side builds its adapter from (the learner's trainable one,
    the HF engine's copy, vLLM's adapter directory), so the scale alpha / r and the target
    layers agree by construction."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def add_adapter(model: Any, cfg: "LoRAConfig") -> Any:
    """Wrap ``model`` in a peft model with a fresh adapter (B = 0: the wrapped model computes
    exactly what the base does). Every name in ``learner.lora.target_modules`` must match a
    layer, or the error names the field and the layer names that exist."""
    from peft import get_peft_model

    from correction_rl.config.loading import ConfigError

    leaves = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear)}
    unknown = [t for t in cfg.target_modules if t not in leaves]
    if unknown:
        raise ConfigError(f"learner.lora.target_modules: {unknown} match no Linear layer of the policy "
                          f"(its Linear layers: {sorted(leaves)})")
    return get_peft_model(model, peft_config(cfg))
