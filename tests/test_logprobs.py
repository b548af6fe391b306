"""The chunked selective log-softmax equals log_softmax + gather, values and gradients."""

import math

import pytest
import torch

from correction_rl.learner.logprobs import (
    IGNORE_INDEX,
    naive_sequence_logprobs,
    sequence_logprobs,
    shifted_labels,
    token_logprobs,
)


def test_token_logprobs_by_hand():
    # logits [0, log 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)], [5.0, 5.0]]])
    labels = torch.tensor([[0, 1, IGNORE_INDEX]])
    out = token_logprobs(logits, labels, chunk_size=2)
    assert out.tolist()[0] == pytest.approx([math.log(0.25), math.log(0.75), 0.0], abs=1e-6)


def test_shift_and_mask_by_hand():
    ids = torch.tensor([[1, 7, 8, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 0]])  # tokens 8 and 9 are the response
    assert shifted_labels(ids, mask).tolist() == [[IGNORE_INDEX, 8, 9, IGNORE_INDEX, IGNORE_INDEX]]
    logits = torch.zeros(1, 5, 10)  # uniform: every token has log-prob -log 10
    assert sequence_logprobs(logits, ids, mask).item() == pytest.approx(-2 * math.log(10))
    assert sequence_logprobs(logits, ids, mask, normalization="mean").item() == pytest.approx(-math.log(10))


def random_case(seed, rows=3, seq=9, vocab=13, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, seq, vocab, generator=g)).to(dtype)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.zeros(rows, seq, dtype=torch.long)
    mask[0, 2:7] = 1
    mask[1, 4:] = 1
    mask[2, 1:3] = 1
    return logits, ids, mask


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("normalization", ["sum", "mean"])
@pytest.mark.parametrize("inplace", [False, True])
def test_chunked_matches_naive_values_and_grads(chunk, normalization, inplace):
    logits, ids, mask = random_case(0)
    weights = torch.tensor([0.3, -1.2, 2.0])
    ref = logits.clone().requires_grad_()
    got = logits.clone().requires_grad_()
    expected = naive_sequence_logprobs(ref, ids, mask, normalization)
    (expected * weights).sum().backward()
    # `* 1.0` makes the kernel's input a non-leaf, as the model's logits are
    out = sequence_logprobs(got * 1.0, ids, mask, chunk, normalization, inplace_backward=inplace)
    (out * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got.grad, ref.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_bf16_logits_are_computed_in_fp32(inplace):
    logits, ids, mask = random_case(1, dtype=torch.bfloat16)
    ref = logits.float().requires_grad_()
    got = logits.clone().requires_grad_()
    expected = naive_sequence_logprobs(ref, ids, mask)
    expected.sum().backward()
    out = sequence_logprobs(got * 1.0, ids, mask, chunk_size=5, inplace_backward=inplace)
    out.sum().backward()
    assert out.dtype == torch.float32 and got.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)  # exact fp32 maths on bf16 inputs
    torch.testing.assert_close(got.grad.float(), ref.grad, rtol=1e-2, atol=1e-2)  # bf16 rounding of the grad


def test_inplace_backward_refuses_logits_saved_elsewhere():
    logits, ids, mask = random_case(2)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0
    other = (x * x).sum()  # mul saves x: overwriting it would corrupt this gradient
    out = sequence_logprobs(x, ids, mask, inplace_backward=True).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out + other).backward()


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\)"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), chunk_size=0)


def test_kernel_choice_on_cpu_is_the_chunked_torch_version(monkeypatch):
    from correction_rl.learner.logprobs import KERNEL_ENV, resolve_kernel, triton_available

    logits = torch.zeros(2, 3, 5)
    assert resolve_kernel(logits) == "chunked"  # Triton only ever runs on CUDA tensors
    monkeypatch.setenv(KERNEL_ENV, "chunked")
    assert resolve_kernel(logits, "auto") == "chunked"
    with pytest.raises(ValueError, match="auto, chunked or triton"):
        resolve_kernel(logits, "fast")
    if not triton_available():
        with pytest.raises(RuntimeError, match="Triton does not import"):
            resolve_kernel(logits, "triton")


def cuda_case(rows, seq, vocab, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (3 * torch.randn(rows, seq, vocab, device="cuda", generator=g)).to(dtype)
    ids = torch.randint(0, vocab, (rows, seq), device="cuda", generator=g)
    mask = torch.zeros(rows, seq, dtype=torch.long, device="cuda")
    mask[0, 2:-3] = 1
    mask[1:, seq // 4 :] = 1
    return logits, ids, mask


@pytest.mark.gpu
def test_auto_picks_the_triton_kernel_on_cuda():
    from correction_rl.learner.logprobs import resolve_kernel

    assert resolve_kernel(torch.zeros(1, 2, 3, device="cuda")) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("vocab", [1000, 151_936])  # a partial last block; the vocabulary
def test_triton_kernel_matches_naive_values_and_grads(dtype, inplace, vocab):
    logits, ids, mask = cuda_case(3, 64, vocab, dtype)
    weights = torch.tensor([0.3, -1.2, 2.0], device="cuda")
    ref = logits.float().clone().requires_grad_()  # two independent leaves (.float() of fp32 is a no-op)
    got = logits.clone().requires_grad_()
    expected = naive_sequence_logprobs(ref, ids, mask)
    (expected * weights).sum().backward()
    out = sequence_logprobs(got * 1.0, ids, mask, inplace_backward=inplace, kernel="triton")
    (out * weights).sum().backward()
    assert out.dtype == torch.float32 and got.grad.dtype == dtype
    # fp32 maths on the same inputs: only summation order differs
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-3)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.grad.float(), ref.grad, **tol)
    ignored = torch.cat([mask[:, 1:] == 0, torch.ones_like(mask[:, :1], dtype=torch.bool)], dim=1)
    assert got.grad[ignored].abs().max().item() == 0  # IGNORE_INDEX rows get exactly zero


@pytest.mark.gpu
def test_triton_kernel_agrees_with_the_chunked_one_on_a_large_batch():
    """4 x 4096 tokens of the issue's shape at a smaller vocabulary: 64-bit row offsets and
    many programs; the chunked torch version is the reference here (same fp32 maths)."""
    logits, ids, mask = cuda_case(4, 4096, 32_768, torch.bfloat16, seed=1)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out_a = sequence_logprobs(a * 1.0, ids, mask, inplace_backward=True, kernel="triton")
    out_b = sequence_logprobs(b * 1.0, ids, mask, inplace_backward=True, kernel="chunked")
    out_a.sum().backward()
    out_b.sum().backward()
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-2, atol=1e-2)
