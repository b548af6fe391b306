"""Weight sync through Ray's object store (``ObjectStoreSync``, a ``WeightTransport``): learner
rank 0 publishes the buckets once, every rollout worker maps them.

Messages per sync: one object (the ``WeightUpdate``: buckets + one layout list) put by learner
rank 0's ``publish``, plus one ``load_weights`` call per rollout worker that
receives the object's reference — a number that depends on the number of workers, never on the
number of parameters. The buckets travel as numpy arrays because Ray stores those out of band
and ``ray.get`` maps them read-only from shared memory without a copy; each worker then copies
once, straight into its engine's parameters (or adopts them: ``AdoptsWeights``). (bf16 has no
numpy dtype: such buckets travel as int16 views and are viewed back.)

The export is part of the transport: ``start(v)`` asks every learner rank to export (ordered
before the next learner step, since Ray runs one caller's calls to an actor's default group in
order; views of the weights where they can be) and rank 0 to publish it (the put, in its
``publish`` concurrency group: beside that step's forward and backward, its optimizer update
waiting for it), and returns at once, so the learner may train on while the update is put and
the workers load (``overlaps_training``).

Every wait has a deadline: a worker that does not finish loading within ``sync.timeout_s``
raises ``SyncTimeout`` naming the version and the worker instead of hanging the run.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import ray
import torch

from correction_rl.types import WeightUpdate
from correction_rl.weights.group import dtype_named
from correction_rl.weights.sync import SyncReport, SyncTimeout

_VIEW_AS = {torch.bfloat16: torch.int16}

PUBLISH_GROUP = "publish"
"""The learner rank actor's concurrency group (one thread) for ``publish``: the put of version k
runs beside step k+1's forward and backward instead of before it (``actors/learner.py``;
``cluster.py`` creates the group)."""


def to_transport(update: WeightUpdate) -> WeightUpdate:
    """Buckets as numpy arrays (zero-copy on CPU) so Ray's object store can map them."""
    arrays = []
    for bucket in update.buckets:
        bucket = bucket.detach().cpu()
        if bucket.dtype in _VIEW_AS:
            bucket = bucket.view(_VIEW_AS[bucket.dtype])
        arrays.append(bucket.numpy())
    return replace(update, buckets=arrays)


def from_transport(update: WeightUpdate) -> WeightUpdate:
    """Back to torch tensors (views of the mapped arrays; the engine copies them into place)."""
    if not update.buckets or isinstance(update.buckets[0], torch.Tensor):
        return update
    dtypes = {}
    for _, bucket_index, _, _, dtype in update.layout:
        dtypes[bucket_index] = dtype_named(dtype)
    tensors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays: we only read them
        for i, array in enumerate(update.buckets):
            tensor = torch.from_numpy(np.asarray(array))
            if dtypes.get(i) in _VIEW_AS:
                tensor = tensor.view(dtypes[i])
            tensors.append(tensor)
    return replace(update, buckets=tensors)


@dataclass(frozen=True)
class PublishedUpdate:
    """What learner rank 0's ``publish`` returns: the update's object-store reference (nested in
    this record, so Ray passes the reference along instead of the bytes) and its size."""

    ref: Any
    """``ray.ObjectRef`` of the ``WeightUpdate`` (buckets as numpy arrays)."""
    version: int
    num_bytes: int
    num_buckets: int


def load_on_workers(workers: Sequence, update_ref, version: int, num_bytes: int, num_buckets: int,
                    timeout_s: float) -> SyncReport:
    """Make every worker load the update behind ``update_ref`` (already in the object store)
    within ``timeout_s``; ``SyncTimeout`` names the workers still loading."""
    start = time.perf_counter()
    calls = {w.load_weights.remote(update_ref): i for i, w in enumerate(workers)}
    pending = list(calls)
    deadline = start + timeout_s
    while pending:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            slow = sorted(calls[r] for r in pending)
            raise SyncTimeout(version, f"load_weights on rollout workers {slow}", timeout_s)
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=remaining)
        ray.get(done)  # re-raise a worker's load error with its own traceback
    return SyncReport(
        version=version,
        seconds=time.perf_counter() - start,
        num_bytes=num_bytes,
        num_messages=num_buckets + 1,  # per worker: the buckets and the layout, in one object
        num_targets=len(workers),
    )


@dataclass
class PendingPublish:
    """An object-store sync under way: the exports and the publish are issued; ``wait`` waits
    for them and for every worker's load (export included in the report's seconds and in the
    deadline)."""

    version: int
    exports: list
    publish: Any
    """``ObjectRef`` of rank 0's ``publish`` (a ``PublishedUpdate``)."""
    started: float
    workers: Sequence
    timeout_s: float

    def wait(self) -> SyncReport:
        try:
            ray.get(self.exports, timeout=self.timeout_s)  # a rank's export error, with its traceback
            remaining = max(1e-3, self.timeout_s - (time.perf_counter() - self.started))
            published: PublishedUpdate = ray.get(self.publish, timeout=remaining)
        except ray.exceptions.GetTimeoutError:
            raise SyncTimeout(self.version, "weight export on the learner ranks", self.timeout_s) from None
        report = load_on_workers(
            self.workers, published.ref, published.version, published.num_bytes, published.num_buckets,
            timeout_s=max(1e-3, self.timeout_s - (time.perf_counter() - self.started)),
        )
        return replace(report, seconds=time.perf_counter() - self.started)  # export included


class ObjectStoreSync:
    """``WeightTransport`` over Ray's object store: one published object, one load call per
    rollout worker. ``learners``: every learner rank (rank 0 first; all export, a collective
    under ZeRO-3), ``workers``: every rollout worker actor."""

    overlaps_training = True

    def __init__(self, learners: Sequence, workers: Sequence, timeout_s: float):
        self.learners = list(learners)
        self.workers = list(workers)
        self.timeout_s = timeout_s
        self.publish = self.learners[0].publish.options(concurrency_group=PUBLISH_GROUP)

    def start(self, version: int) -> PendingPublish:
        """Issue the export on every learner rank now (the caller's next learner step runs after
        it) and rank 0's publish beside that step, and return; ``wait`` on the result loads it
        everywhere."""
        exports = [r.export.remote() for r in self.learners]
        publish = self.publish.remote(version, self.timeout_s)
        return PendingPublish(version, exports, publish, time.perf_counter(), self.workers, self.timeout_s)

    def close(self) -> None:
        self.workers = []
