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


def cut_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], FinishReason, int | None]:
    """(response tokens before the first stop id, finish reason, the stop id found or None).

    Every declared stop id counts (a chat model ends a turn with ``<|im_end|>`` but may also
    emit ``<|endoftext|>``); the one found is returned so the pair can put back exactly the
    token the policy produced. Padding only ever follows a stop, so tokens before it are real
    samples even when one equals the pad id."""
    ids = [int(i) for i in token_ids]
    stops = set(int(i) for i in stop_ids)
    for position, token in enumerate(ids):
        if token in stops:
            return ids[:position], "stop", token
    return ids, "length", None


def cut_at_eos(token_ids: Sequence[int], eos_id: int) -> tuple[list[int], FinishReason]:
    """``cut_at_stop`` with a single stop id (kept for callers that know only one)."""
    ids, finish, _ = cut_at_stop(token_ids, [eos_id])
    return ids, finish


def make_rollout(
    prompt: Prompt,
    prompt_ids: list[int],
    response_ids: list[int],
    finish_reason: FinishReason,
    logprobs: list[float],
    tokenizer,
    policy_version: int,
    stop_id: int | None = None,
) -> Rollout:
    return Rollout(
        prompt=prompt,
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        response_text=tokenizer.decode(response_ids, skip_special_tokens=True),
        policy_version=policy_version,
        finish_reason=finish_reason,
        logprobs=logprobs[: len(response_ids)],
        stop_id=stop_id if finish_reason == "stop" else None,
    )
