"""Weight sync through Ray's object store: rank 0 publishes the buckets once, every rollout
worker maps them.

Messages per sync: one object (the ``WeightUpdate``: buckets + one layout list) put by learner
rank 0 as the return value of ``export``, plus one ``load_weights`` call per rollout worker that
receives the object's reference — a number that depends on the number of workers, never on the
number of parameters. The buckets travel as numpy arrays because Ray stores those out of band
and ``ray.get`` maps them read-only from shared memory without a copy; each worker then copies
once, straight into its engine's parameters. (bf16 has no numpy dtype: such buckets travel as
int16 views and are viewed back.)

Every wait has a deadline: a worker that does not finish loading within ``sync.timeout_s``
raises ``SyncTimeout`` naming the version and the worker instead of hanging the run.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from typing import Sequence

import numpy as np
import ray
import torch

from correction_rl.weights.sync import SyncReport, SyncTimeout
from correction_rl.types import WeightUpdate

_VIEW_AS = {torch.bfloat16: torch.int16}


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
        dtypes[bucket_index] = getattr(torch, dtype)
    tensors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays: we only read them
        for i, array in enumerate(update.buckets):
            tensor = torch.from_numpy(np.asarray(array))
            if dtypes.get(i) in _VIEW_AS:
                tensor = tensor.view(dtypes[i])
            tensors.append(tensor)
    return replace(update, buckets=tensors)


class ObjectStoreSync:
    """``WeightSync`` over Ray: one published object, one load call per rollout worker."""

    def __init__(self, workers: Sequence, timeout_s: float):
        self.workers = list(workers)
        self.timeout_s = timeout_s

    def publish_ref(
        self, update_ref, version: int, num_bytes: int, num_buckets: int, timeout_s: float | None = None
    ) -> SyncReport:
        """Make every worker load the update behind ``update_ref`` (already in the object store,
        e.g. returned by learner rank 0's ``export``) within ``timeout_s`` (default: the
        transport's; a caller that spent part of its budget exporting passes the rest)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        start = time.perf_counter()
        calls = {w.load_weights.remote(update_ref): i for i, w in enumerate(self.workers)}
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
            num_targets=len(self.workers),
        )

    def publish(self, update: WeightUpdate) -> SyncReport:
        ref = ray.put(to_transport(update))
        return self.publish_ref(ref, update.version, update.num_bytes, len(update.buckets))

    def close(self) -> None:
        self.workers = []
