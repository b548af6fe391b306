"""The learner rank's object-store export in two halves (``actors/learner.py``): ``export`` hands
out views of the weights before the next step, ``publish`` puts them from a thread of its own while
that step runs, and the step's optimizer update waits for the put. The race this guards against:
a put still reading the views when the optimizer changes the weights would publish a mix of two
versions."""

from __future__ import annotations

import time

import pytest
import torch
from _helpers import addition_pairs, free_loopback_port


def _rank(tiny_model_dir, timeout_s: float):
    import ray

    from correction_rl.config import config_from_dict
    from correction_rl.distributed.cluster import learner_rank_class

    cfg = config_from_dict({"model": {"path": str(tiny_model_dir)}, "sync": {"timeout_s": timeout_s},
                            "objective": {"form": "logistic"},
                            "learner": {"backend": "torch", "lr": 1e-2, "micro_batch_pairs": 8}})
    rank = learner_rank_class().options(num_cpus=1).remote(cfg, 0, 1, "127.0.0.1", free_loopback_port())
    ray.get(rank.version.remote(), timeout=120)
    return rank


def _weights(rank) -> dict[str, torch.Tensor]:
    import ray

    from correction_rl.weights.sync import unflatten

    return dict(unflatten(ray.get(rank.gathered_update.remote("cpu"), timeout=60)))


@pytest.mark.usefixtures("ray_local")
def test_the_next_step_updates_the_weights_only_after_they_are_published(tiny_model_dir, tiny_tokenizer):
    import ray

    from correction_rl.distributed.weights import PUBLISH_GROUP, from_transport
    from correction_rl.weights.sync import unflatten

    rank = _rank(tiny_model_dir, timeout_s=60)
    try:
        before = _weights(rank)
        assert ray.get(rank.export.remote(), timeout=60) == 0
        step = rank.train_step.remote(addition_pairs(tiny_tokenizer))  # issued before the publish, as the driver does
        time.sleep(1.5)
        ready, _ = ray.wait([step], timeout=0)
        assert not ready, "the step finished while its weights' export was not yet published"
        published = ray.get(rank.publish.options(concurrency_group=PUBLISH_GROUP).remote(0, 60), timeout=60)
        stats = ray.get(step, timeout=60)
        assert stats.step == 1 and stats.extra["phase/publish_wait_s"] >= 1.0
        assert stats.extra["phase/publish_s"] > 0
        got = dict(unflatten(from_transport(ray.get(published.ref, timeout=60))))
        assert got.keys() == before.keys() and published.version == 0
        for name, value in before.items():  # version 0, bit for bit: not a mix with version 1
            assert torch.equal(got[name], value), name
        after = _weights(rank)
        assert any(not torch.equal(after[n], before[n]) for n in before)  # the step did move them
    finally:
        ray.kill(rank)


@pytest.mark.usefixtures("ray_local")
def test_an_export_never_published_stops_the_next_step_with_a_clear_error(tiny_model_dir, tiny_tokenizer):
    import ray

    rank = _rank(tiny_model_dir, timeout_s=2)
    try:
        ray.get(rank.export.remote(), timeout=60)
        start = time.perf_counter()
        with pytest.raises(ray.exceptions.RayTaskError, match="version 0 exported for the object store were not "
                                                              "published within 2 s"):
            ray.get(rank.train_step.remote(addition_pairs(tiny_tokenizer)), timeout=60)
        assert time.perf_counter() - start < 30
    finally:
        ray.kill(rank)


def test_the_handoff_gives_each_publish_its_own_version_and_times_out_readably():
    import threading

    from correction_rl.distributed.actors.learner import PublishHandoff
    from correction_rl.types import WeightUpdate

    handoff = PublishHandoff()
    assert handoff.wait_until_published(0.1) < 0.1  # nothing exported: the optimizer goes on
    handoff.stage(WeightUpdate(version=3, layout=[], buckets=[]), 1)
    taken = []
    later = threading.Thread(target=lambda: taken.append(handoff.take(4, 10).version))
    later.start()  # asks for version 4 while 3 is still staged: waits for 3's publish and 4's export
    time.sleep(0.2)
    assert handoff.take(3, 1).version == 3 and not taken
    with pytest.raises(TimeoutError, match="version 3 exported for the object store were not published within 0 s"):
        handoff.wait_until_published(0.05)
    handoff.done()
    assert handoff.wait_until_published(1) < 1
    handoff.stage(WeightUpdate(version=4, layout=[], buckets=[]), 1)
    later.join(5)
    assert taken == [4]
    handoff.done()
    with pytest.raises(TimeoutError, match="exported no weights of version 5 within 0 s"):
        handoff.take(5, 0.05)
    handoff.stage(WeightUpdate(version=6, layout=[], buckets=[]), 1)
    assert handoff.take(5, 1).version == 6  # a recovery sync exported behind a step in flight


@pytest.mark.usefixtures("ray_local")
def test_a_sync_started_while_a_step_is_in_flight_publishes_that_steps_weights(tiny_model_dir, tiny_tokenizer):
    """The fault drills' race (docs/benchmarks.md): the async driver issues step k+1 before it
    settles the earlier background sync; when that sync failed, the recovery sync asks for the
    driver's version k, but its export runs after step k+1. It must publish k+1, not fail."""
    import ray

    from correction_rl.distributed.weights import ObjectStoreSync

    rank = _rank(tiny_model_dir, timeout_s=60)
    try:
        transport = ObjectStoreSync([rank], workers=[], timeout_s=60)
        background = transport.start(0)  # after step 0, ordered before the next step
        step = rank.train_step.remote(addition_pairs(tiny_tokenizer))
        recovery = transport.start(0)  # the driver still knows version 0: step 1 is in flight
        assert background.wait().version == 0
        assert recovery.wait().version == 1
        assert ray.get(step, timeout=60).step == 1
    finally:
        ray.kill(rank)
