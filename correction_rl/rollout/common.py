"""Pieces both engines share, so that HF and vLLM rollouts are built by the same rules."""

from __future__ import annotations

from typing import Sequence

from correction_rl.types import FinishReason, Prompt, Rollout, Sampling


def validate_sampling(sampling: Sampling) -> None:
    """Reject settings that would otherwise fail deep inside an engine with a vague message."""
    if sampling.max_new_tokens < 1:
        raise ValueError(f"Sampling.max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    if sampling.temperature < 0:
        raise ValueError(f"Sampling.temperature must be >= 0, got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"Sampling.top_p must be in (0, 1], got {sampling.top_p}")


def request_seed(seed: int | None, index: int) -> int | None:
    """Per-request seed derived from the call's seed: distinct for each prompt of a batch and
    reproducible across calls and engines restarts."""
    if seed is None:
        return None
    return (seed * 1_000_003 + index * 7_919) % (2**31 - 1)


def cut_at_eos(token_ids: Sequence[int], eos_id: int) -> tuple[list[int], FinishReason]:
    """Response tokens before the first eos. Padding only ever follows eos, so tokens before
    it are real samples even when one equals the pad id."""
    ids = list(token_ids)
    if eos_id in ids:
        return ids[: ids.index(eos_id)], "stop"
    return ids, "length"


def make_rollout(
    prompt: Prompt,
    prompt_ids: list[int],
    response_ids: list[int],
    finish_reason: FinishReason,
    logprobs: list[float],
    tokenizer,
    policy_version: int,
) -> Rollout:
    return Rollout(
        prompt=prompt,
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        response_text=tokenizer.decode(response_ids, skip_special_tokens=True),
        policy_version=policy_version,
        finish_reason=finish_reason,
        logprobs=logprobs[: len(response_ids)],
    )
