"""Evaluation: metrics on hand-made corrections equal hand-computed numbers; evaluate() and the
KL estimate with a real tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from correction_rl.edits import common_prefix_length, edit_distance, normalized_edit_distance
from correction_rl.run.evaluation import cli, compute_metrics, evaluate, score_responses
from correction_rl.models import build_model, build_tokenizer, make_model
from correction_rl.rollout.hf import HFGenerator
from correction_rl.tasks import get_task
from correction_rl.teachers.oracle import OracleTeacher
from correction_rl.types import Correction, Prompt, Rollout, Sampling


def test_edit_distances():
    assert edit_distance("123", "122") == 1
    assert edit_distance([5, 6, 7], [5, 7]) == 1
    assert edit_distance("", "abc") == 3
    assert normalized_edit_distance("", "") == 0.0
    assert normalized_edit_distance("1,3,2", "1,2,3") == pytest.approx(2 / 5)
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2


def _rollout(prompt: Prompt, text: str, finish: str = "stop") -> Rollout:
    return Rollout(prompt, [1], list(range(len(text))), text, 0, finish)  # type: ignore[arg-type]


def hand_made_corrections() -> list[Correction]:
    add = get_task("addition").make_prompt("37+85=")
    srt = get_task("sorting").make_prompt("sort:3,1,2=")
    open_ended = Prompt(prompt_id="free", text="write a poem")
    rollouts = [
        _rollout(add, "122"),  # right:            d=0, norm 0
        _rollout(add, "123"),  # one digit wrong:  d=1, norm 1/3
        _rollout(add, "0122", "length"),  # right, not exact, truncated: d=0
        _rollout(add, ""),  # empty:             d=3, norm 1
        _rollout(srt, "1,3,2"),  # swapped:       d=2, norm 2/5
        _rollout(open_ended, "roses"),  # rejected by the teacher
    ]
    corrections = OracleTeacher().correct(rollouts[:5])
    corrections.append(Correction(rollouts[5], None, "human", rejection="timeout"))
    return corrections


def test_metrics_equal_hand_computed_values():
    m = compute_metrics(hand_made_corrections(), kl_terms=[0.5, -0.1, 0.2])
    assert m.num_prompts == 6
    assert m.accuracy == pytest.approx(2 / 5)  # checker: 122 and 0122 (open-ended prompt excluded)
    assert m.exact_match == pytest.approx(1 / 5)  # only "122" equals the canonical answer
    assert m.correction_rate == pytest.approx(3 / 5)  # 123, "", 1,3,2 changed (of 5 accepted)
    assert m.mean_edit_distance == pytest.approx((0 + 1 + 0 + 3 + 2) / 5)
    assert m.mean_normalized_edit_distance == pytest.approx((0 + 1 / 3 + 0 + 1 + 2 / 5) / 5)
    assert m.rejection_rate == pytest.approx(1 / 6)
    assert m.mean_response_tokens == pytest.approx((3 + 3 + 4 + 0 + 5 + 5) / 6)
    assert m.truncated_rate == pytest.approx(1 / 6)
    assert m.kl == pytest.approx(0.2)
    assert m.kl_stderr == pytest.approx(0.3 / math.sqrt(3))  # sample std 0.3


def test_token_distances_use_the_tokenizer():
    # A tokenizer that maps a whole text to one token makes any change cost exactly 1.
    m = compute_metrics(hand_made_corrections()[:5], tokenize=lambda s: [hash(s)] if s else [])
    assert m.mean_edit_distance == pytest.approx((0 + 1 + 0 + 1 + 1) / 5)


def test_no_corrections_is_an_error():
    with pytest.raises(ValueError, match="no corrections"):
        compute_metrics([])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", seed=0).eval(), build_model("tiny", seed=1).eval(), build_tokenizer()


def test_score_responses_matches_log_softmax(tiny):
    model, _, tok = tiny
    p = get_task("addition").make_prompt("37+85=")
    rollouts = [_rollout(p, "12"), _rollout(p, "9", "length"), _rollout(p, "")]
    scores = score_responses(model, tok, rollouts)
    for r, score in zip(rollouts, scores):
        ids = tok(r.prompt.text + r.response_text)["input_ids"]
        targets = ids[len(tok(r.prompt.text)["input_ids"]) :] + ([2] if r.finish_reason == "stop" else [])
        full = torch.tensor([ids + ([2] if r.finish_reason == "stop" else [])])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=full).logits[0].float(), -1)
        start = full.shape[1] - len(targets)
        expected = sum(logp[start - 1 + i, t].item() for i, t in enumerate(targets))
        assert score == pytest.approx(expected, abs=1e-4)
    assert scores[1] != 0.0 and scores[2] < 0.0  # the empty response still scores <eos>


def test_evaluate_with_a_real_generator(tiny):
    model, init, tok = tiny
    prompts = get_task("addition").generate(12, "eval", seed=0)
    generator = HFGenerator(model, tok)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, seed=7)
    report = evaluate(generator, prompts, OracleTeacher(), sampling, policy_model=model, init_model=init, tokenizer=tok)
    assert set(report.modes) == {"greedy", "sampled"} and report.policy_version == 0
    greedy = generator.generate(prompts, Sampling(max_new_tokens=6, temperature=0.0))
    expected = compute_metrics(OracleTeacher().correct(greedy))
    assert report.modes["greedy"] == expected  # same numbers, recomputed by hand
    assert report.modes["greedy"].kl is None
    sampled = generator.generate(prompts, sampling)
    kl = sum(
        a - b for a, b in zip(score_responses(model, tok, sampled), score_responses(init, tok, sampled))
    ) / len(sampled)
    assert report.modes["sampled"].kl == pytest.approx(kl, abs=1e-4)
    assert report.by_task["sampled"]["addition"].kl == pytest.approx(kl, abs=1e-4)
    # same model on both sides: the drift is exactly zero
    same = evaluate(generator, prompts, OracleTeacher(), sampling, policy_model=model, init_model=model, modes=["sampled"])
    assert same.modes["sampled"].kl == pytest.approx(0.0, abs=1e-6)
    flat = report.as_metrics()
    assert flat["eval/greedy/accuracy"] == expected.accuracy
    assert "eval/sampled/addition/kl" in flat
    assert "greedy" in report.table() and "sampled" in report.table()


def test_eval_cli_writes_json(tmp_path, capsys):
    make_model(tmp_path / "m", "tiny", seed=0)
    make_model(tmp_path / "init", "tiny", seed=1)
    out = tmp_path / "report.json"
    code = cli(["--model", str(tmp_path / "m"), "--task", "addition", "reverse", "--num-prompts", "5",
                "--max-new-tokens", "4", "--init-model", str(tmp_path / "init"), "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["modes"]["greedy"]["num_prompts"] == 10
    assert set(data["by_task"]["sampled"]) == {"addition", "reverse"}
    assert data["modes"]["sampled"]["kl"] is not None
    assert "addition" in capsys.readouterr().out
