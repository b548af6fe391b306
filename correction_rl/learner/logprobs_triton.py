"""The selective log-softmax as two Triton kernels: the CUDA path of ``token_logprobs``.

Why: the chunked torch version (``logprobs.SelectiveLogSoftmax``) has the right memory (no
``[tokens, vocab]`` fp32 copy survives) but not the right time. Each chunk is a handful of
separate kernels (upcast, logsumexp; in backward sub, exp, mul, scatter, cast back), each one a
full pass over a ``[chunk, vocab]`` block, so on an H200 it ran 1.5x *slower* than the naive
``log_softmax + gather`` (issue 21). The work itself is bandwidth-bound: forward needs one read of
the logits, backward one read and one write. These kernels do exactly that, one program per
token row streaming across the vocabulary in blocks:

* ``_forward_kernel``: an online (running max, rescaled sum) logsumexp in fp32 per lane, reduced
  once at the end, plus the label's logit. Saves only ``lse`` (4 bytes per token) for backward.
* ``_backward_kernel``: ``grad = g * (onehot(label) - exp(x - lse))`` written block by block, into
  a fresh buffer or into the logits' own storage (``inplace``: every element is read before the
  same program overwrites it, and nothing else reads it; autograd's version counter still guards
  against another saved use of the logits, as in the torch version).

Arithmetic is fp32 whatever the logits' dtype; the gradient is cast to the logits' dtype on
store. Rows are addressed with 64-bit offsets (4 x 4096 x 151,936 elements overflow int32).
Triton is imported here only; ``logprobs.token_logprobs`` picks this path on CUDA when Triton is
importable (``CORRECTION_RL_LOGPROB_KERNEL=chunked`` forces the torch path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from correction_rl.learner.logprobs import gradient_storage

IGNORE_INDEX = -100
# Any power of two works. On an H200 (bench_logprobs.py --device cuda --sweep, 4 x 4096 x 151,936
# bf16, forward + backward) blocks of 2048-8192 with 4-16 warps all took 4.5-5.1 ms.
FORWARD_BLOCK, FORWARD_WARPS = 4096, 8
BACKWARD_BLOCK, BACKWARD_WARPS = 4096, 8


@triton.jit
def _forward_kernel(logits_ptr, labels_ptr, lse_ptr, picked_ptr, row_stride, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    run_max = tl.full([BLOCK], -3.0e38, tl.float32)  # finite: exp(run_max - new_max) never NaNs
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)
        run_max = new_max
    top = tl.max(run_max, axis=0)
    total = tl.sum(run_sum * tl.exp(run_max - top), axis=0)
    tl.store(lse_ptr + row, top + tl.log(total))
    label = tl.load(labels_ptr + row)
    tl.store(picked_ptr + row, tl.load(base + label).to(tl.float32))


@triton.jit
def _backward_kernel(
    logits_ptr, grad_ptr, labels_ptr, lse_ptr, g_ptr, row_stride, grad_row_stride, vocab,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    grad_base = grad_ptr + row * grad_row_stride
    g = tl.load(g_ptr + row)
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        inside = idx < vocab
        x = tl.load(base + idx, mask=inside, other=0.0).to(tl.float32)
        grad = -g * tl.exp(x - lse)
        grad = tl.where(idx == label, grad + g, grad)
        tl.store(grad_base + idx, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


class TritonSelectiveLogSoftmax(torch.autograd.Function):
    """Same contract as ``logprobs.SelectiveLogSoftmax`` (values, IGNORE_INDEX rows, in-place
    backward), computed by the two kernels above."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, inplace: bool):
        flat = _rows(logits)
        flat_labels = labels.reshape(-1)
        valid = flat_labels != IGNORE_INDEX
        safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels)).contiguous()
        n, vocab = flat.shape
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        if n:
            _forward_kernel[(n,)](flat, safe_labels, lse, picked, flat.stride(0), vocab,
                                  BLOCK=FORWARD_BLOCK, num_warps=FORWARD_WARPS)
        out = torch.where(valid, picked - lse, torch.zeros_like(lse))
        ctx.save_for_backward(logits, safe_labels, valid, lse)
        ctx.inplace = inplace
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, safe_labels, valid, lse = ctx.saved_tensors  # checks the version counter
        vocab = logits.shape[-1]
        g = (grad_out.reshape(-1).float() * valid).contiguous()
        grad = gradient_storage(logits, ctx.inplace)
        flat = _rows(logits.detach())
        flat_grad = grad.view(-1, vocab)
        n = flat.shape[0]
        if n:
            _backward_kernel[(n,)](flat, flat_grad, safe_labels, lse, g, flat.stride(0),
                                   flat_grad.stride(0), vocab,
                                   BLOCK=BACKWARD_BLOCK, num_warps=BACKWARD_WARPS)
        return grad, None, None


def triton_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = False):
    """``log softmax(logits)[..., labels]`` (shape of ``labels``; IGNORE_INDEX -> 0) on CUDA."""
    return TritonSelectiveLogSoftmax.apply(logits, labels, bool(inplace_backward))
