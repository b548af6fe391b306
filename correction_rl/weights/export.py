"""The learner side of every weight sync: exporting named tensors into buckets at memory speed.

Why this module: ``flatten_to_buckets`` allocated fresh buckets on every sync. On a CPU the
first write to freshly allocated memory takes a page fault per 4 KiB page, so packing the 103 MB
``small`` model cost 59 ms, of which 42 ms were page faults and 12.5 ms the copy itself (2-core
machine, 1 thread; docs/benchmarks.md, "Weight sync"). The export sits on the learner's critical
path, so ``WeightExporter`` removes both costs where it can:

* **views** (``borrow=True``): when the tensors of a bucket already lie back to back in one
  storage, in the layout's order (DeepSpeed ZeRO-1/2 keeps the module's parameters as views of
  one flat buffer; the learner packs them so for the torch backend and ZeRO-0:
  ``pack_parameters``), the bucket *is* that range of the storage: no copy at all. Such an update aliases the live
  weights, so it is valid only until they next change: the caller must be done reading it
  before the learner's next optimizer update. Every transport here is: a broadcast completes
  inside ``WeightGroup.send`` and ``InProcessSync`` loads inside ``start``, before the next step;
  the object store's ``ray.put`` runs beside the next step, whose optimizer update waits for it
  (``distributed/actors/learner.py``).
* **reused buffers** (everything else, and every ``borrow=False`` export): the buckets are
  copied (one ``torch.cat(out=)`` per bucket, torch's own multi-threaded copy) into buffers
  allocated once and reused across versions. Reuse must never overwrite bytes a receiver still
  reads, so buffers rotate through slots and a slot is rewritten only when nothing outside the
  exporter references its storage any more (the storage's use count): a consumer holding
  version k keeps its bytes when version k+1 is exported (k+1 goes to another slot, or to a
  fresh one when every slot is still held). With two slots this is double buffering.

On CUDA, a CPU target (``device="cpu"``: the object store) gets pinned buffers, so the
device-to-host copies run at full PCIe speed and asynchronously until one synchronisation.

The bucket plan (which tensor lands in which bucket at which offset) is one function,
``plan_buckets``, used by ``flatten_to_buckets`` and by the collective group's static layout too,
so a view, a reused buffer and a fresh bucket always have the same layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from correction_rl.types import WeightUpdate

Entry = tuple[str, int, int, tuple[int, ...], str]
"""(name, bucket index, offset in elements, shape, dtype name): one row of ``WeightUpdate.layout``."""


@dataclass(frozen=True)
class BucketPlan:
    """Where each tensor goes: static for a model, so an exporter plans once."""

    layout: tuple[Entry, ...]
    buckets: tuple[tuple[int, torch.dtype], ...]
    """(elements, dtype) per bucket."""
    members: tuple[tuple[int, ...], ...]
    """Indices (into ``layout``) of the tensors of each bucket, in offset order."""
    key: tuple
    """(name, shape, dtype) per tensor: what the plan was made for."""

    @property
    def num_bytes(self) -> int:
        return sum(n * d.itemsize for n, d in self.buckets)


def plan_key(named: Sequence[tuple[str, torch.Tensor]]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in named)


def plan_buckets(key: Sequence[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int) -> BucketPlan:
    """Pack tensors (given as ``(name, shape, dtype)``) into flat 1-D buckets of at most
    ``bucket_bytes`` each, one dtype per bucket, in input order; a tensor bigger than
    ``bucket_bytes`` gets a bucket of its own. Duplicate names are refused."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    sizes: list[int] = []  # bytes per bucket
    numels: list[int] = []  # elements per bucket
    dtypes: list[torch.dtype] = []
    members: list[list[int]] = []
    layout: list[Entry] = []
    open_bucket: dict[torch.dtype, int] = {}  # dtype -> index of the bucket still filling
    seen: set[str] = set()
    for i, (name, shape, dtype) in enumerate(key):
        if name in seen:
            raise ValueError(f"duplicate parameter name {name!r} in weight export")
        seen.add(name)
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        idx = open_bucket.get(dtype)
        if idx is None or (sizes[idx] + nbytes > bucket_bytes and sizes[idx] > 0):
            idx = len(sizes)
            sizes.append(0)
            numels.append(0)
            dtypes.append(dtype)
            members.append([])
            open_bucket[dtype] = idx
        layout.append((name, idx, numels[idx], tuple(shape), str(dtype).removeprefix("torch.")))
        members[idx].append(i)
        sizes[idx] += nbytes
        numels[idx] += numel
    if not sizes:
        raise ValueError("weight export got no tensors")
    return BucketPlan(tuple(layout), tuple(zip(numels, dtypes)), tuple(tuple(m) for m in members), tuple(key))


def fill_bucket(out: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy ``tensors`` back to back into the flat ``out``: one ``torch.cat`` when they share its
    device (one pass over the bytes, parallel over torch's threads), else one asynchronous
    ``copy_`` each (device to pinned host memory); the caller synchronises."""
    with torch.no_grad():
        if all(t.device == out.device for t in tensors):
            torch.cat([t.reshape(-1) for t in tensors], out=out)
            return
        offset = 0
        for t in tensors:
            n = t.numel()
            out[offset : offset + n].view(t.shape).copy_(t, non_blocking=True)
            offset += n


def contiguous_view(tensors: Sequence[torch.Tensor], numel: int, device: torch.device | None) -> torch.Tensor | None:
    """The flat range of one storage that holds ``tensors`` back to back, in order, or None.

    Checked on every export (cheap: a few integers per tensor), since the learner's storage can
    change under it (a checkpoint load, DeepSpeed re-pointing its parameters)."""
    first = tensors[0]
    if device is not None and first.device != device:
        return None
    storage = first.untyped_storage()
    base, size = first.data_ptr(), first.element_size()
    expected = 0
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.untyped_storage().data_ptr() != storage.data_ptr() or t.data_ptr() != base + expected * size):
            return None
        expected += t.numel()
    if first.storage_offset() * size + numel * size > storage.nbytes():
        return None
    return first.detach().as_strided((numel,), (1,), first.storage_offset())


def _use_counter() -> Callable[[torch.UntypedStorage], int] | None:
    """How many references a storage has (tensors, views, numpy arrays of them). A private torch
    function; without it the exporter never reuses a buffer (correct, as slow as before)."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    return None if fn is None else (lambda storage: int(fn(storage._cdata)))


_USE_COUNT = _use_counter()


class _Slot:
    """One set of bucket buffers and the reference count of each storage when nobody else holds it."""

    def __init__(self, plan: BucketPlan, device: torch.device, pin: bool):
        self.buffers = [torch.empty(n, dtype=d, device=device, pin_memory=pin) for n, d in plan.buckets]
        self.storages = [b.untyped_storage() for b in self.buffers]
        self.idle = [_USE_COUNT(s) for s in self.storages] if _USE_COUNT else None

    def free(self) -> bool:
        """True when no update, view or array handed out from this slot is alive."""
        return self.idle is not None and all(_USE_COUNT(s) == c for s, c in zip(self.storages, self.idle))


class WeightExporter:
    """Exports named tensors as a ``WeightUpdate``, planning once and reusing its buffers.

    ``bucket_bytes``: the bucket size (``sync.bucket_mb``). ``device``: where the buckets live
    (None: where the tensors are). ``slots``: how many buffer sets rotate (2: double buffering);
    when every slot is still held by a consumer the exporter lets go of the oldest one (its holder
    keeps it alive) and allocates a fresh one, so bytes in use are never overwritten.
    """

    def __init__(self, bucket_bytes: int, device: torch.device | str | None = None, slots: int = 2):
        if slots < 1:
            raise ValueError(f"WeightExporter needs at least one slot, got {slots}")
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # compares with tensors' devices
        self.max_slots = slots
        self.plan: BucketPlan | None = None
        self._slots: list[_Slot] = []
        self.last_stats: dict[str, float] = {}
        """Of the last export: buckets handed out as views, copied, and slots allocated so far."""
        self._allocated = 0

    def export(self, named: Iterable[tuple[str, torch.Tensor]], version: int, borrow: bool = False) -> WeightUpdate:
        """The tensors of ``named`` as version ``version``. ``borrow``: buckets whose tensors lie
        back to back in one storage are views of it (valid until the tensors change; see the
        module docstring); the others, and all of them without ``borrow``, are copies in reused
        buffers."""
        items = [(name, t.detach()) for name, t in named]
        key = plan_key(items)
        if self.plan is None or self.plan.key != key:  # first export, or the model changed
            self.plan = plan_buckets(key, self.bucket_bytes)
            self._slots = []
        plan = self.plan
        groups = [[items[i][1] for i in members] for members in plan.members]
        target = self.device if self.device is not None else items[0][1].device
        buckets: list[torch.Tensor | None] = [None] * len(groups)
        if borrow:
            for b, (group, (numel, _)) in enumerate(zip(groups, plan.buckets)):
                buckets[b] = contiguous_view(group, numel, target)
        views = sum(b is not None for b in buckets)
        if views < len(buckets):
            slot = self._free_slot(target, any(t.device.type == "cuda" for g in groups for t in g))
            async_copy = False
            for b, group in enumerate(groups):
                if buckets[b] is None:
                    fill_bucket(slot.buffers[b], group)
                    async_copy |= any(t.device != target for t in group)
                    buckets[b] = slot.buffers[b][:]  # a view: it counts as a use of the slot
            if async_copy:
                torch.cuda.synchronize()
        self.last_stats = {"view_buckets": float(views), "copied_buckets": float(len(buckets) - views),
                           "allocated_slots": float(self._allocated)}
        return WeightUpdate(version=version, layout=list(plan.layout), buckets=buckets)

    def _free_slot(self, device: torch.device, from_cuda: bool) -> _Slot:
        assert self.plan is not None
        for i, slot in enumerate(self._slots):
            if slot.free():
                self._slots.append(self._slots.pop(i))  # most recently used last
                return slot
        if len(self._slots) >= self.max_slots:
            self._slots.pop(0)  # every slot is held: its holders keep it alive, we let it go
        pin = device.type == "cpu" and from_cuda and torch.cuda.is_available()
        slot = _Slot(self.plan, device, pin)
        self._allocated += 1
        self._slots.append(slot)
        return slot

    def release(self) -> None:
        """Drop the buffers (a consumer still holding an update keeps its own)."""
        self._slots = []
        self.plan = None


def pack_parameters(module: torch.nn.Module) -> int:
    """Lay ``module``'s parameters out back to back in one flat buffer per (device, dtype), in
    ``named_parameters`` order, so that a borrowing export of them is free (``WeightExporter``).

    Each parameter keeps its identity (optimizers, hooks and tied weights still see the same
    ``Parameter``); only its storage moves, once. Parameters already laid out so (DeepSpeed
    ZeRO-1/2 keeps its own flat buffers, which its optimizer writes) are left alone. Returns the
    number of parameters moved."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
    for _, param in module.named_parameters():
        groups.setdefault((param.device, param.dtype), []).append(param)
    moved = 0
    with torch.no_grad():
        for (device, dtype), params in groups.items():
            numel = sum(p.numel() for p in params)
            if contiguous_view([p.data for p in params], numel, device) is not None:
                continue
            flat = torch.empty(numel, dtype=dtype, device=device)
            offset = 0
            for p in params:
                view = flat[offset : offset + p.numel()].view(p.shape)
                view.copy_(p.data)
                p.data = view
                offset += p.numel()
                moved += 1
    return moved
