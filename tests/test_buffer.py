"""Replay buffer: durable-first adds, staleness admission, eviction counts, sampling order,
back-pressure, thread safety, and exact checkpoint/resume through the durable log."""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest

from correction_rl.buffer.replay import BufferStateError, ReplayBuffer, suggested_max_pending
from correction_rl.config import BufferConfig
from correction_rl.buffer.correction_log import CorrectionLog, read
from correction_rl.types import CorrectionPair, make_pair_id


def pair(i: int, version: int = 0, length: int = 3, noop: bool = False) -> CorrectionPair:
    rejected = [10 + (i + k) % 50 for k in range(length)] + [2]
    chosen = list(rejected) if noop else rejected[:-2] + [99, 2]
    return CorrectionPair(
        pair_id=make_pair_id(f"p{i}", rejected[:-1], version), prompt_ids=[1, 5], rejected_ids=rejected,
        chosen_ids=chosen, policy_version=version, teacher="oracle", edit_distance=0 if noop else 1,
        prompt_id=f"p{i}",
    )


def cfg(**kw) -> BufferConfig:
    base = dict(capacity=100, max_staleness=2, sampling="fifo", min_fresh_pairs=1)
    base.update(kw)
    return BufferConfig(**base)


def test_add_logs_durably_before_admitting(tmp_path):
    log = CorrectionLog(tmp_path / "log.jsonl")
    buf = ReplayBuffer(cfg(), log)
    res = buf.add([pair(0), pair(1), pair(1)])
    assert (res.admitted, res.duplicates, res.logged) == (2, 1, 2)
    assert [p.pair_id for p in read(log.path)] == [pair(0).pair_id, pair(1).pair_id]
    again = buf.add([pair(0)])  # already in the log: neither logged nor admitted twice
    assert (again.admitted, again.duplicates) == (0, 1) and len(buf) == 2 and len(log) == 2


def test_staleness_admission_and_counted_eviction(tmp_path):
    log = CorrectionLog(tmp_path / "log.jsonl")
    buf = ReplayBuffer(cfg(max_staleness=1), log)
    buf.add([pair(0, version=0, length=8), pair(1, version=1), pair(2, version=2)])
    assert buf.set_learner_version(2) == 1  # v0 is now 2 behind > 1: evicted, counted
    res = buf.add([pair(3, version=0, length=8), pair(4, version=2)])
    assert (res.admitted, res.stale_on_arrival, res.logged) == (1, 1, 2)
    s = buf.stats()
    assert s.evicted == {"stale": 1, "stale_on_arrival": 1, "capacity": 0, "noop": 0}
    assert s.size == 3 and s.admissible == 3 and s.staleness_hist == {0: 2, 1: 1}
    assert s.mean_len_stale == 9.0  # both stale pairs were the long ones (8 tokens + eos)
    # Everything stays in the durable log, including what memory let go.
    assert len(list(read(log.path))) == 5
    # Sampling at a newer version evicts v1 (3 - 1 = 2 > 1) and never returns it.
    got = buf.sample(5, learner_version=3)
    assert got is None  # only 2 admissible left (v2 pairs)
    assert buf.stats().evicted["stale"] == 2
    got = buf.sample(2, learner_version=3)
    assert sorted(p.policy_version for p in got) == [2, 2]
    assert buf.stats().last_batch_staleness_max == 1
    with pytest.raises(ValueError, match="went back"):
        buf.set_learner_version(1)


def test_fifo_returns_oldest_version_first_and_each_pair_once():
    buf = ReplayBuffer(cfg(max_staleness=5))
    buf.add([pair(0, version=2), pair(1, version=0), pair(2, version=1), pair(3, version=0)])
    first = buf.sample(2, learner_version=2)
    assert [p.pair_id for p in first] == [pair(1, 0).pair_id, pair(3, 0).pair_id]
    second = buf.sample(2, learner_version=2)
    assert [p.pair_id for p in second] == [pair(2, 1).pair_id, pair(0, 2).pair_id]
    assert buf.sample(1, learner_version=2) is None and len(buf) == 0
    s = buf.stats()
    assert s.sampled == 4 and s.sampled_staleness_hist == {0: 1, 1: 1, 2: 2}
    assert buf.metrics()["buffer/sampled_staleness_mean"] == pytest.approx((0 + 1 + 2 + 2) / 4)


def test_uniform_sampling_covers_the_buffer_and_is_seeded():
    def draw(rng):
        buf = ReplayBuffer(cfg(sampling="uniform", max_reuse=10**9))
        buf.add([pair(i) for i in range(20)])
        return [p.pair_id for _ in range(200) for p in buf.sample(1, 0, rng)]

    a, b = draw(random.Random(7)), draw(random.Random(7))
    assert a == b
    counts = {pid: a.count(pid) for pid in set(a)}
    assert len(counts) == 20 and max(counts.values()) < 30  # expectation 10 each
    fifo = ReplayBuffer(cfg(sampling="fifo", max_reuse=10**9))
    fifo.add([pair(i) for i in range(20)])
    cycle = [p.pair_id for _ in range(40) for p in fifo.sample(1, 0)]
    assert cycle == [pair(i).pair_id for i in range(20)] * 2  # epochs, in arrival order
    # numpy generators work too, and a batch never repeats a pair
    npbuf = ReplayBuffer(cfg(sampling="uniform"))
    npbuf.add([pair(i) for i in range(20)])
    batch = npbuf.sample(20, 0, np.random.default_rng(0))
    assert len({p.pair_id for p in batch}) == 20 and len(npbuf) == 0


def test_min_fresh_pairs_gates_sampling():
    buf = ReplayBuffer(cfg(min_fresh_pairs=4))
    buf.add([pair(i) for i in range(3)])
    assert not buf.ready(2, 0) and buf.sample(2, 0) is None
    buf.add([pair(3)])
    assert buf.ready(2, 0) and len(buf.sample(2, 0)) == 2


def test_reuse_knob_samples_a_pair_up_to_max_reuse_times():
    buf = ReplayBuffer(cfg(max_reuse=3))
    buf.add([pair(0)])
    assert [len(buf.sample(1, 0)) for _ in range(3)] == [1, 1, 1]
    assert buf.sample(1, 0) is None and buf.stats().sampled == 3


def test_capacity_evicts_oldest_and_counts():
    buf = ReplayBuffer(cfg(capacity=3, max_staleness=10))
    buf.add([pair(0, version=1), pair(1, version=0), pair(2, version=1)])
    res = buf.add([pair(3, version=2), pair(4, version=2)])
    assert res.admitted == 2 and res.evicted_for_capacity == 2
    left = {p.pair_id for p in buf.sample(3, 2)}
    assert left == {pair(2, 1).pair_id, pair(3, 2).pair_id, pair(4, 2).pair_id}
    assert buf.stats().evicted["capacity"] == 2


def test_noops_counted_and_optionally_kept_out_of_memory(tmp_path):
    log = CorrectionLog(tmp_path / "log.jsonl")
    buf = ReplayBuffer(cfg(admit_noops=False), log)
    res = buf.add([pair(0, noop=True), pair(1), pair(2, noop=True), pair(3)])
    assert res.admitted == 2 and res.noops_not_admitted == 2 and len(log) == 4
    s = buf.stats()
    assert s.noop_rate == 0.5 and s.evicted["noop"] == 2
    m = buf.metrics()
    assert m["buffer/noop_rate"] == 0.5 and m["buffer/evicted/noop"] == 2.0
    assert all(k.startswith("buffer/") and isinstance(v, float) for k, v in m.items())


def test_back_pressure_blocks_producers_until_the_learner_consumes():
    buf = ReplayBuffer(cfg(max_pending=4))
    buf.add([pair(i) for i in range(4)])
    assert not buf.has_room() and buf.room() == 0
    assert buf.wait_for_room(timeout=0.05) is False
    woke = threading.Event()

    def producer():
        if buf.wait_for_room(timeout=10):
            woke.set()

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.1)
    assert not woke.is_set()
    buf.sample(2, 0)
    t.join(5)
    assert woke.is_set() and buf.room() == 2
    assert buf.stats().producer_wait_s >= 0.1 + 0.05  # both waits were counted
    # Teacher work is never refused: adding past max_pending still logs and admits (up to capacity).
    assert buf.add([pair(i) for i in range(10, 16)]).admitted == 6
    buf.close()
    assert buf.wait_for_room(timeout=5) is False  # closed: waiters return at once


def test_max_pending_validation_names_the_field():
    with pytest.raises(ValueError, match="buffer.max_pending"):
        ReplayBuffer(cfg(capacity=10, max_pending=11))
    with pytest.raises(ValueError, match="buffer.max_reuse"):
        ReplayBuffer(cfg(max_reuse=0))
    assert suggested_max_pending(32, 2) == 96


def test_learner_waits_until_ready_across_threads():
    buf = ReplayBuffer(cfg(min_fresh_pairs=8))
    threading.Timer(0.1, lambda: buf.add([pair(i) for i in range(8)])).start()
    assert buf.wait_until_ready(4, 0, timeout=10)
    assert len(buf.sample(4, 0)) == 4


def test_thread_safety_smoke(tmp_path):
    log = CorrectionLog(tmp_path / "log.jsonl", fsync=False)
    buf = ReplayBuffer(cfg(capacity=10_000, max_pending=64, max_staleness=1000), log)
    n_producers, per = 4, 200
    sampled: list[str] = []
    done = threading.Event()

    def produce(k: int):
        for j in range(0, per, 10):
            assert buf.wait_for_room(timeout=20)
            buf.add([pair(k * 10_000 + j + i) for i in range(10)])

    def consume():
        while not (done.is_set() and len(buf) == 0):
            got = buf.sample(8, 0)
            if got:
                sampled.extend(p.pair_id for p in got)
            else:
                time.sleep(0.001)

    producers = [threading.Thread(target=produce, args=(k,)) for k in range(n_producers)]
    consumer = threading.Thread(target=consume)
    consumer.start()
    for t in producers:
        t.start()
    for t in producers:
        t.join(60)
    done.set()
    consumer.join(60)
    assert len(sampled) == len(set(sampled)) == n_producers * per
    s = buf.stats()
    assert s.added == s.sampled == n_producers * per and sum(s.evicted.values()) == 0
    assert len(log) == n_producers * per


def test_state_round_trip_restores_exactly_and_keeps_post_checkpoint_work(tmp_path):
    path = tmp_path / "log.jsonl"
    log = CorrectionLog(path)
    buf = ReplayBuffer(cfg(max_staleness=3, max_reuse=2), log)
    buf.add([pair(i, version=1) for i in range(6)])
    buf.sample(2, learner_version=2)  # p0, p1 used once (still in memory, max_reuse=2)
    buf.sample(2, learner_version=2)  # p2, p3 used once
    state = json.loads(json.dumps(buf.state_dict()))  # checkpoints are JSON-able
    before = buf.stats()
    buf.add([pair(100, version=2), pair(101, version=2)])  # teacher work after the checkpoint
    buf.close()  # the run stops (closing the log); a new one resumes from checkpoint + log
    assert log._fh.closed

    log2 = CorrectionLog(path)
    buf2 = ReplayBuffer(cfg(max_staleness=3, max_reuse=2), log2)
    res = buf2.load_state_dict(state)
    assert res.admitted == 2  # the two pairs logged after the checkpoint
    s = buf2.stats()
    assert s.size == 8 and s.learner_version == 2
    assert s.sampled == before.sampled == 4 and s.added == before.added + 2
    order = [p.pair_id for p in buf2.sample(8, learner_version=2)]
    # FIFO = fewest uses, then oldest version, then arrival: the use counts survived the resume.
    assert order == [pair(i, v).pair_id for i, v in ((4, 1), (5, 1), (100, 2), (101, 2),
                                                      (0, 1), (1, 1), (2, 1), (3, 1))]
    left = buf2.stats().size
    assert left == 4  # p4, p5, p100, p101 have one more use
    # A resumed producer skips what the teacher already corrected.
    assert pair(100, 2).pair_id in log2.seen_ids()
    assert buf2.add([pair(100, 2)]).duplicates == 1


def test_state_from_another_run_is_refused(tmp_path):
    log = CorrectionLog(tmp_path / "a.jsonl")
    buf = ReplayBuffer(cfg(), log)
    buf.add([pair(0)])
    state = buf.state_dict()
    other = CorrectionLog(tmp_path / "b.jsonl")
    other.append([pair(1)])
    with pytest.raises(BufferStateError, match=r"b\.jsonl: 1 pair\(s\) of the checkpointed buffer"):
        ReplayBuffer(cfg(), other).load_state_dict(state)


def test_restore_from_log_without_a_checkpoint(tmp_path):
    path = tmp_path / "log.jsonl"
    with CorrectionLog(path) as log:
        ReplayBuffer(cfg(), log).add([pair(0, 0), pair(1, 3), pair(2, 4)])
    buf = ReplayBuffer(cfg(max_staleness=1))
    res = buf.restore_from_log(path, learner_version=4)
    assert (res.admitted, res.stale_on_arrival) == (2, 1)
    assert buf.add([pair(1, 3)]).duplicates == 1  # ids from the log are known
