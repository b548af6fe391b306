"""Methods mixed into every vLLM worker (``worker_extension_cls``) to receive new weights.

vLLM instantiates its worker class with this class as an extra base, in the worker process, so
``self`` below is a vLLM ``Worker`` (``self.model_runner``, ``self.reload_weights``,
``self.device``...). ``LLM.collective_rpc("crl_...", args=...)`` calls these methods on every
worker. Arguments travel through vLLM's msgpack RPC, which does not carry tensors (see
ENVIRONMENT.md), so only a small description crosses it:

* ``crl_load_shm``: the buckets sit in files under ``/dev/shm`` (RAM-backed); the worker maps
  them with ``torch.from_file(shared=True)`` (zero copy) and feeds views into
  ``reload_weights``. One RPC per sync, whatever the number of parameters.
* ``crl_nccl_init`` / ``crl_nccl_receive`` (GPU): the worker joins a NCCL group with the learner
  rank 0 (rank 0 = learner, workers from ``rank_offset``), receives the buckets by broadcast into
  device buffers and loads them the same way. One RPC + one broadcast per bucket per sync.

Why ``reload_weights`` and not ``model.load_weights``: on CPU vLLM repacks linear weights into
oneDNN / packed-GEMM formats after loading and frees the original tensors, so plain
``load_weights`` would write into parameters the kernels no longer read. ``reload_weights``
(vLLM's layerwise reload) restores the checkpoint-format parameters, loads, and re-runs the
post-load processing, which is correct on every platform (CUDA included).

This module imports torch only; vllm is imported inside the methods (they only ever run inside
a vLLM worker).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

# The description that crosses the RPC: plain lists so msgpack keeps them intact.
#   {"version": int,
#    "layout": [[name, bucket, offset, shape(list), dtype], ...],
#    "buckets": [[path_or_None, numel, dtype], ...]}


def _views(layout: list, buckets: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, b, offset, shape, _dtype in layout:
        numel = math.prod(shape)
        yield name, buckets[b][offset : offset + numel].view(tuple(shape))


class CorrectionRLWorkerExtension:
    """Weight receivers for ``VLLMGenerator`` (see the module docstring)."""

    def crl_load_shm(self, desc: dict[str, Any]) -> int:
        """Map the shared-memory buckets named in ``desc`` and reload the model from them.
        Returns the number of parameters loaded (the caller checks it against the layout)."""
        # Mappings are cached by path: the sender reuses its files across syncs (a new file
        # always gets a new name), so steady-state syncs re-map nothing.
        cache: dict[str, torch.Tensor] = getattr(self, "_crl_maps", {})
        buckets = []
        for path, numel, dtype in desc["buckets"]:
            mapped = cache.get(path)
            if mapped is None:
                mapped = torch.from_file(path, shared=True, size=int(numel), dtype=getattr(torch, dtype))
            buckets.append(mapped)
        self._crl_maps = {p: b for (p, _, _), b in zip(desc["buckets"], buckets)}
        return self._crl_reload(desc["layout"], buckets)

    def _crl_reload(self, layout: list, buckets: list[torch.Tensor]) -> int:
        device = self.device  # type: ignore[attr-defined]
        if device.type != "cpu":
            buckets = [b.to(device, non_blocking=True) for b in buckets]
        self.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=_views(layout, buckets), is_checkpoint_format=True
        )
        return len(layout)

    # --- GPU: NCCL broadcast from the learner's rank 0 ------------------------------------

    def crl_nccl_init(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> int:
        """Join the learner<->engine NCCL group; returns this worker's rank in it.

        The group is a vLLM ``StatelessProcessGroup`` + ``PyNcclCommunicator``: it does not touch
        the worker's own ``torch.distributed`` world (tensor parallel groups stay intact).
        """
        from vllm.distributed.weight_transfer.nccl_common import stateless_init_process_group

        pc = self.vllm_config.parallel_config  # type: ignore[attr-defined]
        rank = rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        device = torch.accelerator.current_device_index()
        self._crl_nccl = stateless_init_process_group(
            master_address, master_port, rank, world_size, device
        )
        return rank

    def crl_nccl_receive(self, desc: dict[str, Any]) -> int:
        """Receive every bucket of ``desc`` by broadcast from rank 0, then reload."""
        comm = getattr(self, "_crl_nccl", None)
        if comm is None:
            raise RuntimeError("crl_nccl_receive before crl_nccl_init: no NCCL group joined")
        buckets = []
        for _path, numel, dtype in desc["buckets"]:
            buf = torch.empty(int(numel), dtype=getattr(torch, dtype), device=self.device)  # type: ignore[attr-defined]
            comm.broadcast(buf, src=0, stream=torch.cuda.current_stream())
            buckets.append(buf)
        torch.cuda.current_stream().synchronize()
        return self._crl_reload(desc["layout"], buckets)

    def crl_nccl_close(self) -> None:
        comm = getattr(self, "_crl_nccl", None)
        if comm is not None:
            destroy = getattr(comm, "destroy", None)
            if callable(destroy):
                destroy()
            self._crl_nccl = None
