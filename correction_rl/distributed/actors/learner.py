"""The learner rank actor: one data-parallel learner rank, a DeepSpeed engine in its own
process; rank 0 also exports the weights (object store) or broadcasts them (weight group).

The object-store sync comes in two halves, so that only the cheap one sits between two learner
steps: ``export`` (ordered before the next step) hands out the weights as buckets, views of the
parameters where they lie back to back (no copy), and ``publish`` (in the actor's ``publish``
concurrency group, a thread of its own) puts them into the object store while the next step's
forward and backward run. That step's optimizer update waits until the put is done
(``PublishHandoff``): it is the only thing that changes the parameters the views show. Before the
split the put sat on the learner's path: the ``base`` model's export took 8-10 ms there on 2
cores, now ~1 ms (docs/benchmarks.md, "Issue 19, third round").
"""

from __future__ import annotations

import functools
import os
import threading
import time

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.actors.clock import BusyClock
from correction_rl.distributed.batches import ShardRef
from correction_rl.distributed.collective_member import SendingMember
from correction_rl.distributed.weights import PublishedUpdate
from correction_rl.types import CorrectionPair, StepStats, WeightUpdate


def _timed_export(method):
    """The export runs on the learner's path, between two steps: its seconds are reported with
    the next step (``train/phase/export_s``) and count as the rank's busy time."""

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.last_end = time.perf_counter()
            self.export_s += self.last_end - start
            self.clock.add(self.last_end - start)

    return timed


class LearnerRank:
    """One data-parallel learner rank: a DeepSpeed engine in its own process.

    The driver picks the rendezvous (rank 0's address and a free port) and passes it to every
    rank, so torch.distributed (gloo on CPU, NCCL on GPU) connects the ranks directly.
    """

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, master_addr: str, master_port: int):
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",  # Ray gives each rank its own device set, seen as device 0
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        from correction_rl.learner.backends import load_policy, resolve_dtype
        from correction_rl.learner.learner import Learner
        from correction_rl.models import load_tokenizer

        self.cfg = cfg
        self.rank = rank
        tokenizer = load_tokenizer(cfg.model.path)
        self.learner = Learner(  # every rank loads (ZeRO-3 + zero_init: its partition only)
            load_policy(cfg.model.path, cfg.learner, resolve_dtype(cfg.model, cfg.learner)),
            pad_id=tokenizer.pad_token_id,
            learner_cfg=cfg.learner,
            objective_cfg=cfg.objective,
            model_cfg=cfg.model,
            total_steps=cfg.total_steps,
            lora_merge=cfg.sync.lora_merge,
        )
        self.clock = BusyClock()
        self.last_end: float | None = None
        """When this rank's last step or export ended (its idle gap before the next step)."""
        self.export_s = 0.0
        """Seconds exporting since the last step (reported with the next one)."""
        self.member = SendingMember()
        """Rank 0's membership of the collective weight group (``sync.transport: collective``)."""
        self._exporters: dict = {}
        """Rank 0's ``WeightExporter`` per bucket device (``gathered_update``)."""
        self.handoff = PublishHandoff()
        """Rank 0's exported update on its way from ``export`` to ``publish``."""
        self.publish_s = 0.0
        """Seconds publishing (beside the steps) since the last step (reported with the next one)."""

    def pid(self) -> int:
        return os.getpid()

    def train_step(self, pairs: list[CorrectionPair] | ShardRef) -> StepStats:
        """One step on this rank's shard: the pairs, or a reference to them that this rank
        fetches itself (the driver's prefetch, ``distributed/batches.py``). Adds to the step's
        phases (``train/phase/*_s``, docs/metrics.md) what only the rank sees: how long it
        waited idle for this call since its last work, the batch's transfer, the export before
        it, the put beside it and how long its optimizer update waited for that put."""
        start = time.perf_counter()
        waited = 0.0 if self.last_end is None else start - self.last_end
        if isinstance(pairs, ShardRef):
            pairs = ray.get(pairs.ref, timeout=self.cfg.resources.call_timeout_s)
        fetched = time.perf_counter()
        publish_wait = [0.0]

        def before_update() -> None:  # the export's views must be put before the weights change
            publish_wait[0] = self.handoff.wait_until_published(self.cfg.sync.timeout_s)

        stats = self.learner.train_step(pairs, before_update=before_update)
        self.last_end = time.perf_counter()
        self.clock.add(self.last_end - start)
        stats.extra.update({"phase/wait_for_batch_s": waited, "phase/batch_transfer_s": fetched - start,
                            "phase/export_s": self.export_s, "phase/publish_s": self.publish_s,
                            "phase/publish_wait_s": publish_wait[0], "phase/rank_step_s": self.last_end - start})
        self.export_s = self.publish_s = 0.0
        return stats

    @_timed_export
    def export(self) -> int | None:
        """Gather the full weights (a collective under ZeRO-3: every rank calls it); rank 0 hands
        them to ``publish`` as buckets: views of its flat parameters where it can, else copies in
        reused host buffers (pinned on a GPU). Returns the version (None on the other ranks)."""
        update = self.gathered_update("cpu")
        if update is None:
            return None
        self.handoff.stage(update, self.cfg.sync.timeout_s)
        return update.version

    def publish(self, version: int, timeout_s: float) -> PublishedUpdate:
        """Rank 0, in the ``publish`` concurrency group (beside the next step): put the exported
        ``version`` (or a newer one, ``PublishHandoff.take``) into the object store once; returns
        the reference with the update's version and size.
        Waits (at most ``timeout_s``) for ``export``: both are issued together and this one may
        start first."""
        from correction_rl.distributed.weights import to_transport

        update = self.handoff.take(version, timeout_s)
        start = time.perf_counter()
        try:
            ref = ray.put(to_transport(update))  # copies: the borrowed buckets are free again
            return PublishedUpdate(ref=ref, version=update.version,
                                   num_bytes=update.num_bytes, num_buckets=len(update.buckets))
        finally:
            del update
            self.handoff.done()  # the optimizer update may go on (also after a failed put)
            self.publish_s += time.perf_counter() - start

    def gathered_update(self, device: str | None = None) -> WeightUpdate | None:
        """The full weights as buckets on rank 0 (None on the others). Every rank must call it:
        under ZeRO-3 each parameter is gathered collectively. The buckets borrow the learner's
        flat parameters where they can (``weights/export.py``), valid until the next optimizer
        update: the broadcast finishes before this actor runs the next step, and that step's
        optimizer update waits for ``publish``'s put (``PublishHandoff``)."""
        from correction_rl.weights.export import WeightExporter

        named = self.rank0_weights()
        if named is None:
            return None
        if device not in self._exporters:  # one per target: each plans once, keeps its buffers
            self._exporters[device] = WeightExporter(self.cfg.sync.bucket_mb * 2**20, device)
        return self._exporters[device].export(named, self.learner.version, borrow=True)

    def rank0_weights(self):
        """``named_weights()`` on rank 0, None elsewhere. Every rank must call it: under ZeRO-3
        each parameter is gathered collectively, so the other ranks walk the iterator too."""
        named = self.learner.named_weights()
        if self.rank == 0:
            return named
        for _ in named:  # take part in the gathers
            pass
        return None

    def version(self) -> int:
        return self.learner.version

    def save_state(self, path: str) -> None:
        """Checkpoint (every rank: DeepSpeed writes each rank's ZeRO shard)."""
        self.learner.save_state(path, rank=self.rank)

    def load_state(self, path: str) -> int:
        self.learner.load_state(path, rank=self.rank)
        return self.learner.version

    def save_pretrained(self, path: str) -> None:
        """Every rank must call it: under ZeRO-3 the weights are gathered collectively; rank 0
        writes."""
        if self.rank == 0:
            self.learner.save_pretrained(path)
        else:
            self.rank0_weights()

    def metrics(self) -> dict[str, float]:
        return {f"train/rank{self.rank}/idle_fraction": self.clock.idle_fraction()}

    # -- collective weight transport (distributed/collective.py; state in ``self.member``) ------
    # Every learner rank still calls ``collective_layout`` / ``collective_send``: under ZeRO-3
    # gathering the weights is a collective of the learner's own world.

    def collective_layout(self):
        """The static ``WeightLayout`` of this model's updates (rank 0; other ranks take part in
        the gathers and return None). Planned on meta tensors: no second copy of the weights."""
        from correction_rl.weights.group import WeightLayout

        named = self.rank0_weights()
        return None if named is None else WeightLayout.plan(named, self.cfg.sync.bucket_mb * 2**20)

    def collective_join(self, address, layout, timeout_s: float) -> int:
        """Rank 0 only: host and join the weight group as its rank 0 (``SendingMember.join``)."""
        if self.rank != 0:
            raise RuntimeError(f"learner rank {self.rank} is not a weight group member; rank 0 is")
        return self.member.join(address, layout, timeout_s)

    def collective_send(self, version: int, timeout_s: float):
        """Gather (every rank), bucket and broadcast (rank 0) the current weights as ``version``.
        Rank 0 gathers before any check can fail, so the other ranks never wait in a gather
        rank 0 skipped. Returns rank 0's ``TransferReport`` (None on other ranks)."""
        start = time.perf_counter()
        update = self.gathered_update()
        if update is None:
            return None
        return self.member.send(update, version, timeout_s, start)

    def collective_leave(self) -> None:
        self.member.leave()


class PublishHandoff:
    """The exported update between the learner actor's two threads: ``export`` stages it,
    ``publish`` takes it and puts it, and the next optimizer update waits until it is done,
    because the buckets may be views of the live parameters. One at a time: the next export
    comes after that optimizer update."""

    def __init__(self) -> None:
        self._update: WeightUpdate | None = None
        self._changed = threading.Condition()

    def stage(self, update: WeightUpdate, timeout_s: float) -> None:
        """Stage ``update`` once the previous one is published (an export after a skipped step
        comes with no optimizer update between: it waits here instead)."""
        self.wait_until_published(timeout_s)
        with self._changed:
            self._update = update
            self._changed.notify_all()

    def take(self, version: int, timeout_s: float) -> WeightUpdate:
        """The staged update of ``version`` or newer, once exported (an older one still staged is
        another publish's to finish first); it stays staged until ``done``. Newer: a sync the
        driver starts while a learner step is in flight (a recovery sync, ``WeightSyncer.sync``)
        exports after that step, so it publishes the step's weights, the newest there are; asking
        for exactly the driver's version made such syncs fail (the fault drills' race,
        docs/benchmarks.md)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._update is not None and self._update.version >= version,
                                          timeout_s):
                raise TimeoutError(f"learner rank 0 exported no weights of version {version} "
                                   f"within {timeout_s:.0f} s (sync.timeout_s)")
            return self._update

    def done(self) -> None:
        with self._changed:
            self._update = None
            self._changed.notify_all()

    def wait_until_published(self, timeout_s: float) -> float:
        """Block until no exported update is left to put; returns the seconds waited."""
        start = time.perf_counter()
        with self._changed:
            if not self._changed.wait_for(lambda: self._update is None, timeout_s):
                raise TimeoutError(f"the weights of version {self._update.version} exported for the object "
                                   f"store were not published within {timeout_s:.0f} s (sync.timeout_s); "
                                   "the learner cannot update them before they are")
        return time.perf_counter() - start
