"""The shared-prefix forward equals the naive concatenated forward: log-probs, loss, gradients."""

import pytest
import torch

from correction_rl.learner.collate import collate_pairs
from correction_rl.config import ObjectiveConfig
from correction_rl.models import build_model
from correction_rl.learner.objectives import correction_loss
from correction_rl.learner.shared_prefix import score_pairs, shared_prefix_cost_ratio, use_shared_prefix
from correction_rl.types import CorrectionPair


def pair(pid, prompt, chosen, rejected):
    return CorrectionPair(pid, prompt, rejected, chosen, 0, "t", 0, ref_logps=(-20.0, -21.0))


# Every shape the suffix pass meets: a late divergence, a no-op, no shared response token, y' a
# strict prefix of y and the reverse, and prompts of different lengths (prefix padding).
PAIRS = [
    pair("late", [1, 5, 6, 7], [10, 11, 12, 13, 2], [10, 11, 14, 2]),
    pair("noop", [1, 8], [20, 21, 22, 2], [20, 21, 22, 2]),
    pair("first", [1, 9, 9, 9, 9, 9, 9], [30, 2], [31, 32, 33, 34, 2]),
    pair("longer_y", [1, 4], [40, 41], [40, 41, 42, 43, 2]),
    pair("longer_y_prime", [1, 4, 4], [50, 51, 52, 2], [50, 51]),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("tiny", seed=3)
    m.train()
    return m


def run(model, batch, cfg):
    model.zero_grad(set_to_none=True)
    scores = score_pairs(model, batch, cfg)
    out = correction_loss(scores, batch.ref_chosen_logps, batch.ref_rejected_logps, cfg, batch.noop)
    # add the raw log-probs so that every row (no-ops included) sends a gradient
    (out.loss + 0.01 * scores.chosen_logps.sum() - 0.02 * scores.rejected_logps.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return scores, out.loss.detach(), grads


@pytest.mark.parametrize("form,normalization", [("logistic", "sum"), ("dpo", "mean"), ("plain", "sum")])
def test_shared_prefix_equals_naive(model, form, normalization):
    batch, _ = collate_pairs(PAIRS, pad_id=0, max_seq_len=32, truncation="drop")
    base = dict(form=form, normalization=normalization, logprob_chunk_size=7)
    naive = run(model, batch, ObjectiveConfig(shared_prefix="off", **base))
    shared = run(model, batch, ObjectiveConfig(shared_prefix="on", **base))
    assert not naive[0].used_shared_prefix and shared[0].used_shared_prefix
    torch.testing.assert_close(shared[0].chosen_logps, naive[0].chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[0].rejected_logps, naive[0].rejected_logps, rtol=1e-5, atol=1e-5)
    assert shared[0].chosen_tokens.tolist() == naive[0].chosen_tokens.tolist() == [5, 4, 2, 2, 4]
    torch.testing.assert_close(shared[1], naive[1], rtol=1e-5, atol=1e-6)
    for name, grad in naive[2].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(shared[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_all_noop_batch_needs_no_suffix_pass(model):
    batch, _ = collate_pairs([PAIRS[1], pair("n2", [1, 3], [5, 6], [5, 6])], 0, 32, "drop")
    naive = run(model, batch, ObjectiveConfig(form="logistic", shared_prefix="off"))
    shared = run(model, batch, ObjectiveConfig(form="logistic", shared_prefix="on"))
    torch.testing.assert_close(shared[0].chosen_logps, naive[0].chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[0].rejected_logps, shared[0].chosen_logps)


def test_auto_rule_follows_the_padded_token_cost(model):
    cfg = ObjectiveConfig(shared_prefix="auto")
    long_shared = [pair(str(i), [1, 4], [5] * 20 + [6], [5] * 20 + [7]) for i in range(2)]
    batch, _ = collate_pairs(long_shared, 0, 64, "drop")
    # prefix 22 tokens once + 2 suffixes of 1 token vs 2 rows of 23: (2*22 + 4*1) / (4*23)
    assert shared_prefix_cost_ratio(batch) == pytest.approx((2 * 22 + 4 * 1) / (4 * 23))
    assert use_shared_prefix(model, batch, cfg)
    nothing_shared = [pair(str(i), [1, 4], [6] + [5] * 20, [7] + [5] * 20) for i in range(2)]
    batch, _ = collate_pairs(nothing_shared, 0, 64, "drop")
    assert not use_shared_prefix(model, batch, cfg)
    assert use_shared_prefix(model, batch, ObjectiveConfig(shared_prefix="on"))
    assert not use_shared_prefix(model, batch, ObjectiveConfig(shared_prefix="off"))


def test_gradient_checkpointing_disables_the_cache_path():
    m = build_model("tiny")
    m.gradient_checkpointing_enable()
    m.train()
    batch, _ = collate_pairs(PAIRS, 0, 32, "drop")
    assert not use_shared_prefix(m, batch, ObjectiveConfig(shared_prefix="auto"))
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        use_shared_prefix(m, batch, ObjectiveConfig(shared_prefix="on"))


def test_reference_scoring_under_no_grad_matches(model):
    # reference log-probs are computed with the same function under no_grad
    batch, _ = collate_pairs(PAIRS, 0, 32, "drop")
    for mode in ("on", "off"):
        cfg = ObjectiveConfig(shared_prefix=mode)
        with torch.no_grad():
            ref = score_pairs(model, batch, cfg)
        live = score_pairs(model, batch, cfg)
        assert not ref.chosen_logps.requires_grad and live.chosen_logps.requires_grad
        torch.testing.assert_close(ref.chosen_logps, live.chosen_logps.detach())
        torch.testing.assert_close(ref.rejected_logps, live.rejected_logps.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("shared_prefix", ["off", "on"])
def test_on_cuda_the_triton_kernel_scores_pairs_like_the_chunked_one(model, monkeypatch, shared_prefix):
    """score_pairs picks the Triton log-prob kernel on CUDA by itself; the scores, loss and
    parameter gradients equal those of the chunked torch kernel (same fp32 maths)."""
    from correction_rl.learner.logprobs import KERNEL_ENV

    cuda_model = build_model("tiny", seed=3).cuda().train()
    batch, _ = collate_pairs(PAIRS, pad_id=0, max_seq_len=32, truncation="drop")
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor):
            setattr(batch, name, value.cuda())
    cfg = ObjectiveConfig(form="dpo", shared_prefix=shared_prefix)
    results = {}
    for kernel in ("triton", "chunked"):
        monkeypatch.setenv(KERNEL_ENV, kernel)
        results[kernel] = run(cuda_model, batch, cfg)
    (s_t, l_t, g_t), (s_c, l_c, g_c) = results["triton"], results["chunked"]
    torch.testing.assert_close(s_t.chosen_logps, s_c.chosen_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s_t.rejected_logps, s_c.rejected_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(l_t, l_c, rtol=1e-5, atol=1e-5)
    for name in g_c:
        torch.testing.assert_close(g_t[name], g_c[name], rtol=1e-4, atol=1e-5)
