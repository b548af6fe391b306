"""Correction -> CorrectionPair: eos handling, tokenization, edit distance, no-ops, ids."""

from __future__ import annotations

import pytest

from correction_rl.models import build_tokenizer
from correction_rl.edits import edit_distance as token_edit_distance
from correction_rl.pairs.make import PairError, make_pair, make_pairs, rollout_pair_id
from correction_rl.types import Correction, Prompt, Rollout, make_pair_id

EOS = 2


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _rollout(tok, text: str, finish: str = "stop", version: int = 3, prompt_text: str = "12+30=") -> Rollout:
    prompt = Prompt(prompt_id="p-7", text=prompt_text, task="addition", answer="42")
    return Rollout(
        prompt=prompt,
        prompt_ids=tok(prompt_text)["input_ids"],
        response_ids=tok(text, add_special_tokens=False)["input_ids"],
        response_text=text,
        policy_version=version,
        finish_reason=finish,  # type: ignore[arg-type]
    )


def test_stop_response_both_sides_end_with_eos_and_no_bos(tok):
    ro = _rollout(tok, "41")
    pair = make_pair(Correction(rollout=ro, corrected_text="42", teacher="oracle"), tok)
    ids = {c: i for c, i in zip("0123456789", tok("0123456789", add_special_tokens=False)["input_ids"])}
    assert pair.rejected_ids == [ids["4"], ids["1"], EOS]
    assert pair.chosen_ids == [ids["4"], ids["2"], EOS]
    assert 1 not in pair.chosen_ids and 1 not in pair.rejected_ids  # no <bos> in responses
    assert pair.prompt_ids[0] == 1 and pair.prompt_ids == ro.prompt_ids
    assert pair.edit_distance == 1
    assert pair.policy_version == 3 and pair.teacher == "oracle" and pair.prompt_id == "p-7"
    assert not pair.is_noop


def test_length_cut_response_gets_no_eos_but_correction_does(tok):
    ro = _rollout(tok, "4222", finish="length")
    pair = make_pair(Correction(rollout=ro, corrected_text="42", teacher="oracle"), tok)
    assert pair.rejected_ids[-1] != EOS and len(pair.rejected_ids) == 4
    assert pair.chosen_ids[-1] == EOS and len(pair.chosen_ids) == 3
    # "4222" -> "42<eos>": delete one 2, substitute the other 2 by eos.
    assert pair.edit_distance == 2


def test_unchanged_text_cut_at_length_is_a_one_token_stop_correction(tok):
    ro = _rollout(tok, "42", finish="length")
    pair = make_pair(Correction(rollout=ro, corrected_text="42", teacher="oracle"), tok)
    assert pair.chosen_ids == pair.rejected_ids + [EOS]
    assert pair.edit_distance == 1 and not pair.is_noop


def test_noop_reuses_rollout_ids_exactly(tok):
    ro = _rollout(tok, "42")
    # Engine ids that a re-tokenization would NOT reproduce (unk id 3 for a known char):
    ro = Rollout(**{**ro.__dict__, "response_ids": [3, 3]})
    pair = make_pair(Correction(rollout=ro, corrected_text="42", teacher="t"), tok)
    assert pair.is_noop and pair.edit_distance == 0
    assert pair.chosen_ids == pair.rejected_ids == [3, 3, EOS]


def test_pair_id_is_the_rollouts_stable_id(tok):
    ro = _rollout(tok, "41", version=5)
    pair = make_pair(Correction(rollout=ro, corrected_text="42", teacher="t"), tok)
    assert pair.pair_id == rollout_pair_id(ro) == make_pair_id("p-7", ro.response_ids, 5)
    other = make_pair(Correction(rollout=_rollout(tok, "41", version=6), corrected_text="42", teacher="t"), tok)
    assert other.pair_id != pair.pair_id


def test_token_edit_distance_on_id_lists():
    assert token_edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert token_edit_distance([1, 2, 3], [1, 3]) == 1
    assert token_edit_distance([5, 6, 7, 8], [8, 7, 6, 5]) == 4
    assert token_edit_distance([], [9, 9]) == 2
    # ids above 255 are tokens, not characters
    assert token_edit_distance([1000, 2000], [1000, 2001]) == 1


def test_rejected_correction_and_error_rollouts_raise_and_are_counted(tok):
    ro = _rollout(tok, "41")
    rejected = Correction(rollout=ro, corrected_text=None, teacher="t", rejection="timeout")
    with pytest.raises(PairError, match="timeout"):
        make_pair(rejected, tok)
    errored = Correction(rollout=_rollout(tok, "4", finish="error"), corrected_text="42", teacher="t")
    with pytest.raises(PairError, match="finish_reason='error'"):
        make_pair(errored, tok)
    ok = Correction(rollout=ro, corrected_text="42", teacher="t")
    pairs, skipped = make_pairs([ok, rejected, rejected, errored], tok)
    assert [p.pair_id for p in pairs] == [rollout_pair_id(ro)]
    assert skipped == {"rejected:timeout": 2, "finish_reason:error": 1}


def test_response_ids_must_not_already_end_with_eos(tok):
    ro = _rollout(tok, "41")
    ro = Rollout(**{**ro.__dict__, "response_ids": list(ro.response_ids) + [EOS]})
    with pytest.raises(PairError, match="without eos"):
        make_pair(Correction(rollout=ro, corrected_text="42", teacher="t"), tok)


def test_empty_correction_is_just_eos(tok):
    ro = _rollout(tok, "junk")
    pair = make_pair(Correction(rollout=ro, corrected_text="", teacher="t"), tok)
    assert pair.chosen_ids == [EOS]
    assert pair.edit_distance == 4  # delete j,u,n,k (eos stays aligned)
