"""Prompts in flight at a checkpoint (async mode): the prompt stream's replay and skip lists and
the buffer actor's hand-off ledger, checked without Ray by simulating producers, teachers that
finish out of order, checkpoints and crashes at random moments."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from correction_rl.prompts.handoffs import HandoffLedger
from correction_rl.prompts.stream import PromptStream
from correction_rl.types import Prompt

PROMPTS = [Prompt(prompt_id=f"p{k}", text=f"q{k}", task="addition") for k in range(40)]


def ids(batch) -> list[str]:
    return [p.prompt_id for p in batch]


def test_replay_is_drawn_first_and_skip_passes_over_once_across_a_state_round_trip():
    order = ids(PromptStream(PROMPTS, seed=3).next_batch(120))  # three epochs
    stream = PromptStream(PROMPTS, seed=3)
    stream.load_state_dict({"epoch": 0, "position": 4, "replay": ["p7", "nope"], "skip": {order[5]: 1, "nope": 2}})
    assert stream.state.replay == ["p7"] and stream.state.skip == {order[5]: 1}  # foreign ids dropped
    first = ids(stream.next_batch(3))
    assert first == ["p7", order[4], order[6]]  # replay, then the permutation minus the skipped one
    again = PromptStream(PROMPTS, seed=3)
    again.load_state_dict(stream.state_dict())
    assert ids(again.next_batch(74)) == order[7:40] + order[40:81]  # skipped once, not in epoch 1
    old = PromptStream(PROMPTS, seed=3)
    old.load_state_dict({"epoch": 1, "position": 2})  # a checkpoint written before replay/skip
    assert ids(old.next_batch(2)) == order[42:44]


def test_logged_prompts_cancel_a_replay_before_they_are_skipped():
    stream = PromptStream(PROMPTS, seed=0)
    order = ids(PromptStream(PROMPTS, seed=0).next_batch(40))
    stream.load_state_dict({"epoch": 0, "position": 2, "replay": [order[0], order[1]]})
    stream.account_for_logged([order[1], order[3], "elsewhere"])
    assert stream.state.replay == [order[0]] and stream.state.skip == {order[3]: 1}
    assert ids(stream.next_batch(3)) == [order[0], order[2], order[4]]


def test_ledger_orders_positions_by_calls_and_replays_unfinished_batches_oldest_first():
    ledger = HandoffLedger()
    stream = {"epoch": 0, "position": 8}
    k2 = ledger.note(0, {"stream": {**stream, "position": 8}, "calls": 2, "tokens": 9}, ["c", "d"])
    k1 = ledger.note(0, {"stream": {**stream, "position": 4}, "calls": 1, "tokens": 5}, ["a", "b"])  # late note
    assert ledger.position(0)["calls"] == 2
    states = ledger.checkpoint_states(2)
    assert states[0]["stream"] == {"epoch": 0, "position": 8, "replay": ["a", "b", "c", "d"]}
    assert states[1] is None  # handed off nothing: a fresh stream
    ledger.resolve(k1)
    ledger.resolve(k2)
    assert ledger.checkpoint_states(1)[0]["stream"] == {"epoch": 0, "position": 8}


def test_a_restarted_producers_batches_in_flight_are_drawn_again_and_their_late_pairs_dropped():
    ledger = HandoffLedger()
    k1 = ledger.note(0, {"stream": {"epoch": 0, "position": 4}, "calls": 1}, ["a", "b"])
    k2 = ledger.note(0, {"stream": {"epoch": 0, "position": 8}, "calls": 2}, ["c", "d"])
    other = ledger.note(1, {"stream": {"epoch": 0, "position": 2}, "calls": 1}, ["x"])
    assert ledger.resolve(k1)  # stored before the restart
    assert ledger.requeue(0) == 2 and ledger.requeue(0) == 0
    assert ledger.position(0)["stream"] == {"epoch": 0, "position": 8, "replay": ["c", "d"]}
    assert list(ledger.in_flight) == [other]  # no longer holds the producers' room
    assert ledger.checkpoint_states(1)[0]["stream"]["replay"] == ["c", "d"]  # drawn again once
    assert not ledger.resolve(k2)  # its teacher answered after all: drawn again, not stored
    assert ledger.resolve(other)


@pytest.mark.parametrize("trial", range(60))
def test_a_crash_at_any_moment_neither_loses_nor_repeats_a_prompt(trial):
    """Two producers hand prompts to teachers that finish in random order; the buffer logs pairs
    (a teacher may reject a prompt: no pair) and resolves hand-offs in one step; checkpoints
    snapshot log length and ledger together; the run is killed at a random moment (the teachers'
    unfinished work is lost with it) and resumes from the last checkpoint, up to twice. Within a
    session a producer may also be restarted: it continues from its ledger position with its
    batches in flight requeued, and each of those is either lost with its teacher or answered
    late (and then not stored). Over the whole first epoch every prompt ends up logged exactly
    once, and no prompt is corrected twice unless its first answer was a rejection or came
    after its batch was requeued."""
    rng = random.Random(trial)
    shards = [PROMPTS[w::2] for w in range(2)]
    log: list[str] = []
    answered: Counter = Counter()
    rejected: set[str] = set()
    answered_late: set[str] = set()
    checkpoint = {"log_records": 0, "workers": [None, None]}

    def session(resume: dict | None, kill_after: int | None) -> None:
        ledger = HandoffLedger()
        streams = [PromptStream(shards[w], seed=w) for w in range(2)]
        calls = [0, 0]
        if resume is not None:
            logged_after = log[resume["log_records"]:]
            for w, state in enumerate(resume["workers"]):
                if state is not None:
                    streams[w].load_state_dict(state["stream"])
                    calls[w] = state["calls"]
                streams[w].account_for_logged(logged_after)
                ledger.seed(w, {"stream": streams[w].state_dict(), "calls": calls[w]})
        pending: list = []
        producing = [True, True]
        for event in range(10_000):
            if kill_after is not None and event >= kill_after:
                return
            if rng.random() < 0.03:  # a producer restarts (its worker, or a teacher it waited on, died)
                w = rng.randrange(2)
                ledger.requeue(w)
                position = ledger.position(w)
                streams[w] = PromptStream(shards[w], seed=w)
                calls[w] = 0
                if position is not None:
                    streams[w].load_state_dict(position["stream"])
                    calls[w] = position["calls"]
                producing[w] = True
                pending = [(key, batch) for key, batch in pending if key[0] != w or rng.random() < 0.5]
                continue
            if any(producing) and (not pending or rng.random() < 0.5):
                w = rng.choice([i for i in (0, 1) if producing[i]])
                batch = ids(streams[w].next_batch(1))
                if streams[w].state.epoch > 0:  # the first epoch is drawn
                    producing[w] = False
                    continue
                calls[w] += 1
                pending.append((ledger.note(w, {"stream": streams[w].state_dict(), "calls": calls[w]}, batch), batch))
            elif pending:
                key, batch = pending.pop(rng.randrange(len(pending)))
                answered.update(batch)
                if not ledger.resolve(key):
                    answered_late.update(batch)
                    continue
                for pid in batch:
                    (rejected.add if rng.random() < 0.1 else log.append)(pid)
            else:
                return  # the run finished
            if rng.random() < 0.1:
                checkpoint.update(log_records=len(log), workers=ledger.checkpoint_states(2))

    resume = None
    for kill in (rng.randrange(5, 60), rng.choice([None, rng.randrange(5, 60)]), None):
        session(resume, kill)
        resume = dict(checkpoint)
        if kill is None:
            break
    assert not [pid for pid, n in Counter(log).items() if n > 1], "a prompt logged twice"
    assert set(log) | rejected == {p.prompt_id for p in PROMPTS}, "a prompt was lost"
    repeated = {pid for pid, n in answered.items() if n > 1}
    unexplained = repeated - rejected - answered_late
    assert not unexplained, f"corrected twice without a rejection or a requeue: {sorted(unexplained)}"
