"""The one interface every weight transport implements: move learner version v to every engine.

A transport owns the whole route, export included (flattening the learner's weights into
buckets is part of the sync's cost and of its deadline), so a driver never branches on which
transport it holds: in-process (``weights/sync.py``), Ray's object store and the gloo/NCCL
collective group (``distributed/``) all look the same from the step loop.

A sync is split in two so a driver can overlap it with training: ``start(v)`` must be called
from the driver's step loop right after step v (it orders the export before the next
``train_step``), and ``PendingSync.wait()`` returns the report once every engine serves v.
Transports that cannot overlap (the learner takes part in the broadcast, or everything runs in
one process) finish inside ``start`` and return a ``DoneSync``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from correction_rl.weights.sync import SyncReport


@runtime_checkable
class PendingSync(Protocol):
    """A sync under way; ``wait`` raises what the sync raised (``SyncTimeout`` past its deadline)."""

    version: int

    def wait(self) -> SyncReport: ...


@runtime_checkable
class WeightTransport(Protocol):
    """Moves learner weights to the rollout engines, bucketed: a constant number of messages per
    sync whatever the number of parameters (docs/rollout.md)."""

    overlaps_training: bool
    """True when ``start`` returns before the engines have loaded, so the next learner step may
    run while they do (the object store); False when ``start`` already waited."""

    def start(self, version: int) -> PendingSync: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DoneSync:
    """A sync that finished inside ``start``."""

    report: SyncReport

    @property
    def version(self) -> int:
        return self.report.version

    def wait(self) -> SyncReport:
        return self.report


def sync(transport: WeightTransport, version: int) -> SyncReport:
    """Start a sync and wait for it: the plain, non-overlapped route."""
    return transport.start(version).wait()
