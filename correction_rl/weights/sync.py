"""Versioned weight sync: bucketing, hard timeouts, and the in-process transport.

Why buckets: the learner's weights travel as a handful of flat tensors (one per ``bucket_bytes``
of parameters of one dtype) plus one metadata message (``WeightUpdate.layout``), so the number of
messages per sync is ``ceil(model bytes / bucket bytes) + 1`` whatever the number of parameters.
Per-parameter remote calls are the usual cause of minute-long syncs in RL systems.

Why a hard timeout: a stalled engine (a dead worker process, an NCCL peer that never joins) must
surface as a readable ``SyncTimeout`` naming the version, the stage and the limit, not as a run
that silently stops producing rollouts.

Every transport implements ``WeightTransport`` (``weights/transport.py``): ``start(version)``
exports the learner's weights into buckets and delivers them. ``InProcessSync`` (here) is the
one where learner and generators share a process; the Ray object store and the gloo/NCCL
collective group live in ``correction_rl/distributed/``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

import torch

from correction_rl.types import WeightUpdate
from correction_rl.weights.export import WeightExporter, fill_bucket, plan_buckets, plan_key

if TYPE_CHECKING:
    from correction_rl.weights.transport import DoneSync

T = TypeVar("T")


class SyncTimeout(TimeoutError):
    """A sync stage did not finish within the hard limit."""

    def __init__(self, version: int, stage: str, timeout_s: float):
        self.version, self.stage, self.timeout_s = version, stage, timeout_s
        super().__init__(
            f"weight sync of version {version} timed out at stage {stage!r} after "
            f"{timeout_s:.1f} s (the engine may be stalled or dead; it was left in an unknown "
            f"state and should be restarted or re-synced)"
        )

    def __reduce__(self):
        # raised inside a Ray actor, the error is pickled to the driver: rebuild it from its fields
        return (type(self), (self.version, self.stage, self.timeout_s))


class StaleWeightsError(ValueError):
    """An engine was handed weights older than the ones it already serves."""


@dataclass(frozen=True)
class SyncReport:
    """What one sync measured (logged as ``sync/*`` metrics)."""

    version: int
    seconds: float
    num_bytes: int
    """Bytes of one copy of the weights (the buckets), not multiplied by the number of targets."""
    num_messages: int
    """Messages per target: one per bucket plus one metadata message."""
    num_targets: int = 1

    @property
    def gb_per_s(self) -> float:
        """Delivered bandwidth: bytes times targets over wall seconds."""
        return self.num_bytes * self.num_targets / max(self.seconds, 1e-12) / 1e9

    def as_metrics(self, prefix: str = "sync/") -> dict[str, float]:
        return {
            f"{prefix}version": float(self.version),
            f"{prefix}seconds": self.seconds,
            f"{prefix}bytes": float(self.num_bytes),
            f"{prefix}gb_per_s": self.gb_per_s,
            f"{prefix}num_messages": float(self.num_messages),
        }


def num_messages(update: WeightUpdate) -> int:
    """Messages one target receives for ``update``: the buckets plus the layout."""
    return len(update.buckets) + 1


def check_version(current: int, incoming: int, engine: str) -> None:
    """Refuse a regression: rollouts must never be stamped with a version older than one the
    engine already served, or the buffer's staleness bound would be computed from a lie.
    Re-applying the current version is allowed (idempotent retries after a timeout)."""
    if incoming < current:
        raise StaleWeightsError(
            f"{engine} serves policy version {current} and refuses the older update "
            f"version {incoming}"
        )


# --- bucketing ------------------------------------------------------------------------------


def flatten_to_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, bucket_bytes: int
) -> WeightUpdate:
    """Pack named tensors into fresh flat 1-D buckets of at most ``bucket_bytes`` each (one dtype
    per bucket; a tensor bigger than ``bucket_bytes`` gets a bucket of its own; the plan is
    ``weights/export.plan_buckets``).

    Each bucket is filled by one ``torch.cat(..., out=bucket)``. The buckets are fresh tensors
    owned by the update, which costs a page fault per page on a CPU: the transports export
    through a ``WeightExporter`` instead (reused buffers, or views of the learner's flat
    parameters); this one-off form serves tests and callers that keep the update indefinitely.
    """
    items = [(name, t.detach()) for name, t in named_tensors]
    plan = plan_buckets(plan_key(items), bucket_bytes)
    buckets: list[torch.Tensor] = []
    for members, (numel, dtype) in zip(plan.members, plan.buckets):
        group = [items[i][1] for i in members]
        bucket = torch.empty(numel, dtype=dtype, device=group[0].device)
        fill_bucket(bucket, group)
        buckets.append(bucket)
    return WeightUpdate(version=version, layout=list(plan.layout), buckets=buckets)


def unflatten(update: WeightUpdate) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` views into the buckets (no copies), validating the layout so a
    corrupt update fails naming the parameter instead of loading garbage."""
    for name, b, offset, shape, dtype in update.layout:
        if not 0 <= b < len(update.buckets):
            raise ValueError(
                f"weight update v{update.version}: parameter {name!r} points to bucket {b}, "
                f"but the update has {len(update.buckets)} buckets"
            )
        bucket = update.buckets[b]
        if str(bucket.dtype).removeprefix("torch.") != dtype:
            raise ValueError(
                f"weight update v{update.version}: parameter {name!r} has dtype {dtype} but "
                f"bucket {b} holds {bucket.dtype}"
            )
        numel = math.prod(shape)
        if offset < 0 or offset + numel > bucket.numel():
            raise ValueError(
                f"weight update v{update.version}: parameter {name!r} spans "
                f"[{offset}, {offset + numel}) beyond bucket {b} of {bucket.numel()} elements"
            )
        yield name, bucket[offset : offset + numel].view(shape)


def load_into_module(module: torch.nn.Module, update: WeightUpdate) -> int:
    """Copy ``update`` into ``module``'s parameters by name; every parameter must be covered
    (a partial update usually means a naming mismatch such as a ``module.`` prefix, which would
    otherwise leave the engine silently serving old weights). Returns the bytes copied."""
    return copy_by_name(dict(module.named_parameters()), update, f"parameter of {type(module).__name__}")


def copy_by_name(params: dict[str, torch.Tensor], update: WeightUpdate, what: str, hint: str = "") -> int:
    """Copy every tensor of ``update`` into the tensor of ``params`` with its name, checking
    names, shapes and that ``update`` covers all of ``params``; ``what`` names the target in
    errors and ``hint`` says what a mismatch usually means. Returns the bytes copied."""
    missing = set(params)
    copied = 0
    with torch.no_grad():
        for name, value in unflatten(update):
            param = params.get(name)
            if param is None:
                raise KeyError(
                    f"weight update v{update.version}: no {what} is named {name!r} (first of "
                    f"them: {next(iter(params), None)!r}){hint}"
                )
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(
                    f"weight update v{update.version}: {what} {name!r} has shape "
                    f"{tuple(param.shape)}, the update's is {tuple(value.shape)}{hint}"
                )
            param.copy_(value)
            missing.discard(name)
            copied += value.numel() * value.element_size()
    if missing:
        raise ValueError(
            f"weight update v{update.version} does not cover {len(missing)} parameters of the "
            f"{len(params)} ({what}), e.g. {sorted(missing)[:3]}"
        )
    return copied


# --- timeouts -------------------------------------------------------------------------------


def run_with_timeout(fn: Callable[[], T], timeout_s: float, version: int, stage: str) -> T:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s``.

    Python cannot kill a thread, so on timeout the stalled apply keeps running in the
    background; the caller gets ``SyncTimeout`` immediately and must treat that engine as
    broken (restart it, or re-sync the same version, which ``check_version`` allows).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"weight-sync-v{version}-{stage}", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.0))
    if thread.is_alive():
        raise SyncTimeout(version, stage, timeout_s)
    if error:
        raise error[0]
    return result[0]


# --- the in-process transport ------------------------------------------------------------------

DEFAULT_BUCKET_BYTES = 64 * 2**20


class WeightSource(Protocol):
    """What a transport exports from: the learner (full, gathered parameters by HF name)."""

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]: ...


class InProcessSync:
    """The ``WeightTransport`` of the in-process loop: the learner and the generators share a
    process, so ``start(v)`` exports the learner's weights into buckets and calls each
    generator's ``load_weights`` with the same ``WeightUpdate``, all under one deadline of
    ``timeout_s`` (each apply runs in a watchdog thread, so a stalled engine raises
    ``SyncTimeout`` instead of hanging the loop). It finishes inside ``start``
    (``overlaps_training`` is False).

    ``publish(update)`` is the delivery half alone, for callers that already hold an update
    (engine tests)."""

    overlaps_training = False

    def __init__(self, generators: Sequence, timeout_s: float = 120.0, source: WeightSource | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if not generators:
            raise ValueError("InProcessSync needs at least one generator")
        self.generators = list(generators)
        self.timeout_s = timeout_s
        self.source = source
        self.bucket_bytes = bucket_bytes
        self.exporter = WeightExporter(bucket_bytes)
        """Plans once and borrows the learner's flat parameters (or reuses its buffers): the
        engines load inside ``start``, before the learner's next step can change them."""

    def start(self, version: int) -> "DoneSync":
        """Export version ``version`` from the source (the learner) and load it everywhere."""
        from correction_rl.weights.transport import DoneSync

        if self.source is None:
            raise ValueError("InProcessSync.start needs a source to export from (InProcessSync(..., source=learner))")
        t0 = time.perf_counter()
        update = self.exporter.export(self.source.named_weights(), version, borrow=True)
        report = self.publish(update, budget_s=self.timeout_s - (time.perf_counter() - t0))
        del update  # nothing may read a borrowed update after the learner moves on
        return DoneSync(SyncReport(version=report.version, seconds=time.perf_counter() - t0,
                                   num_bytes=report.num_bytes, num_messages=report.num_messages,
                                   num_targets=report.num_targets))

    def publish(self, update: WeightUpdate, budget_s: float | None = None) -> SyncReport:
        """Load ``update`` into every generator within ``budget_s`` (default ``timeout_s``)."""
        start = time.perf_counter()
        deadline = start + (self.timeout_s if budget_s is None else budget_s)
        for i, gen in enumerate(self.generators):
            stage = f"load_weights into generator {i} ({type(gen).__name__})"
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise SyncTimeout(update.version, stage, self.timeout_s)
            try:
                run_with_timeout(lambda g=gen: g.load_weights(update), remaining, update.version, stage)
            except SyncTimeout:
                raise SyncTimeout(update.version, stage, self.timeout_s) from None
        return SyncReport(
            version=update.version,
            seconds=time.perf_counter() - start,
            num_bytes=update.num_bytes,
            num_messages=num_messages(update),
            num_targets=len(self.generators),
        )

    def close(self) -> None:
        self.generators = []
        self.source = None
        self.exporter.release()
