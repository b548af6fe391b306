"""Sequence log-probs of response tokens without materializing the ``[batch, seq, vocab]``
log-softmax (docs/objectives.md, "Log-prob kernel").

Why a custom kernel: ``log_softmax(logits).gather(...)`` keeps a full-vocabulary fp32 copy of the
logits for backward, and its backward builds two more (the scattered output gradient and the
input gradient). At 128k vocabulary x 8 x 1024 tokens each copy is 4.3 GB. Only two numbers per
token are needed: the label's logit and the log-partition ``logsumexp``. ``SelectiveLogSoftmax``
keeps just the ``[tokens]`` logsumexp for backward and recomputes the softmax chunk by chunk
(``chunk_size`` tokens of the flattened ``batch * seq`` axis at a time), so the extra memory is one
gradient the size of the logits (the unavoidable output of backward) plus one fp32 chunk. With
``inplace_backward=True`` even that gradient is written into the logits' own storage, which is
safe because backward checks the logits' autograd version counter: if anything else saved the
logits for its backward, autograd raises instead of using overwritten values.

All arithmetic is fp32, also for bf16 logits (the chunk is upcast, the gradient cast back).

On CUDA the same function runs as two fused Triton kernels (``logprobs_triton``), chosen by
``kernel="auto"`` whenever the logits are on a CUDA device and Triton imports: the chunked torch
version launches several full passes per chunk and was 1.5x slower than naive on an H200, the
kernels make one pass forward and one read+write backward. ``CORRECTION_RL_LOGPROB_KERNEL``
(``chunked`` / ``triton``) overrides ``auto`` process-wide, e.g. to rule the kernel out.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Normalization = Literal["sum", "mean"]
Kernel = Literal["auto", "chunked", "triton"]
IGNORE_INDEX = -100
KERNEL_ENV = "CORRECTION_RL_LOGPROB_KERNEL"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton kernels import (Triton is not installed with the CPU-only torch)."""
    try:
        import correction_rl.learner.logprobs_triton  # noqa: F401
    except Exception:  # ImportError, or a Triton that cannot find a compiler/driver
        return False
    return True


def resolve_kernel(logits: torch.Tensor, kernel: Kernel = "auto") -> str:
    """``chunked`` or ``triton`` for these logits: ``auto`` (or the env override) picks Triton on
    CUDA when it imports, the chunked torch version everywhere else."""
    if kernel == "auto":
        kernel = os.environ.get(KERNEL_ENV, "auto") or "auto"
    if kernel not in ("auto", "chunked", "triton"):
        raise ValueError(f"log-prob kernel must be auto, chunked or triton, got {kernel!r}")
    if kernel == "auto":
        return "triton" if logits.is_cuda and triton_available() else "chunked"
    if kernel == "triton" and not triton_available():
        raise RuntimeError("log-prob kernel 'triton' asked for, but Triton does not import here")
    return kernel


def gradient_storage(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Where the logits' gradient is written: the logits' own storage when ``inplace`` (nothing
    of size ``[tokens, vocab]`` is allocated; safe because nothing downstream needs the logits'
    values after this backward, and autograd's version counter catches a caller that does), else
    a fresh contiguous tensor."""
    if not inplace:
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
    if not logits.is_contiguous():
        raise RuntimeError("inplace_backward needs contiguous logits")
    return logits.detach()


class SelectiveLogSoftmax(torch.autograd.Function):
    """``out[i] = logits[i, labels[i]] - logsumexp(logits[i])`` over rows of a 2-D ``[N, V]``
    view, with a chunked backward ``grad[i] = g[i] * (onehot(labels[i]) - softmax(logits[i]))``.
    Rows whose label is ``IGNORE_INDEX`` give 0 and receive a zero gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_size: int, inplace: bool):
        flat = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        valid = flat_labels != IGNORE_INDEX
        safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
        lse = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        picked = flat.gather(1, safe_labels[:, None]).squeeze(1).float()
        for start in range(0, flat.shape[0], chunk_size):
            chunk = flat[start : start + chunk_size].float()
            lse[start : start + chunk_size] = torch.logsumexp(chunk, dim=-1)
        out = torch.where(valid, picked - lse, torch.zeros_like(lse))
        ctx.save_for_backward(logits, safe_labels, valid, lse)
        ctx.chunk_size = chunk_size
        ctx.inplace = inplace
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, safe_labels, valid, lse = ctx.saved_tensors  # checks the version counter
        vocab = logits.shape[-1]
        g = (grad_out.reshape(-1).float() * valid).contiguous()
        grad = gradient_storage(logits, ctx.inplace)
        flat = logits.detach().reshape(-1, vocab)
        flat_grad = grad.view(-1, vocab)
        for start in range(0, flat.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            g_chunk = g[start:stop, None]
            src, dest = flat[start:stop], flat_grad[start:stop]
            # d out / d x = onehot(label) - softmax(x), softmax(x) = exp(x - lse)
            work = dest if src.dtype == torch.float32 else torch.empty_like(src, dtype=torch.float32)
            torch.sub(src, lse[start:stop, None], out=work)
            work.exp_().mul_(-g_chunk).scatter_add_(1, safe_labels[start:stop, None], g_chunk)
            if work is not dest:
                dest.copy_(work)  # bf16/fp16 logits: fp32 chunk cast back
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 256,
    inplace_backward: bool = False,
    kernel: Kernel = "auto",
) -> torch.Tensor:
    """``log softmax(logits)[..., labels]`` for every position, same shape as ``labels``.

    No shift here: ``logits[..., t, :]`` scores ``labels[..., t]``; positions labelled
    ``IGNORE_INDEX`` (-100) give 0. ``chunk_size`` counts flattened tokens (rows of ``[N, V]``).
    ``inplace_backward`` writes the gradient into ``logits``' storage (see the module docstring).
    ``kernel`` picks the implementation (``resolve_kernel``); ``chunk_size`` only matters to the
    chunked one.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"token_logprobs: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
            "must agree on every dimension but the last (vocabulary)"
        )
    if chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")
    if resolve_kernel(logits, kernel) == "triton":
        from correction_rl.learner.logprobs_triton import triton_token_logprobs

        return triton_token_logprobs(logits, labels, inplace_backward)
    return SelectiveLogSoftmax.apply(logits, labels, int(chunk_size), bool(inplace_backward))


def shifted_labels(input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: ``labels[:, t] = input_ids[:, t + 1]`` where token t+1 is a
    response token, ``IGNORE_INDEX`` elsewhere (prompt, padding, and the last position, which
    predicts past the end). Keeping ``[rows, seq]`` (no slicing of the logits) is what lets the
    in-place backward reuse the logits' storage."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(
        response_mask[:, 1:].bool(), input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE_INDEX)
    )
    return labels


def reduce_logprobs(
    token_lp: torch.Tensor, num_tokens: torch.Tensor, normalization: Normalization
) -> torch.Tensor:
    """Sum of per-token log-probs, divided by the token count for ``mean`` (0 tokens -> 0)."""
    total = token_lp.sum(dim=-1) if token_lp.dim() > 1 else token_lp
    if normalization == "sum":
        return total
    if normalization == "mean":
        return total / num_tokens.clamp(min=1).to(total.dtype)
    raise ValueError(f"objective.normalization must be 'sum' or 'mean', got {normalization!r}")


def sequence_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int = 256,
    normalization: Normalization = "sum",
    inplace_backward: bool = False,
    kernel: Kernel = "auto",
) -> torch.Tensor:
    """``[rows]`` log pi(response | prompt) from a causal LM's ``[rows, seq, vocab]`` logits.

    ``response_mask[:, t]`` marks token t as a response token (``TrainBatch`` convention); the
    logits at t-1 predict it. ``normalization="mean"`` divides by the number of response tokens.
    """
    if input_ids.shape != response_mask.shape or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"sequence_logprobs: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)} "
            f"and response_mask {tuple(response_mask.shape)} must share [rows, seq]"
        )
    labels = shifted_labels(input_ids, response_mask)
    token_lp = token_logprobs(logits, labels, chunk_size, inplace_backward, kernel)
    num_tokens = (labels != IGNORE_INDEX).sum(dim=-1)
    return reduce_logprobs(token_lp, num_tokens, normalization)


def naive_sequence_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    normalization: Normalization = "sum",
) -> torch.Tensor:
    """The textbook ``log_softmax + gather`` version: the reference that tests and
    ``benchmarks/bench_logprobs.py`` compare the chunked kernel against."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = response_mask[:, 1:].to(picked.dtype)
    return reduce_logprobs(picked * mask, mask.sum(-1), normalization)
