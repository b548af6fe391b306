"""One process's part in the collective weight transport (``sync.transport: collective``).

The rollout worker and learner rank 0 are members of a weight group (``weights/group.py``) whose
rank 0 is learner rank 0; ``distributed/collective.py`` orchestrates them from the driver. The
actors keep only thin remote methods and delegate here, so the membership state (which group,
which layout, which generation) lives in one object per actor, created empty in the actor's
constructor: an actor Ray restarted reports "not joined" (``generation`` None) and the driver
rebuilds the group.

A rollout worker whose engine receives by itself (vLLM on GPU: ``ReceivesBroadcast``) adds its
engine's workers as members; otherwise (HF) the actor process joins and loads what it received.
"""

from __future__ import annotations

import time
from typing import Any

from correction_rl.rollout.base import ReceivesBroadcast, TorchPolicy
from correction_rl.types import WeightUpdate
from correction_rl.weights.group import GroupAddress, TransferReport, WeightGroup, WeightLayout
from correction_rl.weights.sync import run_with_timeout


class ReceivingMember:
    """A rollout worker's membership. Callers hold the worker's engine lock around ``join``,
    ``receive`` and ``leave`` (vLLM's ``LLM`` must not serve an RPC while it generates)."""

    def __init__(self, generator: Any, worker_id: int) -> None:
        self.generator = generator
        self.worker_id = worker_id
        self.engine_receives = isinstance(generator, ReceivesBroadcast)
        self.group: WeightGroup | None = None
        """The actor's own membership (HF); None when the engine's workers are the members."""
        self.layout: WeightLayout | None = None
        self.generation: int | None = None
        """The group generation joined (None: none, e.g. after Ray restarted the actor)."""

    def num_ranks(self) -> int:
        """Members this worker adds to the group: its vLLM engine's workers, or itself (HF)."""
        return int(self.generator.num_workers) if self.engine_receives else 1

    def join(self, address: GroupAddress, rank_offset: int, layout: WeightLayout, timeout_s: float) -> int:
        """Leave any previous group, then join ``address`` as rank ``rank_offset`` (vLLM: its
        workers from that rank on). Blocks until every member joined (bounded: ``SyncTimeout``)."""
        self.leave()
        if self.engine_receives:
            if address.backend != "nccl":
                raise ValueError(
                    "a vLLM engine joins NCCL weight groups only (its worker extension has no "
                    "gloo receiver); use sync.transport=object_store on CPU"
                )
            self.generator.join_broadcast(address.host, address.port, rank_offset, address.world_size, timeout_s)
        else:
            device = "cpu"
            if address.backend == "nccl" and isinstance(self.generator, TorchPolicy):
                device = self.generator.device
            self.group = WeightGroup.join(address, rank_offset, timeout_s, device=device)
        self.layout = layout
        self.generation = address.generation
        return address.generation

    def check_joined(self) -> None:
        if self.generation is None or self.layout is None:
            raise RuntimeError(f"rollout worker {self.worker_id} is in no weight group (restarted?)")

    def receive(self, version: int, timeout_s: float) -> tuple[WeightUpdate | None, float]:
        """Receive ``version`` from rank 0. Returns the update to load (None when the engine
        loaded it itself) and the seconds the transfer took."""
        self.check_joined()
        start = time.perf_counter()
        if self.engine_receives:
            run_with_timeout(lambda: self.generator.receive_broadcast(self.layout.describe(version)),
                             timeout_s, version, "vLLM workers receive + reload")
            return None, time.perf_counter() - start
        assert self.group is not None
        update = self.group.receive(self.layout, version, timeout_s)
        return update, time.perf_counter() - start

    def leave(self) -> None:
        joined, group = self.generation is not None, self.group
        self.group, self.layout, self.generation = None, None, None
        if self.engine_receives and joined:
            self.generator.leave_broadcast()
        elif group is not None:
            group.close()


class SendingMember:
    """Learner rank 0's membership: it hosts the group as rank 0 and broadcasts."""

    def __init__(self) -> None:
        self.group: WeightGroup | None = None
        self.layout: WeightLayout | None = None

    def join(self, address: GroupAddress, layout: WeightLayout, timeout_s: float) -> int:
        """Leave any previous group, then host and join ``address`` as its rank 0 (blocks until
        every member joined; bounded: ``SyncTimeout``)."""
        import torch

        self.leave()
        device = torch.device("cuda", torch.cuda.current_device()) if address.backend == "nccl" else None
        self.group = WeightGroup.join(address, 0, timeout_s, device=device)
        self.layout = layout
        return address.generation

    def send(self, update: WeightUpdate, version: int, timeout_s: float, started: float) -> TransferReport:
        """Broadcast ``update`` (already gathered and bucketed since ``started``) as ``version``."""
        if self.group is None or self.layout is None:
            raise RuntimeError("learner rank 0 is in no weight group; the driver must set it up first")
        if update.version != version:
            raise ValueError(f"the driver syncs version {version}, learner rank 0 holds {update.version}")
        self.layout.check(update)
        transfer = self.group.send(update, max(1e-3, timeout_s - (time.perf_counter() - started)))
        return TransferReport(version=version, seconds=time.perf_counter() - started,
                              transfer_seconds=transfer, num_bytes=update.num_bytes)

    def leave(self) -> None:
        group, self.group, self.layout = self.group, None, None
        if group is not None:
            group.close()
