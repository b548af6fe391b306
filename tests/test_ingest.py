"""The one ingest step: corrections -> pairs -> pi_ref log-probs -> buffer, and its one owner of
pi_ref (the starting policy, never the learner's live weights)."""

from __future__ import annotations

import dataclasses

import pytest

from correction_rl.buffer.replay import ReplayBuffer
from correction_rl.config import BufferConfig, load_config
from correction_rl.learner.learner import Learner
from correction_rl.models import load_model, load_tokenizer
from correction_rl.pairs.ingest import Ingest, IngestResult
from correction_rl.pairs.reference import ReferenceScorer
from correction_rl.types import Correction, Prompt, Rollout


def _cfg(model_dir, form: str = "dpo"):
    return load_config(None, {"model": {"path": str(model_dir)}, "objective": {"form": form}, "mode": "inprocess",
                              "learner": {"backend": "torch", "lr": 1e-2, "micro_batch_pairs": 4}})


def _corrections(tok, n: int = 6, start: int = 10) -> list[Correction]:
    out = []
    for i in range(start, start + n):
        prompt = Prompt(prompt_id=f"p{i}", text=f"{i}+{i}=", task="addition", answer=str(2 * i))
        wrong = str(2 * i + 1)
        rollout = Rollout(prompt=prompt, prompt_ids=tok(prompt.text)["input_ids"],
                          response_ids=tok(wrong, add_special_tokens=False)["input_ids"], response_text=wrong,
                          policy_version=0, finish_reason="stop")
        out.append(Correction(rollout=rollout, corrected_text=str(2 * i), teacher="oracle"))
    return out


def test_ingest_attaches_reference_logps_of_the_untouched_starting_model(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    ingest = Ingest.from_config(cfg, tok, device="cpu")
    learner = Learner(load_model(tiny_model_dir), tok.pad_token_id, cfg.learner, cfg.objective, cfg.model,
                      total_steps=10, device="cpu")
    assert not hasattr(learner, "reference") and not hasattr(learner, "attach_reference")
    buffer = ReplayBuffer(BufferConfig(capacity=64, max_staleness=10))
    first = ingest(_corrections(tok, start=10), buffer)
    for _ in range(5):  # the learner moves away from the starting policy
        learner.train_step(first.pairs)
    moved = max((p - q).abs().max().item() for (_, p), (_, q)
                in zip(learner.model.named_parameters(), load_model(tiny_model_dir).named_parameters()))
    assert moved > 1e-3

    later = ingest(_corrections(tok, start=30), buffer)
    untouched = ReferenceScorer(load_model(tiny_model_dir), tok.pad_token_id, cfg.objective, cfg.model)
    expected = untouched.attach([dataclasses.replace(p, ref_logps=None) for p in later.pairs])
    trained = ReferenceScorer(learner.model, tok.pad_token_id, cfg.objective, cfg.model)
    drifted = trained.attach([dataclasses.replace(p, ref_logps=None) for p in later.pairs])
    for got, want, live in zip(later.pairs, expected, drifted):
        assert got.ref_logps is not None
        assert got.ref_logps == pytest.approx(want.ref_logps, abs=1e-5)
        assert got.ref_logps != pytest.approx(live.ref_logps, abs=1e-3)  # not the trained weights
    assert isinstance(later, IngestResult) and later.added == len(later.pairs) == 6
    assert len(buffer) == 12


def test_ingest_counts_what_it_skips_and_reports_the_sink(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, form="logistic")
    tok = load_tokenizer(tiny_model_dir)
    ingest = Ingest.from_config(cfg, tok)
    assert ingest.reference is None  # a reference-free objective builds no model
    corrections = _corrections(tok, n=3)
    corrections[1] = Correction(rollout=corrections[1].rollout, corrected_text=None, teacher="oracle",
                                rejection="unparseable")
    received = []

    class ListSink:  # what a Ray buffer wrapper looks like: add() -> admitted count
        def add(self, pairs, batch_key=None):
            received.append((list(pairs), batch_key))
            return len(pairs)

    result = ingest(corrections, ListSink(), batch_key="w0-3")
    assert result.skipped == {"rejected:unparseable": 1}
    assert result.added == 2 and [p.pair_id for p in result.pairs] == [p.pair_id for p in received[0][0]]
    assert received[0][1] == "w0-3" and all(p.ref_logps is None for p in result.pairs)
    pairs, skipped = ingest.prepare(corrections)
    assert len(pairs) == 2 and skipped == {"rejected:unparseable": 1}
