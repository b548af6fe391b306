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
  ``stop``               ``response_ids + [stop]``             ``encode(y') + [stop]``
  ``length``             ``response_ids`` (the policy did not  ``encode(y') + [eos]``
                         stop: no stop is scored for it)
  =====================  ====================================  =============================

  ``stop`` is the stop token the policy actually produced (``Rollout.stop_id``: a chat model
  may end on ``<|im_end|>`` or on ``<|endoftext|>``), so a correction that keeps y's ending
  does not change its last token; ``eos`` is the tokenizer's (or ``eos_id``), used for
  rollouts that did not stop and for rollouts that recorded no stop id. The teacher's y' is
  always a finished answer, so it always ends with a stop. A response cut at
  ``max_new_tokens`` whose text the teacher left unchanged therefore still yields a real
  correction of one token (the missing stop): "this is the whole answer, stop here".
* ``encode(y')`` is token-consistent with y (``consistent_ids``): it keeps y's OWN ids over
  the longest common text prefix of y and y' (backed off to the last token boundary fully
  inside that prefix) and encodes only the edited remainder, WITHOUT special tokens (no
  ``<bos>`` in the middle of a sequence). So the pair's token-level shared prefix is the
  text-level one even with BPE, whose re-encoding of y' can move boundaries or differ from
  sampled, non-canonical ids; the shared-prefix forward and the token edit distance measure the
  real edit. decode(chosen) == y' is checked; when a tokenizer breaks it (one whose pieces do
  not decode independently), y' is encoded whole instead. A no-op (y' == y) keeps y's ids
  exactly, which the same rule gives.
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

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def rollout_pair_id(rollout: Rollout) -> str:
    """The pair id a correction of ``rollout`` will get (stable across runs and restarts)."""
    return make_pair_id(rollout.prompt.prompt_id, list(rollout.response_ids), rollout.policy_version)


def encode_response(tokenizer: _Tokenizer, text: str) -> list[int]:
    """Token ids of a response text with the policy tokenizer, without special tokens."""
    encoded = tokenizer(text, add_special_tokens=False)
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return [int(i) for i in ids]


def _decode(tokenizer: _Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)  # as rollouts decode response_text


def kept_prefix(tokenizer: _Tokenizer, response_ids: list[int], response_text: str, target: str) -> tuple[int, int]:
    """(k, c): the longest prefix ``response_ids[:k]`` whose decoded text (``c`` characters) is
    a clean prefix of both ``response_text`` and ``target``. Clean: it ends on a token boundary
    that is also a character boundary (a byte-level token can end mid-character, decoding to
    U+FFFD, which no text prefix contains)."""
    common = 0
    for a, b in zip(response_text, target):
        if a != b:
            break
        common += 1
    # The decoded length of ids[:k] grows with k, so the longest prefix no longer than the
    # common text is found by bisection (O(log n) decodes, not n: responses can be long); then
    # step back over a token that ends mid-character or a tokenizer whose prefixes do not
    # decode to text prefixes, until the decoded prefix is a prefix of both texts.
    lo, hi = 0, len(response_ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_decode(tokenizer, response_ids[:mid]).rstrip("\ufffd")) <= common:
            lo = mid
        else:
            hi = mid - 1
    for k in range(lo, 0, -1):
        text = _decode(tokenizer, response_ids[:k])
        if target.startswith(text) and response_text.startswith(text):
            return k, len(text)
    return 0, 0


def consistent_ids(tokenizer: _Tokenizer, response_ids: list[int], response_text: str, target: str) -> list[int]:
    """Token ids of ``target`` (y') that keep y's own ids over their common text prefix and
    encode only the remainder (see the module docstring); decode(result) == target."""
    if target == response_text:
        return list(response_ids)
    k, c = kept_prefix(tokenizer, response_ids, response_text, target)
    ids = list(response_ids[:k]) + encode_response(tokenizer, target[c:])
    if _decode(tokenizer, ids) != target:  # a tokenizer whose pieces do not decode independently
        whole = encode_response(tokenizer, target)
        return whole
    return ids


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
    stopped = rollout.finish_reason == "stop"
    stop = int(rollout.stop_id) if stopped and rollout.stop_id is not None else int(eos)
    response = [int(i) for i in rollout.response_ids]
    if response and response[-1] == stop:
        raise PairError(
            f"rollout of prompt {rollout.prompt.prompt_id!r}: response_ids end with the stop token ({stop}); "
            "engines must return response ids without eos or any other stop (the pair adds it back)"
        )
    if correction.is_noop:
        corrected = list(response)  # same text: reuse the sampled ids (exact no-op)
    else:
        corrected = consistent_ids(tokenizer, response, rollout.response_text, correction.corrected_text or "")
    rejected = response + [stop] if stopped else response
    chosen = corrected + [stop]
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
