"""A process group for weight sync only: learner rank 0 broadcasts buckets to the engines.

Why a group of its own: the learner ranks already form a torch.distributed world (DeepSpeed's
default process group), and vLLM workers have theirs (tensor parallel). A weight group must join
learner rank 0 with the receiving processes without touching either, so it is built directly on
its own ``TCPStore`` (never ``torch.distributed.init_process_group``):

* ``gloo`` (CPU): ``torch.distributed.ProcessGroupGloo`` over a fresh ``TCPStore``, both with the
  caller's timeout, so every rendezvous and every broadcast is bounded.
* ``nccl`` (GPU): vLLM's ``stateless_init_process_group`` (a ``StatelessProcessGroup`` +
  ``PyNcclCommunicator``), the very communicator that ``crl_nccl_init`` in
  ``correction_rl/rollout/vllm_worker.py`` joins inside vLLM's workers, so learner rank 0, HF
  engines on GPU and vLLM workers can all be members of ONE group. vllm is imported lazily, only
  for this backend. PyNccl calls cannot be given a timeout, so they run under ``run_with_timeout``
  (the caller gets ``SyncTimeout``; the group is marked broken and must be rebuilt).

The layout (names, shapes, dtypes, bucket sizes: ``WeightLayout``) is static across versions and
crosses once, when the group is set up; each sync then moves only the buckets, one broadcast per
bucket, received into freshly allocated tensors (the engine may adopt them without a copy). On
gloo a one-element all-reduce follows the buckets, so the sender's ``send`` returns only once every
member holds every bucket (and a member that never receives turns into a ``SyncTimeout``).

No Ray here: ``correction_rl/distributed/collective.py`` orchestrates the members as Ray actors;
the tests and the benchmark use this module from plain processes too.
"""

from __future__ import annotations

import datetime
import importlib.util
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from correction_rl.weights.sync import SyncTimeout, flatten_to_buckets, run_with_timeout
from correction_rl.types import WeightUpdate

Backend = Literal["gloo", "nccl"]
Transport = Literal["object_store", "collective"]


# --- choosing the transport -----------------------------------------------------------------


def choose_transport(
    transport: str, gpus_per_learner_rank: float, gpus_per_rollout_worker: float, engine: str
) -> tuple[Transport, Backend | None]:
    """Resolve ``sync.transport`` to a transport and, for ``collective``, its backend.

    ``auto`` picks ``collective`` (NCCL) only when learner ranks and rollout workers each hold
    whole GPUs: on one CPU node the object store is shared memory and beats a gloo broadcast over
    loopback, and NCCL refuses two members of one communicator on the same device, which
    fractional (colocated) GPUs allow, and only when vLLM (whose PyNccl the group uses) is
    installed. An explicit ``collective`` uses NCCL when both roles have
    GPUs and gloo otherwise; vLLM engines need NCCL (their worker extension joins no gloo group).
    """
    if transport not in ("auto", "object_store", "collective"):
        raise ValueError(f"sync.transport={transport!r}: allowed are auto, object_store, collective")
    if transport == "auto":  # the NCCL group is vLLM's PyNccl: only with vLLM installed
        whole_gpus = gpus_per_learner_rank >= 1 and gpus_per_rollout_worker >= 1
        nccl = whole_gpus and importlib.util.find_spec("vllm") is not None
        return ("collective", "nccl") if nccl else ("object_store", None)
    if transport == "object_store":
        return "object_store", None
    backend: Backend = "nccl" if gpus_per_learner_rank > 0 and gpus_per_rollout_worker > 0 else "gloo"
    if engine == "vllm" and backend != "nccl":
        raise ValueError(
            "sync.transport=collective with rollout.engine=vllm needs GPUs for the learner ranks "
            "and the rollout workers (resources.gpus_per_learner_rank > 0 and "
            "resources.gpus_per_rollout_worker > 0): the vLLM worker extension joins NCCL groups "
            "only. On CPU use sync.transport=object_store (or auto)."
        )
    return "collective", backend


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupAddress:
    """Where and how to join one weight group (a rebuilt group gets a new port and generation)."""

    host: str
    """Learner rank 0's node IP: rank 0 hosts the group's ``TCPStore``."""
    port: int
    world_size: int
    """1 (learner rank 0) + every receiving rank of every rollout worker."""
    backend: Backend
    generation: int
    """Counts rebuilds; a member reports the generation it joined, so the driver can tell a
    restarted (never joined) member from a current one."""


@dataclass(frozen=True)
class WeightLayout:
    """Everything about an update except its bytes and version: static across versions, so it
    crosses once per group instead of once per sync."""

    layout: tuple[tuple[str, int, int, tuple[int, ...], str], ...]
    """(name, bucket, offset, shape, dtype) per parameter, as in ``WeightUpdate.layout``."""
    buckets: tuple[tuple[int, str], ...]
    """(elements, dtype name) per bucket."""

    @classmethod
    def of(cls, update: WeightUpdate) -> "WeightLayout":
        return cls(
            layout=tuple((n, int(b), int(o), tuple(int(x) for x in s), str(d)) for n, b, o, s, d in update.layout),
            buckets=tuple((int(b.numel()), str(b.dtype).removeprefix("torch.")) for b in update.buckets),
        )

    @classmethod
    def plan(cls, named_shapes, bucket_bytes: int) -> "WeightLayout":
        """The layout ``flatten_to_buckets`` would produce for ``(name, tensor)`` pairs, computed
        on meta tensors (no memory, same algorithm, so it cannot drift from the real export)."""
        meta = ((n, torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")) for n, t in named_shapes)
        return cls.of(flatten_to_buckets(meta, -1, bucket_bytes))

    @property
    def num_bytes(self) -> int:
        return sum(n * dtype_named(d).itemsize for n, d in self.buckets)

    @property
    def num_messages(self) -> int:
        """Messages per sync per member: one broadcast per bucket + one (the version / ack)."""
        return len(self.buckets) + 1

    def check(self, update: WeightUpdate) -> None:
        """Refuse an update whose layout differs from the one the members were given."""
        other = WeightLayout.of(update)
        if other != self:
            diff = next((f"{a} vs {b}" for a, b in zip(self.layout, other.layout) if a != b), None)
            raise ValueError(
                f"weight update v{update.version} does not match the weight group's layout "
                f"({len(other.layout)} tensors in {len(other.buckets)} buckets vs {len(self.layout)} "
                f"in {len(self.buckets)}; first difference: {diff or other.buckets}): the group "
                "must be rebuilt when the model changes"
            )

    def allocate(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [torch.empty(n, dtype=dtype_named(d), device=device) for n, d in self.buckets]

    def describe(self, version: int) -> dict[str, Any]:
        """The description ``VLLMGenerator.receive_broadcast`` takes (no shared-memory paths)."""
        return {
            "version": version,
            "layout": [[n, b, o, list(s), d] for n, b, o, s, d in self.layout],
            "buckets": [[None, n, d] for n, d in self.buckets],
        }


@dataclass(frozen=True)
class TransferReport:
    """What one member measured in one sync; the driver folds them into a ``SyncReport``."""

    version: int
    seconds: float
    """The member's whole call: gather + bucketing + broadcast (rank 0); waiting for the engine
    lock + receiving + loading into the engine (receivers)."""
    transfer_seconds: float
    """The broadcast alone (rank 0: until every member acknowledged, on gloo)."""
    num_bytes: int


def dtype_named(name: str) -> torch.dtype:
    """``torch.float32`` for ``"float32"``: the dtype names a weight layout carries."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight layout")
    return dtype


# --- the group ------------------------------------------------------------------------------


class WeightGroup:
    """This process's membership of one weight group (rank 0 sends, every other rank receives).

    Every blocking call takes ``timeout_s`` and raises ``SyncTimeout`` past it; after a timeout or
    an error inside a collective the group is ``broken`` (peers may be mid-broadcast) and must be
    rebuilt, never reused.
    """

    def __init__(self, address: GroupAddress, rank: int, handle: Any, store: Any, device: torch.device):
        self.address = address
        self.rank = rank
        self.handle = handle  # ProcessGroupGloo or PyNcclCommunicator
        self.store = store  # keeps the gloo TCPStore (and, on rank 0, its server) alive
        self.device = device
        self.stream: Any = None  # nccl: the CUDA stream of the broadcasts
        self.broken = False

    @property
    def backend(self) -> Backend:
        return self.address.backend

    @classmethod
    def join(
        cls, address: GroupAddress, rank: int, timeout_s: float, device: torch.device | str | None = None,
    ) -> "WeightGroup":
        """Join (rank 0: host) the group; returns when all ``world_size`` members joined, or raises
        ``SyncTimeout`` after ``timeout_s``. All members must call this concurrently."""
        if not 0 <= rank < address.world_size:
            raise ValueError(f"rank {rank} outside a weight group of {address.world_size}")
        stage = (f"joining the {address.backend} weight group {address.host}:{address.port} "
                 f"(generation {address.generation}) as rank {rank} of {address.world_size}")
        if address.backend == "gloo":
            return run_with_timeout(lambda: cls._join_gloo(address, rank, timeout_s), timeout_s, -1, stage)
        if address.backend == "nccl":
            return run_with_timeout(lambda: cls._join_nccl(address, rank, device), timeout_s, -1, stage)
        raise ValueError(f"unknown weight group backend {address.backend!r}")

    @classmethod
    def _join_gloo(cls, address: GroupAddress, rank: int, timeout_s: float) -> "WeightGroup":
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=max(timeout_s, 1.0))
        store = dist.TCPStore(
            address.host, address.port, address.world_size, is_master=rank == 0, timeout=timeout,
            wait_for_workers=True,
        )
        group = dist.ProcessGroupGloo(store, rank, address.world_size, timeout)
        return cls(address, rank, group, store, torch.device("cpu"))

    @classmethod
    def _join_nccl(cls, address: GroupAddress, rank: int, device) -> "WeightGroup":
        if not torch.cuda.is_available():
            raise RuntimeError("the nccl weight group needs CUDA; use the gloo backend (or the object store) on CPU")
        try:
            from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group
        except ImportError as exc:
            raise ImportError(
                "the nccl weight group uses vLLM's PyNccl communicator (the one vLLM's workers "
                "join); install vllm in every process of the group, or use sync.transport=object_store"
            ) from exc
        device = torch.device(device) if device is not None else torch.device("cuda")
        if device.index is None:  # PyNccl compares tensor devices with its own, index included
            device = torch.device("cuda", torch.cuda.current_device())
        comm = stateless_init_process_group(address.host, address.port, rank, address.world_size, device)
        group = cls(address, rank, comm, None, device)
        # Broadcasts run on a stream of their own: a broadcast stuck on a dead peer (which no
        # timeout can cancel) must not block the training or generation kernels queued behind it.
        group.stream = torch.cuda.Stream(device=device)
        return group

    # -- data ---------------------------------------------------------------------------------
    def send(self, update: WeightUpdate, timeout_s: float) -> float:
        """Rank 0: broadcast every bucket of ``update``; returns seconds. On gloo, returns once
        every member acknowledged all buckets."""
        if self.rank != 0:
            raise RuntimeError(f"only rank 0 sends weights (this is rank {self.rank})")
        start = time.perf_counter()
        stage = f"{self.backend} broadcast of {len(update.buckets)} buckets to {self.address.world_size - 1} ranks"
        self._guarded(lambda: self._broadcast(update.buckets, sending=True), timeout_s, update.version, stage)
        return time.perf_counter() - start

    def receive(self, layout: WeightLayout, version: int, timeout_s: float) -> WeightUpdate:
        """Rank > 0: receive one update into freshly allocated buckets laid out as ``layout``,
        on this member's device."""
        if self.rank == 0:
            raise RuntimeError("rank 0 sends weights; it does not receive them")
        buckets = layout.allocate(self.device)
        stage = f"{self.backend} receive of {len(buckets)} buckets as rank {self.rank}"
        self._guarded(lambda: self._broadcast(buckets, sending=False), timeout_s, version, stage)
        return WeightUpdate(version=version, layout=list(layout.layout), buckets=buckets)

    def _guarded(self, fn, timeout_s: float, version: int, stage: str) -> None:
        if self.broken:
            raise RuntimeError(
                f"weight group generation {self.address.generation} is broken by an earlier "
                "timeout or error; it must be rebuilt"
            )
        try:
            run_with_timeout(fn, timeout_s, version, stage)
        except BaseException:
            self.broken = True
            raise

    def _broadcast(self, buckets: list[torch.Tensor], sending: bool) -> None:
        if self.backend == "gloo":
            import torch.distributed as dist

            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            works = []
            for bucket in buckets:
                # bytes, whatever the dtype (gloo lacks some, e.g. on older torch bf16)
                flat = bucket.detach()
                if flat.device.type != "cpu":  # a GPU learner feeding CPU engines over gloo
                    flat = flat.cpu()
                works.append(self.handle.broadcast([flat.view(torch.uint8)], opts))
            for work in works:
                work.wait()
            ack = torch.ones(1)
            self.handle.allreduce([ack]).wait()  # every member holds every bucket
            if int(ack.item()) != self.address.world_size:
                raise RuntimeError(f"weight group acknowledgement {ack.item()} != {self.address.world_size}")
            return
        if sending:
            buckets = [b if b.device == self.device else b.to(self.device, non_blocking=True) for b in buckets]
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the buckets are written
        for bucket in buckets:
            bucket.record_stream(stream)  # not reused by the allocator while the broadcast runs
            self.handle.broadcast(bucket, src=0, stream=stream)
        stream.synchronize()

    def close(self) -> None:
        """Leave the group (idempotent; peers of a closed group see their next call fail or
        time out, which is why the driver rebuilds the whole group at once)."""
        handle, self.handle, self.store = self.handle, None, None
        self.broken = True
        if handle is None:
            return
        for name in ("shutdown", "destroy"):  # gloo: shutdown; PyNccl (some versions): destroy
            fn = getattr(handle, name, None)
            if callable(fn):
                try:
                    fn()
                except Exception:  # noqa: BLE001 - best effort: a broken group may refuse
                    pass
                break


__all__ = [
    "Backend",
    "GroupAddress",
    "SyncTimeout",
    "TransferReport",
    "WeightGroup",
    "WeightLayout",
    "choose_transport",
    "dtype_named",
]
