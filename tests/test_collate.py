"""collate_pairs: layout, masks, truncation, no-op flags, reference log-probs."""

import pytest

from correction_rl.learner.collate import collate_pairs, common_prefix_length
from correction_rl.types import CorrectionPair


def pair(pid, prompt, chosen, rejected, ref=None):
    return CorrectionPair(pid, prompt, rejected, chosen, policy_version=3, teacher="t", edit_distance=0, ref_logps=ref)


def test_layout_and_masks():
    pairs = [pair("a", [1, 5], [7, 8, 2], [7, 9, 9, 2]), pair("b", [1, 5, 6], [4, 2], [4, 2])]
    batch, dropped = collate_pairs(pairs, pad_id=0, max_seq_len=16, truncation="drop")
    assert dropped == 0 and batch.num_pairs == 2
    assert batch.input_ids.tolist() == [
        [1, 5, 7, 8, 2, 0],  # x + y' of a
        [1, 5, 6, 4, 2, 0],  # x + y' of b
        [1, 5, 7, 9, 9, 2],  # x + y of a
        [1, 5, 6, 4, 2, 0],  # x + y of b
    ]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 1, 1, 0]]
    assert batch.response_mask.tolist() == [
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 0],
    ]
    assert batch.noop.tolist() == [False, True]
    assert batch.prompt_lengths.tolist() == [2, 3]
    assert batch.shared_prefix_lengths.tolist() == [1, 2]
    assert batch.pair_ids == ["a", "b"] and batch.policy_versions == [3, 3]
    assert batch.ref_chosen_logps is None


def test_truncation_drop_and_truncate_response():
    pairs = [pair("long", [1, 5], [7, 8, 9, 2], [7, 8, 6, 6, 2]), pair("short", [1], [3, 2], [4, 2])]
    batch, dropped = collate_pairs(pairs, pad_id=0, max_seq_len=5, truncation="drop")
    assert dropped == 1 and batch.pair_ids == ["short"]
    batch, dropped = collate_pairs(pairs, pad_id=0, max_seq_len=5, truncation="truncate_response")
    assert dropped == 0
    assert batch.input_ids[0].tolist() == [1, 5, 7, 8, 9] and batch.input_ids[2].tolist() == [1, 5, 7, 8, 6]
    assert batch.response_mask[0].tolist() == [0, 0, 1, 1, 1]


def test_truncation_can_make_a_noop_and_prompt_only_pairs_drop():
    pairs = [pair("a", [1, 5], [7, 8, 9], [7, 8, 6]), pair("b", [1, 2, 3, 4], [5], [6])]
    batch, dropped = collate_pairs(pairs, pad_id=0, max_seq_len=4, truncation="truncate_response")
    assert dropped == 1 and batch.pair_ids == ["a"]
    assert batch.noop.tolist() == [True] and batch.shared_prefix_lengths.tolist() == [2]
    assert collate_pairs(pairs[1:], 0, 4, "truncate_response") == (None, 1)


def test_reference_logps_only_when_every_pair_has_them():
    with_ref = [pair("a", [1], [3], [4], ref=(-1.5, -2.5)), pair("b", [1], [5], [6], ref=(-0.5, -3.0))]
    batch, _ = collate_pairs(with_ref, 0, 8, "drop")
    assert batch.ref_chosen_logps.tolist() == [-1.5, -0.5]
    assert batch.ref_rejected_logps.tolist() == [-2.5, -3.0]
    batch, _ = collate_pairs(with_ref + [pair("c", [1], [3], [4])], 0, 8, "drop")
    assert batch.ref_chosen_logps is None and batch.ref_rejected_logps is None


def test_bad_pairs_are_named():
    with pytest.raises(ValueError, match="pair 1 .*'x'.*empty prompt_ids"):
        collate_pairs([pair("ok", [1], [3], [4]), pair("x", [], [3], [4])], 0, 8, "drop")
    with pytest.raises(ValueError, match="empty rejected_ids"):
        collate_pairs([pair("y", [1], [3], [])], 0, 8, "drop")


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([9], [9]) == 1
