"""Token-consistent pairs on the byte-level BPE tokenizer (pairs/make.py ``consistent_ids``):
y' keeps y's own ids over the common text prefix and re-encodes only the edited remainder, so
the token-level shared prefix is the text-level one, decode(chosen) == y', no-op and stop rules
hold, and a non-canonical y (ids the tokenizer would not produce) still gives a correct pair."""

from __future__ import annotations

import random

import pytest
import torch

from correction_rl.config import ObjectiveConfig
from correction_rl.learner.collate import collate_pairs, common_prefix_length
from correction_rl.learner.shared_prefix import score_pairs, use_shared_prefix
from correction_rl.models import build_family_tokenizer, build_model
from correction_rl.pairs.make import encode_response, make_pair
from correction_rl.types import Correction, Prompt, Rollout

IM_END, ENDOFTEXT = 2, 0


@pytest.fixture(scope="module")
def tok():
    return build_family_tokenizer("bpe", chat=True)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _rollout(tok, ids: list[int], finish: str = "stop", stop_id: int | None = IM_END) -> Rollout:
    prompt = Prompt(prompt_id="p", text="Fix the sentence.")
    return Rollout(prompt=prompt, prompt_ids=_ids(tok, "<|im_start|>user\nFix the sentence.<|im_end|>\n<|im_start|>assistant\n"),
                   response_ids=ids, response_text=tok.decode(ids, skip_special_tokens=True), policy_version=0,
                   finish_reason=finish, stop_id=stop_id if finish == "stop" else None)  # type: ignore[arg-type]


def _text_prefix(a: str, b: str) -> int:
    return common_prefix_length(a, b)  # works on any two sequences, strings included


def _check_consistent(tok, pair, y_ids: list[int], y: str, y2: str) -> int:
    """decode(chosen) == y'; the shared token prefix is exactly y's tokens that lie inside the
    common text prefix (the next token of y crosses it). Returns the shared token count."""
    chosen = pair.chosen_ids[:-1]
    assert tok.decode(chosen, skip_special_tokens=True) == y2
    k = common_prefix_length(pair.chosen_ids, pair.rejected_ids)
    common = _text_prefix(y, y2)
    kept = tok.decode(y_ids[:k], skip_special_tokens=True)
    assert y2.startswith(kept) and len(kept) <= common
    if k < len(y_ids):  # one more token of y would leave the common prefix (or split a character)
        longer = tok.decode(y_ids[: k + 1], skip_special_tokens=True)
        assert not (y2.startswith(longer) and y.startswith(longer))
    return k


CASES = [
    ("The quick brown fox jumps over the lazy dog.", "The quick brown fox jumped over the lazy dog."),
    ("going hom", "going home"),  # re-encoding the whole y' merges across y's last boundary
    ("The quick brown f", "The quick brown fox"),
    ("12+34=47", "12+34=46"),
    ("café au lait", "cafe au lait"),  # the edit falls inside a two-byte character
    ("café au lait", "café noir"),
    ("Their going home", "They're going home"),
    ("abc", ""),
    ("", "Hi!"),
]


@pytest.mark.parametrize("y,y2", CASES)
def test_token_shared_prefix_equals_the_text_one(tok, y, y2):
    y_ids = _ids(tok, y)
    pair = make_pair(Correction(_rollout(tok, y_ids), y2, "t"), tok)
    k = _check_consistent(tok, pair, y_ids, y, y2)
    assert pair.rejected_ids == y_ids + [IM_END] and pair.chosen_ids[-1] == IM_END
    naive = encode_response(tok, y2)
    assert k >= common_prefix_length(naive, y_ids)  # never less shared than re-encoding y' whole


def test_a_boundary_that_reencoding_would_move(tok):
    y, y2 = "going hom", "going home"
    y_ids = _ids(tok, y)
    naive = encode_response(tok, y2)
    assert common_prefix_length(naive, y_ids) < len(y_ids) - 1  # encoding y' whole re-merges " hom" + "e"
    pair = make_pair(Correction(_rollout(tok, y_ids, finish="length"), y2, "t"), tok)
    assert pair.chosen_ids[: len(y_ids)] == y_ids  # all of y is kept: only "ld" is new
    assert pair.edit_distance == len(pair.chosen_ids) - len(y_ids)  # pure insertion (+ the stop)


def test_non_canonical_y_still_gives_a_correct_pair(tok):
    y, y2 = "hello world, how are you", "hello world, who are you"
    y_ids = [i for ch in y for i in _ids(tok, ch)]  # one token per character: never what encode gives
    assert y_ids != _ids(tok, y) and tok.decode(y_ids) == y
    pair = make_pair(Correction(_rollout(tok, y_ids), y2, "t"), tok)
    k = _check_consistent(tok, pair, y_ids, y, y2)
    assert k == len("hello world, ")  # every sampled id up to the edit is kept
    assert common_prefix_length(encode_response(tok, y2), y_ids) <= 1  # re-encoding would share ~nothing
    noop = make_pair(Correction(_rollout(tok, y_ids), y, "t"), tok)
    assert noop.is_noop and noop.chosen_ids == y_ids + [IM_END] and noop.edit_distance == 0


def test_stop_rules_still_hold(tok):
    y_ids = _ids(tok, "Bye!")
    stopped = make_pair(Correction(_rollout(tok, y_ids, stop_id=ENDOFTEXT), "Bye now!", "t"), tok)
    assert stopped.rejected_ids[-1] == ENDOFTEXT and stopped.chosen_ids[-1] == ENDOFTEXT
    cut = make_pair(Correction(_rollout(tok, y_ids, finish="length"), "Bye!", "t"), tok)
    assert cut.rejected_ids == y_ids and cut.chosen_ids == y_ids + [IM_END] and cut.edit_distance == 1
    same = make_pair(Correction(_rollout(tok, y_ids), "Bye!", "t"), tok)
    assert same.is_noop


def test_random_edits_keep_every_invariant(tok):
    rng = random.Random(0)
    words = "the cat sat on a mat while 12 dogs ran past café naïve ünïcödé quickly , . !".split()
    for _ in range(150):
        y = " ".join(rng.choice(words) for _ in range(rng.randint(0, 10)))
        chars = list(y)
        for _ in range(rng.randint(1, 3)):  # delete / insert / replace a character
            op, at = rng.randrange(3), rng.randint(0, len(chars))
            if op == 0 and at < len(chars):
                del chars[at]
            elif op == 1:
                chars.insert(at, rng.choice("abé ,1"))
            elif at < len(chars):
                chars[at] = rng.choice("xyö.")
        y2 = "".join(chars)
        y_ids = _ids(tok, y)
        if rng.random() < 0.5:  # half of them sampled non-canonically, one token per character
            y_ids = [i for ch in y for i in _ids(tok, ch)]
        pair = make_pair(Correction(_rollout(tok, y_ids), y2, "t"), tok)
        _check_consistent(tok, pair, y_ids, y, y2)


def test_the_shared_prefix_forward_is_used_and_exact(tok):
    torch.manual_seed(0)
    model = build_model("tiny", seed=0, tokenizer=tok).eval()
    texts = [("The quick brown fox jumps over the lazy dog, and then it runs far away.",
              "The quick brown fox jumps over the lazy dog, and then it ran far away."),
             ("They are going home after the long day at school and wrok.",
              "They are going home after the long day at school and work."),
             ("12+34=46, and 7+8=15, and 9+9=18, and 1+1=3", "12+34=46, and 7+8=15, and 9+9=18, and 1+1=2")]
    pairs = [make_pair(Correction(_rollout(tok, _ids(tok, y)), y2, "t"), tok) for y, y2 in texts]
    batch, dropped = collate_pairs(pairs, tok.pad_token_id, 256, "drop")
    assert dropped == 0
    # the prefix shared by tokens covers the text prefix (the first pair shares ~60% of y)
    assert batch.shared_prefix_lengths[0] >= len(_ids(tok, "The quick brown fox jumps over the lazy dog, and then it ")) - 1
    cfg = ObjectiveConfig(shared_prefix="auto")
    assert use_shared_prefix(model, batch, cfg)
    with torch.no_grad():
        shared = score_pairs(model, batch, cfg)
        naive = score_pairs(model, batch, ObjectiveConfig(shared_prefix="off"))
    assert shared.used_shared_prefix and not naive.used_shared_prefix
    assert torch.allclose(shared.chosen_logps, naive.chosen_logps, atol=1e-4)
    assert torch.allclose(shared.rejected_logps, naive.rejected_logps, atol=1e-4)
