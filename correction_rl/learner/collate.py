"""``CorrectionPair``s -> one padded ``TrainBatch`` scored by a single forward pass.

Layout (the contract ``shared_prefix.py`` and ``logprobs.py`` rely on): rows ``[0, n)`` are
x + y' (chosen), rows ``[n, 2n)`` are x + y (rejected), right padded with ``pad_id`` to the longest
row; ``response_mask[r, t] = 1`` when token t of row r is a response token. ``prompt_lengths`` and
``shared_prefix_lengths`` (leading response tokens y and y' share) let the learner encode the
common part of rows i and n+i once.

Truncation happens here, before anything is scored, so that the policy and the reference see the
same tokens: ``drop`` removes pairs whose prompt + longer response exceeds ``max_seq_len``;
``truncate_response`` cuts both responses to the room the prompt leaves (a pair whose prompt alone
fills ``max_seq_len`` is dropped either way). ``noop`` is computed on the sequences as scored, so a
pair whose responses only differ past the cut is a no-op for the loss too.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from correction_rl.types import CorrectionPair, TrainBatch
from correction_rl.edits import common_prefix_length  # noqa: F401  (re-exported: the pair's shared prefix)

Truncation = Literal["drop", "truncate_response"]



def _fit(pair: CorrectionPair, max_seq_len: int, truncation: Truncation):
    """(chosen, rejected) response ids that fit ``max_seq_len``, or None when the pair is dropped."""
    room = max_seq_len - len(pair.prompt_ids)
    chosen, rejected = list(pair.chosen_ids), list(pair.rejected_ids)
    if room < 1:
        return None
    if max(len(chosen), len(rejected)) <= room:
        return chosen, rejected
    if truncation == "drop":
        return None
    if truncation == "truncate_response":
        return chosen[:room], rejected[:room]
    raise ValueError(f"model.truncation must be 'drop' or 'truncate_response', got {truncation!r}")


def _check(pair: CorrectionPair, index: int) -> None:
    if not pair.prompt_ids:
        raise ValueError(
            f"collate_pairs: pair {index} ({pair.pair_id!r}) has empty prompt_ids; the first "
            "response token needs at least one context token (the tokenizer's <bos>)"
        )
    if not pair.chosen_ids or not pair.rejected_ids:
        raise ValueError(
            f"collate_pairs: pair {index} ({pair.pair_id!r}) has an empty "
            f"{'chosen_ids (y prime)' if not pair.chosen_ids else 'rejected_ids (y)'}"
        )


def collate_pairs(
    pairs: Sequence[CorrectionPair],
    pad_id: int,
    max_seq_len: int,
    truncation: Truncation,
) -> tuple[TrainBatch | None, int]:
    """Build the ``[chosen; rejected]`` batch; returns ``(batch or None if every pair was dropped,
    number of pairs dropped by truncation)``.

    ``ref_chosen_logps`` / ``ref_rejected_logps`` are filled from ``pair.ref_logps`` when every kept
    pair has them (they must have been computed on the sequences as collated here, i.e. with the
    same ``max_seq_len`` and ``truncation``), else left None.
    """
    if max_seq_len < 2:
        raise ValueError(f"collate_pairs: max_seq_len must be >= 2, got {max_seq_len}")
    kept: list[tuple[CorrectionPair, list[int], list[int]]] = []
    for index, pair in enumerate(pairs):
        _check(pair, index)
        fitted = _fit(pair, max_seq_len, truncation)
        if fitted is not None:
            kept.append((pair, *fitted))
    dropped = len(pairs) - len(kept)
    if not kept:
        return None, dropped

    n = len(kept)
    rows = [list(p.prompt_ids) + c for p, c, _ in kept] + [list(p.prompt_ids) + r for p, _, r in kept]
    prompt_lengths = [len(p.prompt_ids) for p, _, _ in kept]
    width = max(len(row) for row in rows)
    input_ids = torch.full((2 * n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((2 * n, width), dtype=torch.long)
    response_mask = torch.zeros((2 * n, width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, : len(row)] = 1
        response_mask[r, prompt_lengths[r % n] : len(row)] = 1

    refs = [p.ref_logps for p, _, _ in kept]
    have_refs = all(ref is not None for ref in refs)
    return (
        TrainBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            pair_ids=[p.pair_id for p, _, _ in kept],
            policy_versions=[p.policy_version for p, _, _ in kept],
            ref_chosen_logps=torch.tensor([ref[0] for ref in refs]) if have_refs else None,
            ref_rejected_logps=torch.tensor([ref[1] for ref in refs]) if have_refs else None,
            noop=torch.tensor([c == r for _, c, r in kept], dtype=torch.bool),
            prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.long),
            shared_prefix_lengths=torch.tensor(
                [common_prefix_length(c, r) for _, c, r in kept], dtype=torch.long
            ),
        ),
        dropped,
    )
