"""LoRA in the vLLM engine: every adapter sync becomes a versioned ``LoRARequest``.

Why versioned adapters and not in-place reloads: vLLM serves LoRA through its punica kernels
(the CPU build has ``PunicaWrapperCPU``), keyed by an integer adapter id. Loading version v as a
NEW adapter (id v) while v-1, ... stay loaded means a request that started under an older version
finishes under it; ``max_staleness + 1`` versions are kept (``lora_keep``: a pair is sampled at
most that stale, docs/buffer.md) and older ones are unloaded, so engine memory stays bounded.
Version 0 (the start) is the base model itself: no adapter, no request.

The adapter travels like any weight update (bucketed, through every transport); on arrival its
tensors are written unchanged, under their peft file names (``weights/adapter.py``), as an
adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) in shared memory
(``/dev/shm``), which is what ``LoRARequest`` reads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from correction_rl.weights.adapter import is_lora_name, peft_config
from correction_rl.weights.sync import unflatten
from correction_rl.types import WeightUpdate

if TYPE_CHECKING:
    from correction_rl.config.sections import LoRAConfig

_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM 0.32 accepts (``vllm.config.lora.MaxLoRARanks``)."""


def engine_args(cfg: "LoRAConfig", keep: int) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments that enable LoRA for ``keep`` concurrently loaded versions.
    ``max_lora_rank`` is the smallest vLLM bucket holding ``learner.lora.rank``."""
    fitting = [r for r in _VLLM_RANKS if r >= cfg.rank]
    if not fitting:
        from correction_rl.config.loading import ConfigError

        raise ConfigError(f"learner.lora.rank: {cfg.rank} is above vLLM's largest LoRA rank {_VLLM_RANKS[-1]}; "
                          "lower it, or set sync.lora_merge: true to ship merged full weights")
    return {"enable_lora": True, "max_lora_rank": fitting[0], "max_loras": max(1, keep),
            "max_cpu_loras": max(1, keep)}


def check_supported() -> None:
    """Refuse at start, naming the setting and the alternative, when this vLLM build cannot
    serve LoRA: a silent full sync would hide that the adapter never reaches the engine."""
    from correction_rl.config.loading import ConfigError

    try:
        from vllm.lora.request import LoRARequest  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise ConfigError(f"learner.lora.enabled with rollout.engine: vllm needs vLLM's LoRA support, which "
                          f"this build lacks ({exc}); set sync.lora_merge: true (merged full weights) or "
                          "rollout.engine: hf") from None
    try:
        kernels = current_platform.get_punica_wrapper()
    except (AttributeError, NotImplementedError):
        kernels = None
    if not kernels:
        raise ConfigError(f"learner.lora.enabled with rollout.engine: vllm: the {current_platform.device_name} "
                          "build of vLLM has no LoRA kernels; set sync.lora_merge: true (merged full weights) "
                          "or rollout.engine: hf")


def setup(cfg: "LoRAConfig | None", keep: int, directory: str | None) -> tuple["VersionedAdapters | None", dict]:
    """``(adapters, LLM kwargs)`` for an engine: nothing without LoRA; with it, the support
    check first (before the ~40 s engine start), then the versioned store and ``enable_lora``."""
    if cfg is None:
        return None, {}
    check_supported()
    args = engine_args(cfg, keep)
    return VersionedAdapters(cfg, keep, directory), args


def apply(adapters: "VersionedAdapters | None", llm: Any, update: WeightUpdate) -> dict[str, float]:
    """Load an adapter-only update as a new version; returns where the time went."""
    if adapters is None:
        raise ValueError(f"weight update v{update.version} holds only LoRA adapter tensors, but this vLLM "
                         "engine was started without LoRA: build it with the run's learner.lora "
                         "(run/components.py does), or set sync.lora_merge: true to ship merged full weights")
    t0 = time.perf_counter()
    adapters.load(llm, update)
    return {"adapter_load_s": time.perf_counter() - t0}


def refuse_broadcast(desc: dict[str, Any]) -> None:
    """The NCCL broadcast path reloads base weights inside vLLM's workers; an adapter cannot go
    that way (vLLM loads adapters from a directory), so say so instead of failing deep inside."""
    if desc.get("layout") and all(is_lora_name(entry[0]) for entry in desc["layout"]):
        from correction_rl.config.loading import ConfigError

        raise ConfigError("sync.transport: collective cannot deliver a LoRA adapter to vLLM's workers; use "
                          "sync.transport: object_store, or sync.lora_merge: true (merged full weights)")


class VersionedAdapters:
    """The adapter versions one vLLM engine has loaded, newest last."""

    def __init__(self, cfg: "LoRAConfig", keep: int, directory: str | None = None):
        self.cfg = cfg
        self.keep = max(1, keep)
        self.root = Path(tempfile.mkdtemp(prefix="crl-lora-", dir=directory))
        self.loaded: deque[tuple[int, Any]] = deque()  # (version, LoRARequest)
        self._config = peft_config(cfg).to_dict()

    def current(self) -> Any:
        """The ``LoRARequest`` new requests run under (None at version 0: the base)."""
        return self.loaded[-1][1] if self.loaded else None

    def load(self, llm: Any, update: WeightUpdate) -> int:
        """Write ``update`` as an adapter directory, load it as adapter ``update.version``, and
        unload versions beyond ``keep``. Returns the number of tensors written."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if update.version < 1:
            raise ValueError(f"adapter update v{update.version}: version 0 is the base model (no adapter)")
        folder = self.root / f"v{update.version}"
        if folder.exists():  # a retried sync of the same version: replace it
            self._unload(llm, update.version)
            shutil.rmtree(folder)
        folder.mkdir()
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in unflatten(update)}
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = dict(self._config, target_modules=sorted(self._config["target_modules"]))
        (folder / "adapter_config.json").write_text(json.dumps(config, default=str))
        request = LoRARequest(f"policy-v{update.version}", update.version, str(folder))
        if not llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM refused adapter v{update.version} ({folder})")
        self.loaded.append((update.version, request))
        while len(self.loaded) > self.keep:
            old, _ = self.loaded[0]
            self._unload(llm, old)
        return len(tensors)

    def _unload(self, llm: Any, version: int) -> None:
        for i, (v, _) in enumerate(self.loaded):
            if v == version:
                del self.loaded[i]
                break
        llm.llm_engine.remove_lora(version)
        shutil.rmtree(self.root / f"v{version}", ignore_errors=True)

    def close(self) -> None:
        self.loaded.clear()
        shutil.rmtree(self.root, ignore_errors=True)
