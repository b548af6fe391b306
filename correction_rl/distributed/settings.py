"""Settings only the Ray modes can get wrong, refused before any resource is reserved."""

from __future__ import annotations

from correction_rl.config import ConfigError, RunConfig
from correction_rl.weights.group import choose_transport


def check_settings(cfg: RunConfig) -> None:
    """``ConfigError`` for a Ray run that cannot work, before any resource is reserved or
    engine started: a weight transport the machines cannot run, a human teacher that waits
    longer than the teacher worker's calls may last."""
    res, t = cfg.resources, cfg.teacher
    try:
        transport, _ = choose_transport(cfg.sync.transport, res.gpus_per_learner_rank,
                                        res.gpus_per_rollout_worker, cfg.rollout.engine)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if transport == "collective" and cfg.rollout.engine == "vllm" and cfg.learner.lora.enabled \
            and not cfg.sync.lora_merge:  # vLLM takes adapters from a directory, not a broadcast
        raise ConfigError(f"sync.transport={cfg.sync.transport!r} resolves to the collective (NCCL) path, which cannot "
                          "deliver a LoRA adapter into vLLM's workers (learner.lora.enabled); set sync.transport: "
                          "object_store (an adapter is a few MB), or sync.lora_merge: true (docs/lora.md)")
    if cfg.rollout.policy != "current":
        raise ConfigError(f"rollout.policy={cfg.rollout.policy!r} (offline corrections) needs mode: inprocess, "
                          f"not {cfg.mode!r}: the Ray modes always sync the rollout engines")
    if t.max_calls:
        raise ConfigError(f"teacher.max_calls={t.max_calls} (a teacher-call budget) needs mode: inprocess, "
                          f"not {cfg.mode!r}: the Ray modes stop at total_steps only")
    if t.kind == "human" and t.human.wait_s >= res.call_timeout_s:
        raise ConfigError(f"teacher.human.wait_s={t.human.wait_s:g} must be < resources.call_timeout_s="
                          f"{res.call_timeout_s:g} in mode {cfg.mode!r}: a teacher worker's correct() "
                          "call would time out before the human teacher stops waiting")
