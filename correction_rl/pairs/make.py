"""Turn an accepted teacher ``Correction`` into the ``CorrectionPair`` the learner trains on.

Token conventions (the learner, the buffer and the rollout engines all rely on them):

* ``prompt_ids`` are the rollout's prompt ids as the engine saw them (with ``<bos>``).
* Rollout engines return ``response_ids`` WITHOUT the end-of-sequence token. Here the pair's
  sequences get it back where the model actually stopped, because stopping is a decision the
  learner must also learn (a correction that deletes a trailing "junk" suffix is only learnable
  if "stop here" is a token in y'):

  =====================  ====================================  =============================
  ``finish_reason``      rejected (y)                          chosen (y')
  =====================  ====================================  =============================
  ``stop``               ``response_ids + [eos]``              ``tokenize(y') + [eos]``
  ``length``             ``response_ids`` (the policy did not  ``tokenize(y') + [eos]``
                         stop: no eos is scored for it)
  =====================  ====================================  =============================

  The teacher's y' is always a finished answer, so it always ends with eos. A response cut at
  ``max_new_tokens`` whose text the teacher left unchanged therefore still yields a real
  correction of one token (the missing eos): "this is the whole answer, stop here".
* y' is tokenized with the policy tokenizer WITHOUT special tokens (no ``<bos>`` in the
  middle of a sequence). When the teacher returns y unchanged (a no-op), the chosen ids reuse
  the rollout's own ids instead of re-tokenizing, so a no-op pair is a no-op token for token even
  with tokenizers whose encoding is not canonical (BPE merges that the sampler did not follow).
* ``edit_distance`` is the token Levenshtein distance between rejected and chosen ids (eos
  included): ``correction_rl.edits.edit_distance`` (rapidfuzz's C++ implementation on integer
  lists), the same function evaluation uses.
* ``pair_id`` is ``make_pair_id(prompt_id, response_ids, policy_version)`` of the ROLLOUT (ids
  without eos): a rollout worker can compute it before asking the teacher, which is how a
  resumed run skips rollouts whose correction is already in the durable log.
"""

from __future__ import annotations

from typing import Any, Protocol

from correction_rl.edits import edit_distance
from correction_rl.types import Correction, CorrectionPair, Rollout, make_pair_id


class PairError(ValueError):
    """A correction that cannot become a training pair (rejected by the teacher, bad ids)."""


class _Tokenizer(Protocol):  # the subset of a Hugging Face tokenizer used here
    eos_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...


def rollout_pair_id(rollout: Rollout) -> str:
    """The pair id a correction of ``rollout`` will get (stable across runs and restarts)."""
    return make_pair_id(rollout.prompt.prompt_id, list(rollout.response_ids), rollout.policy_version)


def encode_response(tokenizer: _Tokenizer, text: str) -> list[int]:
    """Token ids of a response text with the policy tokenizer, without special tokens."""
    encoded = tokenizer(text, add_special_tokens=False)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return [int(i) for i in ids]


def make_pair(correction: Correction, tokenizer: _Tokenizer, eos_id: int | None = None) -> CorrectionPair:
    """Build the training pair of an accepted correction (see the module docstring for why the
    sequences end the way they do). Raises ``PairError`` for rejected corrections and for
    rollouts that ended in an engine error."""
    rollout = correction.rollout
    if not correction.accepted:
        raise PairError(
            f"correction of prompt {rollout.prompt.prompt_id!r} was rejected by teacher "
            f"{correction.teacher!r} ({correction.rejection}); only accepted corrections become pairs"
        )
    if rollout.finish_reason not in ("stop", "length"):
        raise PairError(
            f"rollout of prompt {rollout.prompt.prompt_id!r} has finish_reason="
            f"{rollout.finish_reason!r}; only 'stop' and 'length' responses become pairs"
        )
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise PairError("the tokenizer has no eos_token_id and none was given")
    response = [int(i) for i in rollout.response_ids]
    if response and response[-1] == eos:
        raise PairError(
            f"rollout of prompt {rollout.prompt.prompt_id!r}: response_ids end with eos ({eos}); "
            "engines must return response ids without eos (the pair adds it back)"
        )
    if correction.is_noop:
        corrected = list(response)  # same text: reuse the sampled ids (exact no-op)
    else:
        corrected = encode_response(tokenizer, correction.corrected_text or "")
    rejected = response + [eos] if rollout.finish_reason == "stop" else response
    chosen = corrected + [eos]
    return CorrectionPair(
        pair_id=rollout_pair_id(rollout),
        prompt_ids=[int(i) for i in rollout.prompt_ids],
        rejected_ids=rejected,
        chosen_ids=chosen,
        policy_version=rollout.policy_version,
        teacher=correction.teacher,
        edit_distance=edit_distance(rejected, chosen),
        prompt_id=rollout.prompt.prompt_id,
    )


def make_pairs(
    corrections: list[Correction], tokenizer: _Tokenizer, eos_id: int | None = None
) -> tuple[list[CorrectionPair], dict[str, int]]:
    """Pairs of the accepted corrections, plus counts of the skipped ones by reason
    (``rejected:<teacher reason>``, ``finish_reason:<reason>``) for metrics: nothing is dropped
    without a count."""
    pairs: list[CorrectionPair] = []
    skipped: dict[str, int] = {}
    for correction in corrections:
        if not correction.accepted:
            reason = f"rejected:{correction.rejection or 'unknown'}"
        elif correction.rollout.finish_reason not in ("stop", "length"):
            reason = f"finish_reason:{correction.rollout.finish_reason}"
        else:
            pairs.append(make_pair(correction, tokenizer, eos_id))
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return pairs, skipped
