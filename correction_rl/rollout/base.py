"""The one interface every rollout engine implements, and the optional capabilities some have.

``Generator`` is what every engine must do. The capabilities below are what only some engines
can do; a caller (the Ray rollout worker, the evaluation) asks with ``isinstance`` against these
small Protocols instead of probing attributes by name, so an engine that grows a capability
declares it by its method's name and signature, and a reader sees every optional path here.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from correction_rl.types import Prompt, Rollout, Sampling, WeightUpdate


@runtime_checkable
class Generator(Protocol):
    """Samples responses y ~ pi(.|x) and accepts new weights from the learner.

    ``policy_version`` is stamped on every ``Rollout`` so the buffer can bound staleness; it only
    changes through ``load_weights``.
    """

    policy_version: int

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[Rollout]:
        """One ``Rollout`` per prompt, in order, with engine-side log-probs."""
        ...

    def load_weights(self, update: WeightUpdate) -> None:
        """Replace the engine's weights with ``update`` and adopt ``update.version``."""
        ...


@runtime_checkable
class AdoptsWeights(Protocol):
    """Can serve from the update's own buckets without copying them (``HFGenerator``): for
    buckets nobody writes again (mapped read-only from Ray's object store, or freshly received
    from a weight group) the load is then free."""

    def adopt_weights(self, update: WeightUpdate) -> None: ...


@runtime_checkable
class ChecksHealth(Protocol):
    """Knows whether its engine can still serve (``VLLMGenerator``: its engine-core process may
    die under it). ``check_health`` must be lock-free: it answers while a generation runs."""

    def check_health(self) -> str | None:
        """None while the engine can serve, else why not."""
        ...


@runtime_checkable
class TorchPolicy(Protocol):
    """Runs the policy as a torch module in this process (``HFGenerator``): evaluation can
    estimate KL(pi || pi_init) with it, and a weight group can receive onto its device."""

    model: Any
    device: Any


@runtime_checkable
class ReceivesBroadcast(Protocol):
    """Its engine's own worker processes join a NCCL weight group and receive the buckets
    there (``VLLMGenerator`` on GPU; ``distributed/collective.py``): the rollout worker only
    tells them when to join, receive and leave."""

    num_workers: int
    """Receiving ranks this engine adds to the group."""

    def join_broadcast(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> None: ...

    def receive_broadcast(self, desc: dict[str, Any]) -> None: ...

    def leave_broadcast(self) -> None: ...


@runtime_checkable
class Closeable(Protocol):
    """Owns processes or memory to release (engines, model teachers)."""

    def close(self) -> None: ...


class EngineUnhealthy(RuntimeError):
    """An engine that can no longer serve (its process died, ``check_health`` says why). The
    Ray driver replaces the rollout worker that raised it (docs/reliability.md)."""
