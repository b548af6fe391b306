"""Score a ``TrainBatch``: the naive ``[chosen; rejected]`` forward, or the shared-prefix one.

Rows i (x + y') and n+i (x + y) agree on the prompt and on the first ``k_i`` response tokens
(``TrainBatch.shared_prefix_lengths``). The shared-prefix forward encodes each pair's
``prompt + shared prefix`` once, keeps its KV cache *with gradients*, duplicates it for the two
rows of the pair, and runs only the two diverging suffixes on top of it. Logits, hence log-probs,
hence loss and gradients, equal the naive forward's up to float rounding: a causal LM's hidden
state at position t depends only on tokens <= t, which are identical in both rows up to the
divergence point (docs/objectives.md, "Shared prefix").

Layout of the two calls (right padding throughout, explicit position ids):

* prefix call: ``input_ids[:n, :Lp_max]`` with ``attention_mask = t < Lp_i``, positions ``t``;
* suffix call: 2n rows (chosen suffixes then rejected suffixes), positions ``Lp_i + j``, and a 2-D
  attention mask ``[prefix mask of pair i | suffix mask]`` over ``Lp_max + Ls_max`` keys, so the
  prefix's padding columns are masked and the suffix attends causally to its own pair's prefix.

Right padding (rather than left-padded prefixes) means no query row ever sees only masked keys, so
no NaN/garbage rows appear in the backward pass.

``shared_prefix: auto`` takes this path when the token cost ``n * Lp_max + 2n * Ls_max`` is at
most ``AUTO_MAX_COST_RATIO`` times the naive ``2n * seq_len`` (the rest of a step's cost -- the
extra model call, the KV cache copy -- is what the margin pays for; measured in
``benchmarks/bench_shared_prefix.py``), and never under gradient checkpointing, which HF disables
the KV cache for.
"""

from __future__ import annotations

import torch

from correction_rl.config import ObjectiveConfig
from correction_rl.learner.logprobs import reduce_logprobs, sequence_logprobs, shifted_labels, token_logprobs
from correction_rl.learner.objectives import PairScores
from correction_rl.types import TrainBatch

AUTO_MAX_COST_RATIO = 0.8
"""``auto`` uses the shared-prefix forward when its padded token count is <= this x naive's."""
AUTO_MAX_COST_RATIO_CUDA = 0.55
"""The same bound on CUDA, where the second model call and the KV-cache copy weigh more against
the saved tokens: on one H200 (0.5B Llama, 16 pairs of 64 + 448 tokens) the shared forward took
1.28x naive's time at a cost ratio of 0.72 (half the response shared) and 0.93x at 0.54 (90%
shared) (docs/benchmarks.md, GPU section)."""

__all__ = ["AUTO_MAX_COST_RATIO", "AUTO_MAX_COST_RATIO_CUDA", "PairScores", "score_pairs", "shared_prefix_cost_ratio", "use_shared_prefix"]


def _lengths(batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prefix lengths Lp [n], shared response tokens k [n], chosen R_c [n], rejected R_r [n])."""
    if batch.prompt_lengths is None or batch.shared_prefix_lengths is None:
        raise ValueError(
            "TrainBatch.prompt_lengths / shared_prefix_lengths are None; build the batch with "
            "correction_rl.learner.collate.collate_pairs to use objective.shared_prefix"
        )
    n = batch.num_pairs
    counts = batch.response_mask.sum(dim=1)
    k = batch.shared_prefix_lengths.to(counts.device)
    return batch.prompt_lengths.to(counts.device) + k, k, counts[:n], counts[n:]


def shared_prefix_cost_ratio(batch: TrainBatch) -> float:
    """Padded tokens through the model, shared-prefix / naive (the ``auto`` rule's estimate)."""
    prefix, k, rc, rr = _lengths(batch)
    n, width = batch.num_pairs, batch.input_ids.shape[1]
    suffix = int(torch.maximum(rc - k, rr - k).max())
    return (n * int(prefix.max()) + 2 * n * suffix) / (2 * n * width)


def _gradient_checkpointing(model) -> bool:
    inner = getattr(model, "module", model)
    return bool(getattr(inner, "is_gradient_checkpointing", False)) and bool(inner.training)


def use_shared_prefix(model, batch: TrainBatch, cfg: ObjectiveConfig) -> bool:
    """Resolve ``objective.shared_prefix`` (auto / on / off) for this batch and model."""
    if cfg.shared_prefix == "off":
        return False
    if cfg.shared_prefix == "on":
        if _gradient_checkpointing(model) and torch.is_grad_enabled():
            raise ValueError(
                "objective.shared_prefix='on' needs the KV cache, which HF disables under "
                "model.gradient_checkpointing; use 'auto' or 'off'"
            )
        return True
    if cfg.shared_prefix != "auto":
        raise ValueError(f"objective.shared_prefix must be auto|on|off, got {cfg.shared_prefix!r}")
    if batch.prompt_lengths is None or batch.shared_prefix_lengths is None:
        return False
    if _gradient_checkpointing(model) and torch.is_grad_enabled():
        return False
    on_cuda = next(model.parameters()).device.type == "cuda"
    return shared_prefix_cost_ratio(batch) <= (AUTO_MAX_COST_RATIO_CUDA if on_cuda else AUTO_MAX_COST_RATIO)


def score_pairs(
    model, batch: TrainBatch, cfg: ObjectiveConfig, inplace_backward: bool = True
) -> PairScores:
    """Policy log-probs of y' and y for every pair of ``batch`` (normalized per ``cfg``).

    ``model`` is called as ``model(input_ids=..., attention_mask=..., ...)`` and must return an
    object with ``.logits`` (an HF causal LM, or a DeepSpeed engine wrapping one).
    ``inplace_backward`` lets the log-prob kernel write its gradient into the logits' storage
    (safe: the logits are not needed after the kernel's backward; autograd's version counter
    raises if something else saved them).
    """
    if use_shared_prefix(model, batch, cfg):
        return _score_shared(model, batch, cfg, inplace_backward)
    return _score_naive(model, batch, cfg, inplace_backward)


def _duplicate_rows(cache, n: int):
    """Rows [0, n) of the cache -> rows [0, n) and [n, 2n), differentiably. ``torch.cat`` of the
    layers' tensors: its backward is one add, where ``reorder_cache``'s ``index_select`` backs
    off to a single-threaded ``index_add`` on CPU (~3% of the step in the benchmark)."""
    layers = getattr(cache, "layers", None)
    if layers and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        for layer in layers:
            layer.keys = torch.cat([layer.keys, layer.keys])
            layer.values = torch.cat([layer.values, layer.values])
    else:  # other cache classes: the public (index_select) route
        cache.reorder_cache(torch.cat([torch.arange(n, device=_cache_device(cache))] * 2))
    return cache


def _cache_device(cache) -> torch.device:
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "keys", None) is not None:
            return layer.keys.device
    return torch.device("cpu")


def _score_naive(model, batch: TrainBatch, cfg: ObjectiveConfig, inplace: bool) -> PairScores:
    n = batch.num_pairs
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits
    logps = sequence_logprobs(
        logits, batch.input_ids, batch.response_mask, cfg.logprob_chunk_size, cfg.normalization, inplace
    )
    counts = batch.response_mask.sum(dim=1)
    return PairScores(logps[:n], logps[n:], counts[:n], counts[n:], used_shared_prefix=False)


def _score_shared(model, batch: TrainBatch, cfg: ObjectiveConfig, inplace: bool) -> PairScores:
    n = batch.num_pairs
    ids = batch.input_ids
    device = ids.device
    prefix_len, k, rc, rr = _lengths(batch)
    if bool((prefix_len < 1).any()):
        raise ValueError("score_pairs: every pair needs at least one prompt token")
    lp_max = int(prefix_len.max())
    pos_p = torch.arange(lp_max, device=device)

    # 1. prompt + shared prefix, once per pair.
    prefix_ids = ids[:n, :lp_max]
    prefix_mask = (pos_p[None, :] < prefix_len[:, None]).long()
    out = model(
        input_ids=prefix_ids,
        attention_mask=prefix_mask,
        position_ids=pos_p[None, :].expand(n, -1),
        use_cache=True,
    )
    prefix_logits = out.logits
    prompt_len = prefix_len - k
    in_response = (pos_p[None, :] >= prompt_len[:, None]).long() * prefix_mask
    shared = token_logprobs(
        prefix_logits, shifted_labels(prefix_ids, in_response), cfg.logprob_chunk_size, False
    ).sum(dim=1)

    # 2. first diverging token of each row, predicted by the last prefix position.
    suffix_len = torch.cat([rc - k, rr - k])  # [2n]
    both_prefix = torch.cat([prefix_len, prefix_len])
    width = ids.shape[1]
    first_tok = ids.gather(1, both_prefix.clamp(max=width - 1)[:, None]).squeeze(1)
    last = prefix_logits[torch.arange(n, device=device), prefix_len - 1]  # [n, V]
    last_lp = torch.log_softmax(last.float(), dim=-1).repeat(2, 1)
    first = last_lp.gather(1, first_tok[:, None]).squeeze(1) * (suffix_len > 0)

    # 3. the diverging suffixes, on a duplicated KV cache (gradients flow through it).
    ls_max = int(suffix_len.max())
    rest = torch.zeros(2 * n, device=device, dtype=first.dtype)
    if ls_max > 0:
        pos_s = torch.arange(ls_max, device=device)
        suffix_ids = ids.gather(1, (both_prefix[:, None] + pos_s[None, :]).clamp(max=width - 1))
        suffix_mask = (pos_s[None, :] < suffix_len[:, None]).long()
        cache = _duplicate_rows(out.past_key_values, n)
        suffix_logits = model(
            input_ids=suffix_ids,
            attention_mask=torch.cat([prefix_mask.repeat(2, 1), suffix_mask], dim=1),
            position_ids=both_prefix[:, None] + pos_s[None, :],
            past_key_values=cache,
            use_cache=True,
        ).logits
        rest = token_logprobs(
            suffix_logits, shifted_labels(suffix_ids, suffix_mask), cfg.logprob_chunk_size, inplace
        ).sum(dim=1)

    total = shared.repeat(2) + first + rest
    counts = torch.cat([rc, rr])
    logps = reduce_logprobs(total, counts, cfg.normalization)
    return PairScores(logps[:n], logps[n:], rc, rr, used_shared_prefix=True)
