"""LoRA on the learner: wrap the policy in a peft adapter, and export either the adapter alone or
the merged weights.

Why: a full fine-tune of a 3B-class policy on one GPU leaves no room for the engine and the
teacher (docs/scaling.md); with an adapter only r * (d_in + d_out) numbers per target layer get
gradients and AdamW moments, a weight sync ships only those, and the frozen base doubles as
pi_ref (the adapter disabled; ``pairs/reference.py``). docs/lora.md has the numbers.

Export forms (``Learner.named_weights``):

* adapter (default): the LoRA tensors under their peft file names (``weights/adapter.py``), a
  few MB where the model is hundreds;
* merged (``sync.lora_merge``, ``learner.lora.export: merged``): every base weight under its
  plain HF name, with W = W0 + (alpha / r) * B @ A on the adapted layers (peft's own
  ``get_delta_weight``), computed on the fly: the learner's model is never modified, so training
  continues on the unmerged adapter.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch

from correction_rl.config.sections import LoRAConfig
from correction_rl.weights.adapter import ADAPTER, add_adapter, is_lora_name, wire_name

Gather = Callable[[list[torch.nn.Parameter]], ContextManager]
"""Context that makes the listed parameters whole on this rank (ZeRO-3's ``GatheredParameters``;
a no-op elsewhere)."""


def _no_gather(params: list[torch.nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


def wrap(model: torch.nn.Module, cfg: LoRAConfig, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The policy with a fresh adapter; only the adapter's parameters require grad afterwards,
    so both backends build their optimizer (and its state) over the adapter alone."""
    peft_model = add_adapter(model, cfg)
    if gradient_checkpointing:
        # the frozen embeddings' output needs grad, or re-entrant checkpointing drops the backward
        peft_model.enable_input_require_grads()
    return peft_model


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def adapter_weights(model: torch.nn.Module, gather: Gather = _no_gather) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter's tensors by wire name (``weights/adapter.py``)."""
    for name, param in model.named_parameters():
        if is_lora_name(name):
            with gather([param]):
                yield wire_name(name), param.detach().clone() if gather is not _no_gather else param.detach()


def _base_name(name: str) -> str:
    """A peft parameter name -> the plain HF name (``base_model.model.`` and ``.base_layer``
    taken out)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def merged_weights(model: torch.nn.Module, gather: Gather = _no_gather) -> Iterator[tuple[str, torch.Tensor]]:
    """Every base weight by its HF name, the adapter folded in: W0 + scale * B @ A on the
    adapted layers, W0 elsewhere. Fresh tensors for the adapted layers; the model is untouched."""
    from peft.tuners.lora import LoraLayer

    lora_layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}
    for name, param in model.named_parameters():
        if is_lora_name(name):
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        layer = lora_layers.get(owner) if owner is not None else None
        if layer is None or not name.endswith(".base_layer.weight"):
            with gather([param]):
                yield _base_name(name), (param.detach().clone() if gather is not _no_gather else param.detach())
            continue
        adapter = [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        with gather([param, *adapter]), torch.no_grad():
            delta = layer.get_delta_weight(ADAPTER)
            yield _base_name(name), (param.detach() + delta.to(param.dtype))


def reference_mode(model: torch.nn.Module) -> ContextManager:
    """The base policy, adapter disabled: pi_ref for free (docs/lora.md)."""
    return model.disable_adapter()


def save_adapter(model: torch.nn.Module, path) -> None:
    """Write a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    model.save_pretrained(str(path))


def save_merged(model: torch.nn.Module, path, gather: Gather = _no_gather) -> None:
    """Write a plain HF model directory with the adapter folded into the weights."""
    state = {name: t.to("cpu").contiguous() for name, t in merged_weights(model, gather)}
    model.get_base_model().save_pretrained(str(path), state_dict=state)
