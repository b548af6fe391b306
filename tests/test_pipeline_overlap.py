"""The async pipeline's overlap (issue 19): the buffer actor lends a prefetched batch and a
checkpoint holds it as unsampled; producers are told which weights are still useful; a weight
sync in the background does not hold up the next learner step, and loads stay in version order.

The buffer actor is a plain class until ``cluster.py`` makes it remote, so it is exercised here
in-process (no Ray cluster needed); the weight syncer runs with a transport whose loads are held
until the test releases them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from correction_rl.buffer.correction_log import CorrectionLog
from correction_rl.buffer.replay import ReplayBuffer
from correction_rl.config import config_from_dict
from correction_rl.distributed.actors.buffer import BufferActor
from correction_rl.distributed.batches import BatchInfo, LentBatches
from correction_rl.distributed.weight_sync import WeightSyncer
from correction_rl.run.components import buffer_config
from correction_rl.types import CorrectionPair, make_pair_id
from correction_rl.weights.sync import SyncReport


def pair(i: int, version: int) -> CorrectionPair:
    rejected = [10 + (i + k) % 50 for k in range(3)] + [2]
    return CorrectionPair(
        pair_id=make_pair_id(f"p{i}", rejected[:-1], version), prompt_ids=[1, 5], rejected_ids=rejected,
        chosen_ids=rejected[:-2] + [99, 2], policy_version=version, teacher="oracle", edit_distance=1,
        prompt_id=f"p{i}",
    )


def run_config(tmp_path, **buffer):
    return config_from_dict({"name": "overlap", "output_dir": str(tmp_path), "mode": "async",
                             "buffer": {"max_staleness": 1, "min_fresh_pairs": 1, "max_pending": 4,
                                        "sampling": "fifo", **buffer}})


def test_producers_are_told_the_oldest_useful_version(tmp_path):
    """After the learner sampled at version v, the next sample is at v+1 at the earliest: with
    max_staleness 1, pairs of weights older than v would only be evicted as stale (measured
    before issue 19: one such wasted batch per step)."""
    actor = BufferActor(run_config(tmp_path), str(tmp_path / "log.jsonl"))
    assert actor.room(0.1) == -1  # nothing sampled yet: anything goes
    actor.add([pair(i, 0) for i in range(4)])
    assert actor.room(0.05) is None  # max_pending reached
    info, shard = actor.sample_batch(4, 0, 1.0, 1, None)
    assert info.num_pairs == 4 and len(shard) == 4
    assert actor.room(0.1) == 0  # the next sample is at version 1: weights 0 are still fine
    actor.add([pair(10 + i, 0) for i in range(4)])
    actor.sample_batch(4, 1, 1.0, 1, info.batch_id)  # the prefetch of the step from version 1
    assert actor.room(0.1) == 1  # now weights 0 are useless: wait for the load of version 1

    waiting = threading.Thread(target=actor.sample_batch, args=(4, 2, 2.0, 1, None))
    waiting.start()  # a sample waiting at version 2 ...
    time.sleep(0.2)
    assert actor.room(0.1) == 1  # ... is the upcoming one
    actor.add([pair(20 + i, 1) for i in range(4)])
    waiting.join(timeout=5)
    assert not waiting.is_alive()


def test_a_prefetched_batch_is_in_the_checkpoint_as_unsampled_pairs(tmp_path):
    """A batch sampled for the next step but not trained when the checkpoint is taken must be
    trained after a resume: the snapshot holds it as unsampled; a batch the learner trained
    (``trained_through``) does not come back."""
    cfg = run_config(tmp_path, max_pending=8)
    actor = BufferActor(cfg, str(tmp_path / "log.jsonl"))
    actor.add([pair(i, 0) for i in range(8)])
    trained, _ = actor.sample_batch(4, 0, 1.0, 1, None)
    lent, shard = actor.sample_batch(4, 1, 1.0, 1, None)
    assert actor.metrics()["buffer/lent_pairs"] == 8
    snapshot = actor.checkpoint_state(1, trained_through=trained.batch_id)
    assert actor.metrics()["buffer/lent_pairs"] == 4
    entries = {pid: uses for pid, uses in snapshot.buffer["entries"]}
    assert entries == {p.pair_id: 0 for p in shard}
    assert snapshot.buffer["counters"]["sampled"] == 4  # the trained batch only
    actor.close()  # releases the log's writer lock, as the ended run's actor does

    restored = ReplayBuffer(buffer_config(cfg), CorrectionLog(tmp_path / "log.jsonl"))
    restored.load_state_dict(snapshot.buffer)
    again = restored.sample(4, 1)
    assert [p.pair_id for p in again] == [p.pair_id for p in shard]


def test_lent_batches_are_released_in_order_and_fold_leaves_other_entries():
    lent = LentBatches()
    a = lent.lend([pair(0, 3), pair(1, 2)], sampled_at=3)
    b = lent.lend([pair(2, 3)], sampled_at=4)
    assert (a.batch_id, b.batch_id) == (0, 1) and a.staleness(3) == [0, 1] and b.staleness(3) == [0]
    lent.release(a.batch_id)
    assert len(lent) == 1
    state = {"entries": [["x", 0]], "counters": {"sampled": 3, "tokens_sampled": 12,
                                                 "sampled_staleness": {"0": 2, "1": 1}}}
    folded = lent.fold_into(state)
    assert folded["entries"] == [[pair(2, 3).pair_id, 0], ["x", 0]]
    assert folded["counters"]["sampled"] == 2 and folded["counters"]["sampled_staleness"] == {"0": 2}  # b was 4 - 3 = 1 stale
    assert state["entries"] == [["x", 0]]  # the live state is not touched
    assert BatchInfo(0, 5, (4, 5)).staleness(5) == [1, 0]


@dataclass
class HeldLoad:
    """A sync whose loads finish only when the test releases them; records the load order."""

    version: int
    release: threading.Event
    loads: list

    def wait(self) -> SyncReport:
        assert self.release.wait(10), "test: load never released"
        self.loads.append(self.version)
        return SyncReport(version=self.version, seconds=0.0, num_bytes=1, num_messages=1)


@dataclass
class HeldTransport:
    overlaps_training = True
    releases: dict = field(default_factory=dict)
    loads: list = field(default_factory=list)

    def start(self, version: int) -> HeldLoad:
        return HeldLoad(version, self.releases.setdefault(version, threading.Event()), self.loads)

    def close(self) -> None:
        pass


class Rows:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def log(self, metrics, step: int) -> None:
        self.steps.append(step)


@pytest.mark.timeout(60)
def test_a_background_sync_does_not_hold_up_the_next_step_and_loads_stay_in_order(tmp_path):
    cfg = config_from_dict({"name": "overlap", "output_dir": str(tmp_path), "mode": "async"})
    transport, version = HeldTransport(), [1]
    syncer = WeightSyncer(cfg, transport, health=None, current_version=lambda: version[0])
    syncer.sink = rows = Rows()

    assert syncer.after_step({}, may_overlap=True) is True  # sync of version 1 starts
    syncer.log({}, 1, held=True)
    version[0] = 2
    start = time.perf_counter()
    assert syncer.after_step({}, may_overlap=True) is True  # v1 still loading: no wait for it
    assert time.perf_counter() - start < 1.0
    syncer.log({}, 2, held=True)
    transport.releases[2].set()  # v2's loads may finish first ...
    time.sleep(0.2)
    assert transport.loads == []  # ... but they wait for v1's: never an older version after a newer
    transport.releases[1].set()
    syncer.settle_previous()
    assert rows.steps == [1] and transport.loads[0] == 1
    syncer.finish_background()
    assert rows.steps == [1, 2] and transport.loads == [1, 2]


@pytest.mark.timeout(60)
def test_a_sync_waited_for_at_once_loads_after_the_background_syncs(tmp_path):
    """A recovery sync may publish a newer version than a background sync still loading
    (``PublishHandoff.take``): its loads must come last, or an engine would be asked to go back a
    version."""
    cfg = config_from_dict({"name": "overlap", "output_dir": str(tmp_path), "mode": "async"})
    transport, version = HeldTransport(), [1]
    syncer = WeightSyncer(cfg, transport, health=None, current_version=lambda: version[0])
    syncer.sink = Rows()
    syncer.after_step({}, may_overlap=True)  # version 1 loading in the background
    version[0] = 2
    transport.releases[2] = threading.Event()
    transport.releases[2].set()  # the recovery's own loads would finish at once
    threading.Timer(0.3, transport.releases[1].set).start()
    assert syncer.sync().version == 2
    assert transport.loads == [1, 2]


def test_a_batch_at_a_teacher_counts_against_the_room(tmp_path):
    """A producer must not draw another batch while its last one is still being corrected: the
    learner takes one batch per step, and the extra one went stale (the waste measured in
    docs/benchmarks.md)."""
    from correction_rl.distributed.records import WorkerState

    actor = BufferActor(run_config(tmp_path), str(tmp_path / "log.jsonl"))
    assert actor.room(0.05) is not None
    key = actor.note_handoff(0, WorkerState(stream={"epoch": 0, "position": 4}, calls=1),
                             [f"p{i}" for i in range(4)])
    assert actor.room(0.05) is None  # max_pending 4: the 4 prompts at the teacher fill it
    actor.add([pair(i, 0) for i in range(4)], key)
    assert actor.room(0.05) is None  # now stored, still unsampled
    actor.sample_batch(4, 0, 1.0, 1, None)
    assert actor.room(0.05) == 0
