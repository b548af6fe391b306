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
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.calls import while_restarting
from correction_rl.distributed.health import ActorHealth
from correction_rl.rollout.base import EngineUnhealthy
from correction_rl.weights.sync import SyncReport, SyncTimeout
from correction_rl.weights.transport import WeightTransport, sync


@dataclass
class BackgroundSync:
    """A sync loading in the background, the rows held until it ends, and its figures."""

    future: concurrent.futures.Future
    rows: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    metrics: dict[str, float] | None = None
    """Its ``sync/*`` figures once settled."""


class WeightSyncer:
    """Syncs the learner's current version (``current_version()``) into every rollout worker
    through ``transport``; replaces dead engines on the way (``ActorHealth``)."""

    def __init__(self, cfg: RunConfig, transport: WeightTransport, health: ActorHealth,
                 current_version: Callable[[], int]) -> None:
        self.cfg = cfg
        self.transport = transport
        self.health = health
        self.current_version = current_version
        self.background: list[BackgroundSync] = []
        """Syncs still loading in the background, oldest first (``begin_background``)."""
        self.latest: BackgroundSync | None = None
        """The newest background sync, settled or not: its step's row is held on it."""
        self.sink: Any = None

    @property
    def background_bound_s(self) -> float:
        """The longest a background sync can run: its own waits (export, loads) are bounded by
        ``sync.timeout_s`` each; waiting for one longer than this means its thread is stuck."""
        return 2 * self.cfg.sync.timeout_s + 60

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
        self.await_background_loads()
        return while_restarting(lambda: sync(self.transport, self.current_version()), "weight sync",
                                self.cfg.resources.start_timeout_s)

    def await_background_loads(self) -> None:
        """A sync waited for at once loads after every background sync still loading (their
        outcomes are settled later, by ``_settle``). It may be a recovery sync started while a
        learner step is in flight: its export then comes after that step and publishes the
        newer version (``PublishHandoff.take``), and an engine must never take an older version
        after a newer one (``check_version`` refuses it)."""
        pending = [b.future for b in self.background]
        if pending:
            concurrent.futures.wait(pending, timeout=self.background_bound_s)

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
        metrics row with ``log(..., held=True)``), else now, its figures added to ``metrics``.
        A background sync does not wait for the previous one: its loads are ordered after the
        previous loads by its own thread, and the driver settles the previous one
        (``settle_previous``) once it has issued the next learner step."""
        if may_overlap and self.can_overlap:
            self.begin_background()
            return True
        self.finish_background()
        metrics.update(self.sync_to_healthy_engines().as_metrics())
        return False

    @property
    def pending(self) -> concurrent.futures.Future | None:
        """The newest background sync (None: none)."""
        return self.background[-1].future if self.background else None

    def begin_background(self) -> None:
        """Start the sync now (the export is ordered before the next step), let a thread wait
        for the previous background sync, then for this one's loads (so an engine never loads
        an older version after a newer one); its report is collected by ``settle_previous`` or
        ``finish_background`` before the next sync waited for at once, checkpoint, evaluation,
        producer restart or the end of the run."""
        pending = self.transport.start(self.current_version())
        previous = self.pending
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if previous is not None:
                concurrent.futures.wait([previous], timeout=self.background_bound_s)
            try:
                future.set_result(pending.wait())
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                future.set_exception(exc)

        # a daemon thread, not an executor's: a second Ctrl-C must not wait for a stalled load
        threading.Thread(target=run, daemon=True, name=f"weight-sync-v{pending.version}").start()
        self.latest = BackgroundSync(future)
        self.background.append(self.latest)

    def settle_previous(self) -> None:
        """Wait for every background sync but the newest and log their held rows."""
        while len(self.background) > 1:
            self._settle(self.background.pop(0))

    def finish_background(self) -> None:
        """Wait for the background syncs (if any) and log their held metrics rows, now complete
        with their ``sync/*`` figures (the next step's row is logged after them)."""
        while self.background:
            self._settle(self.background.pop(0))

    def _settle(self, sync: BackgroundSync) -> None:
        """One background sync's outcome, its row logged. If the sync failed (an engine died or
        stalled while loading, a worker restarting), sync the current version again the checked
        way, which replaces dead engines or stops the run with ``SyncTimeout``."""
        try:  # the thread's own waits are bounded by sync.timeout_s
            metrics = sync.future.result(timeout=self.background_bound_s).as_metrics()
        except (EngineUnhealthy, SyncTimeout, ray.exceptions.RayActorError, concurrent.futures.TimeoutError) as exc:
            print(f"warning: background weight sync failed ({type(exc).__name__}: {exc}); "
                  "syncing again with the health check", flush=True)
            metrics = self.sync_to_healthy_engines().as_metrics()
        sync.metrics = metrics
        for step, row in sync.rows:
            self.sink.log({**row, **metrics}, step=step)

    def log(self, metrics: dict[str, float], step: int, held: bool) -> None:
        """Log a step's row now, or hold it until its background sync ends (``held``)."""
        if held and self.latest is not None:
            if self.latest.metrics is None:  # still loading: logged when it is settled
                self.latest.rows.append((step, metrics))
                return
            metrics = {**metrics, **self.latest.metrics}  # settled early (a producer restart)
        self.finish_background()  # earlier steps' rows first
        self.sink.log(metrics, step=step)

    def flush_held_row(self, extra: dict[str, float]) -> None:
        """Log every held row without its sync's figures (a fault: their outcome is unknown)."""
        background, self.background = self.background, []
        for sync in background:
            for step, row in sync.rows:
                self.sink.log({**row, **extra}, step=step)

    def close(self) -> None:
        self.transport.close()
