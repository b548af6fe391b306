"""Rollout engines: the ``Generator`` protocol and its HF and vLLM implementations.

Engines are imported lazily by ``build_generator`` so that importing this package never
imports vllm (only ``correction_rl.rollout.vllm`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from correction_rl.rollout.base import Generator

__all__ = ["Generator", "build_generator"]


def build_generator(
    engine: Literal["hf", "vllm"],
    model_path: str | Path,
    *,
    policy_version: int = 0,
    seed: int = 0,
    device: str = "cpu",
    max_model_len: int = 512,
    kv_cache_gb: int = 1,
    gpu_memory_utilization: float = 0.3,
    chat_template: str = "auto",
    system_prompt: str | None = None,
    lora=None,
    lora_keep: int = 1,
) -> Generator:
    """One engine over a saved model directory. Engine-specific knobs are ignored by the
    engine that has no use for them (``device`` by vLLM, the vLLM memory settings by HF).
    ``lora``: the run's ``learner.lora`` when syncs ship only the adapter (docs/lora.md); vLLM
    keeps ``lora_keep`` adapter versions loaded."""
    if engine == "hf":
        from correction_rl.rollout.hf import HFGenerator

        return HFGenerator(model_path, policy_version=policy_version, device=device,
                           chat_template=chat_template, system_prompt=system_prompt, lora=lora)
    if engine == "vllm":
        from correction_rl.rollout.vllm import VLLMGenerator

        return VLLMGenerator(
            model_path,
            policy_version=policy_version,
            seed=seed,
            max_model_len=max_model_len,
            kv_cache_gb=kv_cache_gb,
            gpu_memory_utilization=gpu_memory_utilization,
            chat_template=chat_template,
            system_prompt=system_prompt,
            lora=lora,
            lora_keep=lora_keep,
        )
    raise ValueError(f"unknown rollout engine {engine!r}; allowed: 'hf', 'vllm'")
