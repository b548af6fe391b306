"""The correction loss family against numbers computed by hand (docs/objectives.md eqs. 1-6).

Shared fixture: two pairs with c = log pi(y'|x) = [-2, -1], r = log pi(y|x) = [-3, -0.5],
reference c_ref = [-2.5, -1.5], r_ref = [-2, -1], beta = 0.5.
"""

import math

import pytest
import torch

from correction_rl.config import LengthPriorConfig, ObjectiveConfig
from correction_rl.learner.objectives import (
    NegativeBinomialLengthPrior,
    PairScores,
    correction_loss,
    needs_reference,
)

C, R = [-2.0, -1.0], [-3.0, -0.5]
C_REF, R_REF = torch.tensor([-2.5, -1.5]), torch.tensor([-2.0, -1.0])
TOKENS = torch.tensor([3, 8])


def scores(chosen=C, rejected=R, chosen_tokens=TOKENS, rejected_tokens=TOKENS):
    c = torch.tensor(chosen, requires_grad=True)
    r = torch.tensor(rejected, requires_grad=True)
    return PairScores(c, r, chosen_tokens, rejected_tokens)


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def loss_of(form, s=None, noop=None, **kw):
    cfg = ObjectiveConfig(form=form, beta=kw.pop("beta", 0.5), **kw)
    s = s or scores()
    return correction_loss(s, C_REF, R_REF, cfg, noop), s


def test_plain_is_log_pi_y_minus_log_pi_y_prime():
    # margins c - r = [1, -0.5]; loss = mean(r - c) = (-1 + 0.5) / 2
    out, s = loss_of("plain", plain_clamp=float("inf"))
    assert out.loss.item() == pytest.approx(-0.25)
    out.loss.backward()
    assert s.chosen_logps.grad.tolist() == [-0.5, -0.5]
    assert s.rejected_logps.grad.tolist() == [0.5, 0.5]


def test_plain_clamp_stops_the_gradient_past_the_margin():
    # clamp 0.75: pair 0 (margin 1) is capped -> loss -0.75 and no gradient; pair 1 is not.
    out, s = loss_of("plain", plain_clamp=0.75)
    assert out.loss.item() == pytest.approx((-0.75 + 0.5) / 2)
    out.loss.backward()
    assert s.chosen_logps.grad.tolist() == [0.0, -0.5]
    assert s.rejected_logps.grad.tolist() == [0.0, 0.5]


def test_logistic_value_and_hand_derived_gradient():
    # u = 0.5 * [1, -0.5] = [0.5, -0.25]; loss_i = log(1 + exp(-u_i))
    out, s = loss_of("logistic")
    assert out.per_pair.tolist() == pytest.approx([0.474077, 0.825939], abs=1e-6)
    assert out.loss.item() == pytest.approx((softplus(-0.5) + softplus(0.25)) / 2, abs=1e-6)
    out.loss.backward()
    # d/dc_i = -(beta / n) sigmoid(-u_i), d/dr_i = -d/dc_i
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-(0.5 / 2) * sig(-0.5), -(0.5 / 2) * sig(0.25)]
    assert s.chosen_logps.grad.tolist() == pytest.approx(expected, abs=1e-7)
    assert s.rejected_logps.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-7)
    assert out.margin == pytest.approx(0.25)
    assert out.accuracy == pytest.approx(0.5)


def test_dpo_value_gradient_and_standard_formula():
    # u = beta ((c - c_ref) - (r - r_ref)) = 0.5 * [0.5 + 1.0, 0.5 - 0.5] = [0.75, 0]
    eps = 0.1
    out, s = loss_of("dpo", label_smoothing=eps)
    assert out.per_pair.tolist() == pytest.approx(
        [0.9 * softplus(-0.75) + 0.1 * softplus(0.75), math.log(2)], abs=1e-6
    )
    assert out.per_pair.tolist() == pytest.approx([0.461871, 0.693147], abs=1e-6)
    # the standard (cDPO / TRL "sigmoid") loss written from its paper
    c, r = torch.tensor(C), torch.tensor(R)
    logits = (c - r) - (C_REF - R_REF)
    std = -torch.nn.functional.logsigmoid(0.5 * logits) * (1 - eps) - torch.nn.functional.logsigmoid(
        -0.5 * logits
    ) * eps
    assert out.loss.item() == pytest.approx(std.mean().item(), abs=1e-7)
    out.loss.backward()
    # d/dc_i = (beta / n) (-(1 - eps) sigmoid(-u_i) + eps sigmoid(u_i)); d/dr_i = -d/dc_i
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [(0.5 / 2) * (-(0.9) * sig(-u) + 0.1 * sig(u)) for u in (0.75, 0.0)]
    assert s.chosen_logps.grad.tolist() == pytest.approx(expected, abs=1e-7)
    assert s.rejected_logps.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-7)


def test_ipo_value():
    # (u / beta - 1 / (2 beta))^2 = ([1.5, 0] - 1)^2
    out, _ = loss_of("ipo")
    assert out.per_pair.tolist() == pytest.approx([0.25, 1.0])
    assert out.loss.item() == pytest.approx(0.625)


def test_cpl_value():
    # u = beta (c - lambda r) = 0.5 * [-2 + 1.5, -1 + 0.25] = [-0.25, -0.375]
    out, _ = loss_of("cpl", cpl_lambda=0.5)
    assert out.per_pair.tolist() == pytest.approx([softplus(0.25), softplus(0.375)], abs=1e-6)
    assert out.per_pair.tolist() == pytest.approx([0.825939, 0.898123], abs=1e-6)


def test_cpl_with_lambda_one_is_logistic():
    cpl, _ = loss_of("cpl", cpl_lambda=1.0)
    logistic, _ = loss_of("logistic")
    assert cpl.loss.item() == pytest.approx(logistic.loss.item())


def test_reference_forms_need_reference_logps():
    cfg = ObjectiveConfig(form="dpo")
    with pytest.raises(ValueError, match="reference log-probs"):
        correction_loss(scores(), None, None, cfg, None)
    assert needs_reference(cfg) and needs_reference(ObjectiveConfig(form="ipo"))
    assert not any(needs_reference(ObjectiveConfig(form=f)) for f in ("plain", "logistic", "cpl"))


def test_negative_binomial_length_prior_by_hand():
    prior = NegativeBinomialLengthPrior.from_config(LengthPriorConfig(mean=8.0, dispersion=4.0))
    # p = r / (r + m) = 1/3: P(3) = C(6, 3) (1/3)^4 (2/3)^3 = 20 * 8 / 2187 = 160 / 2187
    assert prior.log_prob(torch.tensor([3])).item() == pytest.approx(math.log(160 / 2187), abs=1e-6)
    # P(0) = (1/3)^4
    assert prior.log_prob(torch.tensor([0])).item() == pytest.approx(4 * math.log(1 / 3), abs=1e-6)
    with pytest.raises(ValueError, match="length_prior"):
        NegativeBinomialLengthPrior(mean=0.0, dispersion=1.0)


def test_length_prior_shifts_the_logit():
    # y' has 3 tokens, y has 8: p = log l(3) - log l(8) added to u = beta (c - r)
    s = scores(chosen_tokens=torch.tensor([3, 3]), rejected_tokens=torch.tensor([8, 8]))
    cfg = ObjectiveConfig(form="logistic", beta=0.5, prior="length")
    out = correction_loss(s, None, None, cfg, None)
    prior = NegativeBinomialLengthPrior(8.0, 4.0)
    p = (prior.log_prob(torch.tensor([3])) - prior.log_prob(torch.tensor([8]))).item()
    assert p == pytest.approx(math.log(160 / 2187) - (-2.5322245), abs=1e-5)
    assert out.per_pair.tolist() == pytest.approx([softplus(-(0.5 + p)), softplus(-(-0.25 + p))], abs=1e-6)


class ConstantPrior:
    """A user prior through the DomainPrior protocol: log l = -num_tokens."""

    def log_prob(self, num_tokens):
        return -num_tokens.float()


def test_pluggable_prior():
    s = scores(chosen_tokens=torch.tensor([1, 1]), rejected_tokens=torch.tensor([3, 3]))
    out = correction_loss(s, None, None, ObjectiveConfig(form="plain", plain_clamp=100.0), None, prior=ConstantPrior())
    # u = (c - r) + (-1 + 3) = [3, 1.5]
    assert out.per_pair.tolist() == pytest.approx([-3.0, -1.5])


@pytest.mark.parametrize("form", ["plain", "logistic", "dpo", "ipo", "cpl"])
@pytest.mark.parametrize("policy", ["drop", "keep"])
def test_noop_pairs_give_exactly_zero_loss_and_gradient(form, policy):
    # pair 1 is a no-op (y' == y, so c == r)
    cfg = ObjectiveConfig(form=form, beta=0.5, label_smoothing=0.1, noop_policy=policy)
    s = scores(chosen=[-2.0, -1.0], rejected=[-3.0, -1.0])
    out = correction_loss(s, C_REF, R_REF, cfg, torch.tensor([False, True]))
    out.loss.backward()
    assert out.per_pair[1].item() == 0.0
    assert s.chosen_logps.grad[1].item() == 0.0 and s.rejected_logps.grad[1].item() == 0.0
    assert s.chosen_logps.grad[0].item() != 0.0
    assert out.num_noop == 1
    # drop: the no-op leaves the denominator; keep: it stays in it
    alone = correction_loss(
        scores(chosen=[-2.0], rejected=[-3.0], chosen_tokens=TOKENS[:1], rejected_tokens=TOKENS[:1]),
        C_REF[:1], R_REF[:1], cfg, None,
    )
    expected = alone.loss.item() if policy == "drop" else alone.loss.item() / 2
    assert out.loss.item() == pytest.approx(expected)
    assert out.num_counted == (1 if policy == "drop" else 2)


def test_all_noop_batch_is_a_zero_in_the_graph():
    s = scores(chosen=[-1.0, -2.0], rejected=[-1.0, -2.0])
    out, _ = loss_of("logistic", s=s, noop=torch.tensor([True, True]))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.num_counted == 0
    assert s.chosen_logps.grad.abs().sum().item() == 0.0


def test_anchor_and_anchor_only_noop_policy():
    s = scores(chosen=[-2.0, -1.0], rejected=[-3.0, -1.0])
    noop = torch.tensor([False, True])
    out, _ = loss_of("logistic", s=s, noop=noop, anchor_weight=0.5, noop_policy="anchor_only")
    # pair 0: softplus(-0.5) + 0.5 * 2; pair 1 (no-op): only the anchor 0.5 * 1
    assert out.per_pair.tolist() == pytest.approx([softplus(-0.5) + 1.0, 0.5], abs=1e-6)
    assert out.loss.item() == pytest.approx((softplus(-0.5) + 1.5) / 2, abs=1e-6)
    out.loss.backward()
    assert s.rejected_logps.grad[1].item() == 0.0
    assert s.chosen_logps.grad[1].item() == pytest.approx(-0.5 / 2)
    assert out.anchor == pytest.approx(1.5)
    with pytest.raises(ValueError, match="anchor_weight"):
        loss_of("logistic", noop_policy="anchor_only")


def test_metrics_are_floats():
    out, _ = loss_of("logistic")
    metrics = out.metrics(prefix="train/")
    assert set(metrics) >= {"train/loss", "train/margin", "train/num_noop", "train/accuracy"}
    assert all(isinstance(v, float) for v in metrics.values())


def test_sft_is_minus_log_pi_y_prime_and_ignores_y():
    # eq. 7: loss = mean(-c) = (2 + 1) / 2; d/dc = -1/n each, y gets no gradient at all
    out, s = loss_of("sft")
    assert out.loss.item() == pytest.approx(1.5)
    out.loss.backward()
    assert s.chosen_logps.grad.tolist() == [-0.5, -0.5]
    assert s.rejected_logps.grad is None or s.rejected_logps.grad.tolist() == [0.0, 0.0]
    assert not needs_reference(ObjectiveConfig(form="sft"))


def test_sft_trains_noop_pairs_unless_dropped():
    noop = torch.tensor([True, False])
    kept, s = loss_of("sft", noop=noop, noop_policy="keep")
    assert kept.loss.item() == pytest.approx(1.5)  # y' == y is still a target: -(-2 - 1) / 2
    kept.loss.backward()
    assert s.chosen_logps.grad.tolist() == [-0.5, -0.5]
    dropped, s = loss_of("sft", noop=noop, noop_policy="drop")
    assert dropped.loss.item() == pytest.approx(1.0) and dropped.num_counted == 1
    dropped.loss.backward()
    assert s.chosen_logps.grad.tolist() == [0.0, -1.0]
    # anchor_only needs no anchor weight for sft (the form is the anchor) and equals keep
    only, _ = loss_of("sft", noop=noop, noop_policy="anchor_only")
    assert only.loss.item() == pytest.approx(1.5)


def test_sft_plus_anchor_weight_adds_the_anchor():
    out, _ = loss_of("sft", anchor_weight=0.5)
    assert out.loss.item() == pytest.approx(1.5 * 1.5)
    with pytest.raises(ValueError, match="anchor_weight > 0"):
        loss_of("logistic", noop_policy="anchor_only")
