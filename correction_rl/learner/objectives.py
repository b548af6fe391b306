"""The correction loss family: pure functions of sequence log-probs (docs/objectives.md).

Notation (docs/objectives.md, section "Notation"): for pair i, ``c = log pi(y'|x)`` (chosen, the
teacher's correction) and ``r = log pi(y|x)`` (rejected, the policy's response), each a sum or a
per-token mean over response tokens; ``c_ref``, ``r_ref`` the same under the reference policy;
``p = log l(y') - log l(y)`` the domain prior margin (0 without a prior). Each form maps a pair to
a loss through one *logit* ``u`` (eq. numbers refer to the doc):

=========  ===============================================  ======================================
form       u                                                per-pair loss
=========  ===============================================  ======================================
plain      (c - r) + p                                       -min(u, plain_clamp)           (eq. 1)
logistic   beta (c - r) + p                                  -(1-e) log s(u) - e log s(-u)  (eq. 2)
dpo        beta ((c - c_ref) - (r - r_ref)) + p              -(1-e) log s(u) - e log s(-u)  (eq. 3)
ipo        beta ((c - c_ref) - (r - r_ref)) + p              (u / beta - 1 / (2 beta))^2    (eq. 4)
cpl        beta (c - lambda r) + p                           -log s(u)                      (eq. 5)
sft        (none: not pairwise)                              -c                             (eq. 7)
=========  ===============================================  ======================================

plus ``anchor_weight * (-c)`` (eq. 6) and the no-op policy (section "No-op pairs"). ``sft`` is
the baseline that ignores y: supervised fine-tuning on the teacher's y' (a no-op pair is a
valid target there, so only ``noop_policy: drop`` leaves it out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from correction_rl.config import LengthPriorConfig, ObjectiveConfig


@dataclass
class PairScores:
    """Per-pair sequence log-probs of y' (chosen) and y (rejected) under the policy, already
    normalized as ``objective.normalization`` says, with the response token counts."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    used_shared_prefix: bool = False
    """True when ``shared_prefix.score_pairs`` took the shared-prefix forward."""

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_logps.shape[0])


class DomainPrior(Protocol):
    """A prior l over responses, seen through what the learner has at loss time (the response
    token counts). ``log_prob`` returns log l for each entry of ``num_tokens`` ([n] long)."""

    def log_prob(self, num_tokens: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class NegativeBinomialLengthPrior:
    """l(y) = NegBin(len(y); mean, dispersion r): variance mean + mean^2 / r, so small r is a
    wide prior and r -> inf tends to Poisson(mean) (docs/objectives.md, "Domain prior").
    log l(k) = lgamma(k + r) - lgamma(r) - lgamma(k + 1) + r log(r / (r + m)) + k log(m / (r + m))."""

    mean: float
    dispersion: float

    def __post_init__(self) -> None:
        if not self.mean > 0 or not self.dispersion > 0:
            raise ValueError(
                "objective.length_prior: mean and dispersion must be > 0, got "
                f"mean={self.mean}, dispersion={self.dispersion}"
            )

    def log_prob(self, num_tokens: torch.Tensor) -> torch.Tensor:
        k = num_tokens.to(torch.float64)
        m, r = float(self.mean), float(self.dispersion)
        out = (
            torch.lgamma(k + r)
            - math.lgamma(r)
            - torch.lgamma(k + 1)
            + r * math.log(r / (r + m))
            + k * math.log(m / (r + m))
        )
        return out.to(torch.float32)

    @classmethod
    def from_config(cls, cfg: LengthPriorConfig) -> "NegativeBinomialLengthPrior":
        return cls(mean=cfg.mean, dispersion=cfg.dispersion)


def prior_from_config(cfg: ObjectiveConfig) -> DomainPrior | None:
    if cfg.prior == "none":
        return None
    if cfg.prior == "length":
        return NegativeBinomialLengthPrior.from_config(cfg.length_prior)
    raise ValueError(f"objective.prior must be 'none' or 'length', got {cfg.prior!r}")


def needs_reference(cfg: ObjectiveConfig) -> bool:
    """True when the form needs log pi_ref (filled once per pair at ingestion)."""
    return cfg.form in ("dpo", "ipo")


@dataclass
class LossOutput:
    """The scalar to backpropagate and what to log about it (all but ``loss`` detached)."""

    loss: torch.Tensor
    per_pair: torch.Tensor
    """[n] loss of each pair (0 for dropped / no-op pairs), detached."""
    margin: float
    """Mean of log pi(y'|x) - log pi(y|x) over all pairs (the negated amount of correction)."""
    chosen_logp: float
    rejected_logp: float
    accuracy: float
    """Fraction of counted non-no-op pairs with logit u > 0 (y' preferred)."""
    num_pairs: int
    num_noop: int
    num_counted: int
    """Pairs in the loss's denominator (all pairs but the dropped no-ops)."""
    anchor: float
    """Mean anchor term -log pi(y'|x) over the pairs it applies to (0 when disabled)."""

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}loss": float(self.loss.detach()),
            f"{prefix}margin": self.margin,
            f"{prefix}chosen_logp": self.chosen_logp,
            f"{prefix}rejected_logp": self.rejected_logp,
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}num_pairs": float(self.num_pairs),
            f"{prefix}num_noop": float(self.num_noop),
            f"{prefix}num_counted": float(self.num_counted),
            f"{prefix}anchor": self.anchor,
        }


def pair_logit(
    cfg: ObjectiveConfig,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    prior_margin: torch.Tensor | None,
) -> torch.Tensor:
    """The logit u of each pair (module table, column u; ``sft`` has none: u = c - r is
    returned for the accuracy metric only)."""
    if cfg.form in ("plain", "sft"):
        u = chosen - rejected
    elif cfg.form == "logistic":
        u = cfg.beta * (chosen - rejected)
    elif cfg.form in ("dpo", "ipo"):
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(
                f"objective.form={cfg.form!r} needs reference log-probs (ref_chosen and "
                "ref_rejected); fill CorrectionPair.ref_logps at ingestion (needs_reference(cfg))"
            )
        u = cfg.beta * ((chosen - ref_chosen.to(chosen)) - (rejected - ref_rejected.to(rejected)))
    elif cfg.form == "cpl":
        u = cfg.beta * (chosen - cfg.cpl_lambda * rejected)
    else:
        raise ValueError(f"objective.form must be plain|logistic|dpo|ipo|cpl|sft, got {cfg.form!r}")
    return u if prior_margin is None else u + prior_margin.to(u)


def pairwise_loss(cfg: ObjectiveConfig, u: torch.Tensor) -> torch.Tensor:
    """Per-pair loss from the logit u (module table, last column; not for ``sft``, whose loss
    is a function of c alone: ``correction_loss``)."""
    eps = cfg.label_smoothing
    if cfg.form == "plain":
        return -torch.clamp(u, max=cfg.plain_clamp)
    if cfg.form in ("logistic", "dpo"):
        return -(1.0 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    if cfg.form == "ipo":
        return (u / cfg.beta - 1.0 / (2.0 * cfg.beta)) ** 2
    if cfg.form == "cpl":
        return -F.logsigmoid(u)
    raise ValueError(f"objective.form must be plain|logistic|dpo|ipo|cpl (sft has no pairwise "
                     f"loss), got {cfg.form!r}")


def _validate(cfg: ObjectiveConfig) -> None:
    if cfg.form != "plain" and not cfg.beta > 0:
        raise ValueError(f"objective.beta must be > 0, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"objective.label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.anchor_weight < 0:
        raise ValueError(f"objective.anchor_weight must be >= 0, got {cfg.anchor_weight}")
    if cfg.noop_policy == "anchor_only" and cfg.anchor_weight <= 0 and cfg.form != "sft":
        raise ValueError("objective.noop_policy='anchor_only' needs objective.anchor_weight > 0")


def correction_loss(
    scores: PairScores,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    cfg: ObjectiveConfig,
    noop: torch.Tensor | None,
    prior: DomainPrior | None = None,
) -> LossOutput:
    """Mean correction loss over the counted pairs (docs/objectives.md, "Reduction").

    ``noop`` ([n] bool, y' == y) pairs get exactly zero pairwise loss and gradient; with
    ``noop_policy='drop'`` they also leave the denominator, with ``keep`` they stay in it, with
    ``anchor_only`` they train the anchor term only. ``prior`` overrides ``cfg.prior``.
    """
    _validate(cfg)
    chosen, rejected = scores.chosen_logps, scores.rejected_logps
    n = scores.num_pairs
    noop = torch.zeros(n, dtype=torch.bool, device=chosen.device) if noop is None else noop
    noop = noop.to(device=chosen.device, dtype=torch.bool)
    prior = prior if prior is not None else prior_from_config(cfg)
    prior_margin = None
    if prior is not None:
        prior_margin = prior.log_prob(scores.chosen_tokens) - prior.log_prob(scores.rejected_tokens)

    u = pair_logit(cfg, chosen, rejected, ref_chosen, ref_rejected, prior_margin)
    zero = torch.zeros_like(u)
    if cfg.form == "sft":  # eq. 7: y' is the target whether or not it equals y
        per_pair = -chosen if cfg.noop_policy != "drop" else torch.where(noop, zero, -chosen)
    else:
        # torch.where routes a zero gradient to the unselected branch: no-op pairs give exactly 0.
        per_pair = torch.where(noop, zero, pairwise_loss(cfg, u))

    anchor_on = ~noop if cfg.noop_policy != "anchor_only" else torch.ones_like(noop)
    if cfg.anchor_weight > 0:
        anchor_terms = torch.where(anchor_on, -chosen, zero)
        per_pair = per_pair + cfg.anchor_weight * anchor_terms
    counted = ~noop if cfg.noop_policy == "drop" else torch.ones_like(noop)
    num_counted = int(counted.sum())
    if num_counted:
        loss = per_pair.sum() / num_counted
    else:  # every pair dropped: a zero that still belongs to the graph
        loss = (chosen.sum() + rejected.sum()) * 0.0

    with torch.no_grad():
        real = ~noop
        num_anchor = int(anchor_on.sum()) if cfg.anchor_weight > 0 else 0
        return LossOutput(
            loss=loss,
            per_pair=per_pair.detach(),
            margin=float((chosen - rejected).mean()) if n else 0.0,
            chosen_logp=float(chosen.mean()) if n else 0.0,
            rejected_logp=float(rejected.mean()) if n else 0.0,
            accuracy=float((u[real] > 0).float().mean()) if bool(real.any()) else 0.0,
            num_pairs=n,
            num_noop=int(noop.sum()),
            num_counted=num_counted,
            anchor=float(-chosen[anchor_on].mean()) if num_anchor else 0.0,
        )
