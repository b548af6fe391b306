"""Weight sync by broadcast (``sync.transport: collective``): learner rank 0 broadcasts the
buckets through a weight group (``correction_rl/weights/group.py``) straight into every rollout
worker's engine: gloo on CPU, NCCL on GPU (there the receiving ranks of a vLLM engine are its
own workers, joined through ``crl_nccl_init``; an HF engine's actor joins itself).

The driver never touches the bytes. It sets the group up once (and again after a member lost
it), then each sync is one remote call per member carrying only the version:

1. setup: every learner rank plans the static ``WeightLayout`` (a collective under ZeRO-3);
   learner rank 0 reports its node IP and a free port; the world is 1 + every worker's receiving
   ranks; all members join concurrently under ``sync.timeout_s``. The layout crosses here, once.
2. sync: every learner rank gathers (rank 0 also buckets and broadcasts) while every rollout
   worker receives and loads, concurrently, under ``sync.timeout_s``; a member that does not
   finish raises ``SyncTimeout`` naming it, and the group is marked for a rebuild.

A rollout worker restarted by Ray comes back without a group (``collective_generation`` is None);
before every sync the driver asks each worker which generation it joined (one tiny call each)
and rebuilds the whole group, on a new port, when any answer differs.

Why not the default on CPU: on one node the object store maps the published buckets from shared
memory, which is faster than a gloo broadcast over loopback (benchmarks/bench_weight_sync.py);
``auto`` therefore picks this transport only for GPU machines (``choose_transport``).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Sequence

import ray

from correction_rl.config import RunConfig
from correction_rl.weights.group import Backend, GroupAddress, TransferReport, WeightLayout, choose_transport
from correction_rl.weights.sync import SyncReport, SyncTimeout
from correction_rl.weights.transport import DoneSync, WeightTransport


@dataclass(frozen=True)
class CollectiveSyncReport(SyncReport):
    """A ``SyncReport`` plus where a collective sync spent its time (``sync/*`` metrics)."""

    setup_seconds: float = 0.0
    """Group (re)build inside this sync (0 when the group was intact)."""
    send_seconds: float = 0.0
    """Learner rank 0: gather + bucketing + broadcast."""
    broadcast_seconds: float = 0.0
    """Learner rank 0: the broadcast alone (until every member acknowledged, on gloo)."""
    group_builds: int = 0
    """Groups built so far in this run (1 = never rebuilt)."""

    def as_metrics(self, prefix: str = "sync/") -> dict[str, float]:
        out = super().as_metrics(prefix)
        out.update({
            f"{prefix}collective": 1.0,
            f"{prefix}setup_seconds": self.setup_seconds,
            f"{prefix}send_seconds": self.send_seconds,
            f"{prefix}broadcast_seconds": self.broadcast_seconds,
            f"{prefix}group_builds": float(self.group_builds),
        })
        return out


def _node_address(actor) -> tuple[str, int]:
    """Runs inside learner rank 0 (``__ray_call__``): its node IP and a free port there."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class CollectiveSync:
    """Driver side of the collective transport (see the module docstring), a ``WeightTransport``.

    ``learners``: every learner rank (rank 0 first), ``workers``: every rollout worker actor.
    Learner rank 0 takes part in every broadcast, so a sync cannot overlap a learner step:
    ``start`` finishes the sync and returns a ``DoneSync``.
    """

    overlaps_training = False

    def __init__(self, learners: Sequence, workers: Sequence, backend: Backend, timeout_s: float):
        if not learners or not workers:
            raise ValueError("the collective transport needs a learner rank and at least one rollout worker")
        self.learners = list(learners)
        self.workers = list(workers)
        self.backend = backend
        self.timeout_s = timeout_s
        self.layout: WeightLayout | None = None
        """Static across versions: planned once per run, sent once per group."""
        self.member_timeout_s = timeout_s * 1.05 + 2.0
        """Members' own watchdogs (and the gloo group's timeout) fire a little after the driver's,
        so a stall is reported by the driver naming every member still pending, while a member
        never waits forever on a peer that is gone."""
        self.generation = 0
        self.joined = False
        """False until a group is built, and again after any failed sync (a member may be
        mid-broadcast): the next sync then rebuilds the group."""

    # -- setup ----------------------------------------------------------------------------------
    def members_joined(self, version: int) -> bool:
        """Whether every rollout worker holds the current group (a restarted one does not)."""
        if not self.joined:
            return False
        generations = self._wait(
            {w.collective_generation.remote(): f"rollout worker {i}" for i, w in enumerate(self.workers)},
            version, "asking the rollout workers for their weight group",
        )
        return all(g == self.generation for g in generations)

    def setup(self, version: int) -> float:
        """(Re)build the group: new port, all members join concurrently; the old one is left by
        each member as it joins. Returns the seconds it took."""
        start = time.perf_counter()
        self.joined = False
        if self.layout is None:
            layouts = self._wait(
                {r.collective_layout.remote(): f"learner rank {i}" for i, r in enumerate(self.learners)},
                version, "planning the weight layout on the learner ranks",
            )
            self.layout = layouts[0]
        ranks = self._wait(
            {w.collective_num_ranks.remote(): f"rollout worker {i}" for i, w in enumerate(self.workers)},
            version, "counting the receiving ranks of the rollout workers",
        )
        (host, port), = self._wait({self.learners[0].__ray_call__.remote(_node_address): "learner rank 0"},
                                    version, "rendezvous address on learner rank 0")
        self.generation += 1
        address = GroupAddress(host, port, 1 + sum(ranks), self.backend, self.generation)
        offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        limit = self.member_timeout_s
        calls = {self.learners[0].collective_join.remote(address, self.layout, limit): "learner rank 0"}
        for i, (worker, offset) in enumerate(zip(self.workers, offsets)):
            calls[worker.collective_join.remote(address, offset, self.layout, limit)] = f"rollout worker {i}"
        try:
            self._wait(calls, version, f"joining the {self.backend} weight group {host}:{port} "
                       f"(world {address.world_size})")
        except BaseException:
            self.close(timeout_s=0)  # half-joined members must not keep waiting on a dead group
            raise
        self.joined = True
        return time.perf_counter() - start

    # -- one sync -------------------------------------------------------------------------------
    def start(self, version: int) -> DoneSync:
        return DoneSync(self.broadcast(version))

    def broadcast(self, version: int) -> CollectiveSyncReport:
        """Broadcast ``version`` from learner rank 0 into every rollout worker, rebuilding the
        group first when a member lost it; ``SyncTimeout`` past ``timeout_s`` (per stage)."""
        start = time.perf_counter()
        setup_s = 0.0
        if not self.members_joined(version):
            setup_s = self.setup(version)
        calls = {r.collective_send.remote(version, self.member_timeout_s): f"learner rank {i}"
                 for i, r in enumerate(self.learners)}
        calls.update({w.collective_receive.remote(version, self.member_timeout_s): f"rollout worker {i}"
                      for i, w in enumerate(self.workers)})
        try:
            results = self._wait(calls, version, f"{self.backend} broadcast (gather on the learner "
                                 "ranks, receive + load on the rollout workers)")
        except BaseException:
            self.joined = False  # unknown state: some member may be mid-broadcast
            raise
        sent: TransferReport = results[0]
        received: list[TransferReport] = results[len(self.learners):]
        stale = [i for i, r in enumerate(received) if r.version != version]
        if stale:
            self.joined = False
            raise RuntimeError(f"rollout workers {stale} did not adopt version {version} after the broadcast")
        assert self.layout is not None
        return CollectiveSyncReport(
            version=version,
            seconds=time.perf_counter() - start,
            num_bytes=sent.num_bytes,
            num_messages=self.layout.num_messages,
            num_targets=len(self.workers),
            setup_seconds=setup_s,
            send_seconds=sent.seconds,
            broadcast_seconds=sent.transfer_seconds,
            group_builds=self.generation,
        )

    # -- helpers --------------------------------------------------------------------------------
    def _wait(self, calls: dict, version: int, stage: str) -> list:
        """Results of ``calls`` (ref -> member name) in insertion order, or ``SyncTimeout``
        naming the members still pending after ``sync.timeout_s``; a member's error re-raises
        with its own traceback as soon as that member answers (the others may be blocked on it)."""
        refs = list(calls)
        pending = list(refs)
        deadline = time.perf_counter() + self.timeout_s
        while pending:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                names = ", ".join(calls[r] for r in refs if r in pending)
                raise SyncTimeout(version, f"{stage}: no answer from {names}", self.timeout_s)
            done, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause
                    if isinstance(cause, TimeoutError):  # the member's own watchdog fired first
                        raise SyncTimeout(version, f"{stage}: {calls[ref]} reported: {cause}",
                                          self.timeout_s) from exc
                    raise
        return ray.get(refs)

    def close(self, timeout_s: float = 30.0) -> None:
        """Every member leaves the group (bounded; actors being killed anyway may not answer)."""
        refs = [self.learners[0].collective_leave.remote(), *[w.collective_leave.remote() for w in self.workers]]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        self.joined = False


def make_weight_sync(cfg: RunConfig, learners: Sequence, workers: Sequence) -> WeightTransport:
    """The configured transport: ``ObjectStoreSync`` or ``CollectiveSync`` (``sync.transport``,
    ``auto`` resolved by ``choose_transport``); refuses vLLM engines on CPU with ``collective``."""
    from correction_rl.distributed.weights import ObjectStoreSync

    res = cfg.resources
    transport, backend = choose_transport(
        cfg.sync.transport, res.gpus_per_learner_rank, res.gpus_per_rollout_worker, cfg.rollout.engine
    )
    if transport == "collective":
        assert backend is not None
        return CollectiveSync(learners, workers, backend, cfg.sync.timeout_s)
    return ObjectStoreSync(learners, workers, cfg.sync.timeout_s)


__all__ = ["CollectiveSync", "CollectiveSyncReport", "make_weight_sync"]
