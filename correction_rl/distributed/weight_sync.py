"""The driver's side of weight sync: one ``WeightTransport``, synced the checked way, and the
bookkeeping of a sync left running in the background.

The driver never asks which transport it holds. ``overlaps_training`` says whether a sync can
run while the learner takes its next step (the object store: the engines load while the
learner trains; the collective group: learner rank 0 takes part, nothing to overlap); async mode
then starts the sync and lets a thread wait for the loads, and the metrics row of that step is
held back until the sync's figures are known, so rows stay in step order.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.calls import while_restarting
from correction_rl.distributed.health import ActorHealth
from correction_rl.rollout.base import EngineUnhealthy
from correction_rl.weights.sync import SyncReport, SyncTimeout
from correction_rl.weights.transport import WeightTransport, sync


class WeightSyncer:
    """Syncs the learner's current version (``current_version()``) into every rollout worker
    through ``transport``; replaces dead engines on the way (``ActorHealth``)."""

    def __init__(self, cfg: RunConfig, transport: WeightTransport, health: ActorHealth,
                 current_version: Callable[[], int]) -> None:
        self.cfg = cfg
        self.transport = transport
        self.health = health
        self.current_version = current_version
        self.pending: concurrent.futures.Future | None = None
        """A sync still loading in the background (``begin_background``)."""
        self.held_row: tuple[int, dict[str, float]] | None = None
        """The metrics row of the step whose sync is in the background, logged when it ends."""
        self.sink: Any = None

    @property
    def can_overlap(self) -> bool:
        """Async mode with a transport that lets the learner train while the engines load (each
        finishes its running generation first, which can take as long as a learner step)."""
        return self.cfg.mode == "async" and self.transport.overlaps_training

    # -- synchronous ----------------------------------------------------------------------------
    def sync(self) -> SyncReport:
        """One sync of the current version, repeated (same version: idempotent) if a rollout
        worker was restarting; a stalled one still raises ``SyncTimeout``. A collective
        transport (re)builds its group first when a member is not in it."""
        return while_restarting(lambda: sync(self.transport, self.current_version()), "weight sync",
                                self.cfg.resources.start_timeout_s)

    def sync_to_healthy_engines(self) -> SyncReport:
        """``sync`` after the engine health check; an engine that died after the check fails
        its load at once (``EngineUnhealthy``): its worker is replaced and the sync repeated
        (bounded by ``resources.max_actor_restarts``)."""
        for attempt in range(self.cfg.resources.max_actor_restarts + 1):
            self.health.check_engines()
            try:
                return self.sync()
            except (EngineUnhealthy, SyncTimeout) as exc:
                # an engine that died during its load stalls it: a sync timeout is recoverable
                # when the health check now finds (and replaces) a dead engine, else it stops the run
                if attempt == self.cfg.resources.max_actor_restarts:
                    raise
                if isinstance(exc, SyncTimeout) and not self.health.check_engines():
                    raise
                print(f"warning: {exc}; the worker was replaced, syncing again", flush=True)
        raise AssertionError("unreachable")

    # -- after a learner step -------------------------------------------------------------------
    def after_step(self, metrics: dict[str, float], may_overlap: bool) -> bool:
        """The step's sync: in the background when allowed (returns True: the caller holds its
        metrics row with ``log(..., held=True)``), else now, its figures added to ``metrics``."""
        self.finish_background()  # the previous one
        if may_overlap and self.can_overlap:
            self.begin_background()
            return True
        metrics.update(self.sync_to_healthy_engines().as_metrics())
        return False

    def begin_background(self) -> None:
        """Start the sync now (the export is ordered before the next step), let a thread wait
        for the loads; its report is collected by ``finish_background`` before the next sync,
        checkpoint, evaluation, producer restart or the end of the run."""
        pending = self.transport.start(self.current_version())
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(pending.wait())
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                future.set_exception(exc)

        # a daemon thread, not an executor's: a second Ctrl-C must not wait for a stalled load
        threading.Thread(target=run, daemon=True, name=f"weight-sync-v{pending.version}").start()
        self.pending = future

    def finish_background(self) -> None:
        """Wait for the pending background sync (if any) and log the held metrics row, now
        complete with its ``sync/*`` figures (the next step's row is logged after it). If the
        sync failed (an engine died or stalled while loading, a worker restarting), sync the
        current version again the checked way, which replaces dead engines or stops the run
        with ``SyncTimeout``."""
        future, self.pending = self.pending, None
        if future is None:
            return
        try:  # the thread's own waits are bounded by sync.timeout_s
            metrics = future.result(timeout=2 * self.cfg.sync.timeout_s + 60).as_metrics()
        except (EngineUnhealthy, SyncTimeout, ray.exceptions.RayActorError, concurrent.futures.TimeoutError) as exc:
            print(f"warning: background weight sync failed ({type(exc).__name__}: {exc}); "
                  "syncing again with the health check", flush=True)
            metrics = self.sync_to_healthy_engines().as_metrics()
        self.flush_held_row(metrics)

    def log(self, metrics: dict[str, float], step: int, held: bool) -> None:
        """Log a step's row now, or hold it until its background sync ends (``held``)."""
        if held:
            self.held_row = (step, metrics)
            return
        self.finish_background()  # one from an earlier step (sync.every_steps > 1)
        self.sink.log(metrics, step=step)

    def flush_held_row(self, extra: dict[str, float]) -> None:
        if self.held_row is not None:
            step, row = self.held_row
            self.held_row = None
            self.sink.log({**row, **extra}, step=step)

    def close(self) -> None:
        self.transport.close()
