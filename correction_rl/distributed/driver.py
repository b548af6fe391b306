"""The Ray driver: the same phases as ``loop.py``, run by actors.

``async`` (default): rollout workers generate continuously and hand batches to teacher workers,
which push pairs into the buffer actor; meanwhile the driver only asks the buffer for the next
learner batch, runs one step on every learner rank, and every ``sync.every_steps`` steps
publishes the new weights. Staleness is bounded by the buffer's admission control and the
producers' back-pressure, never by discarding data silently.

``sync``: the same actors in lockstep — every worker generates one batch, the teachers correct
them, the pairs are stored, the learner trains, weights are synced — so the two modes can be
compared on the same config (benchmarks/bench_pipeline.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray

from correction_rl.run.checkpoint import Checkpoint, save_checkpoint
from correction_rl.run.components import build_sink, load_prompts
from correction_rl.config import ConfigError, RunConfig, dump_config, to_dict
from correction_rl.observe.diffs import maybe_log_corrections
from correction_rl.distributed.actors import RestartedWorker
from correction_rl.distributed.calls import get_within, while_restarting
from correction_rl.distributed.cluster import Cluster, describe_placement, init_ray, start_cluster
from correction_rl.distributed.collective import make_weight_sync
from correction_rl.distributed.health import ActorHealth
from correction_rl.distributed.weights import ObjectStoreSync
from correction_rl.run.evaluation import EvalReport
from correction_rl.run.inprocess import (
    RunInterrupted,
    RunResult,
    StopSignals,
    _wandb_run_id,
    find_checkpoint,
    load_report,
    save_report,
)
from correction_rl.rollout.base import EngineUnhealthy
from correction_rl.weights.sync import SyncReport, SyncTimeout
from correction_rl.types import CorrectionPair, StepStats
from correction_rl.weights.group import choose_transport


@dataclasses.dataclass
class TelemetryRequest:
    """Outstanding metrics and pid calls to every actor (``Driver.request_telemetry``)."""

    metrics: list
    rollout_health: list
    teacher_pids: list


class PhaseClock:
    """Seconds the driver spent in each phase of one step (``driver/<phase>_s`` metrics): where
    a step's wall time goes when the pipeline is slower than its slowest stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        """Per phase, and ``driver/step_s``: the whole step so far (what the phases leave out
        is the driver's own bookkeeping)."""
        return {**{f"driver/{k}_s": v for k, v in self.seconds.items()},
                "driver/step_s": time.perf_counter() - self.started}


class Driver:
    def __init__(self, cfg: RunConfig, cluster: Cluster, eval_prompts):
        self.cfg = cfg
        self.cluster = cluster
        self.eval_prompts = eval_prompts
        self.version = 0
        self.sync = make_weight_sync(cfg, cluster.learners, cluster.rollout_workers)  # sync.transport
        self.timeout = cfg.resources.call_timeout_s
        self.pairs_trained = 0
        self.started = time.perf_counter()
        self.producers: list = []
        self.max_producer_restarts = max(1, cfg.resources.max_actor_restarts) * (
            len(cluster.rollout_workers) + len(cluster.teachers))
        self.health = ActorHealth(cfg, cluster)
        self.pending_sync: concurrent.futures.Future | None = None
        """A weight sync still loading in the background (async mode, ``begin_background_sync``)."""
        self.held_row: tuple[int, dict[str, float]] | None = None
        """The metrics row of the step whose sync is in the background, logged when it ends."""
        self.sink: Any = None

    # -- phases -------------------------------------------------------------------------------
    def learn(self, pairs: list[CorrectionPair]) -> StepStats:
        """One step on every rank, each on its own shard of the sampled pairs."""
        ranks = self.cluster.learners
        shards = [pairs[i :: len(ranks)] for i in range(len(ranks))]
        stats = get_within([r.train_step.remote(s) for r, s in zip(ranks, shards)], self.timeout, "learner step")
        self.version = stats[0].step
        self.pairs_trained += sum(s.num_pairs for s in stats)
        ray.get(self.cluster.buffer.set_learner_version.remote(self.version), timeout=self.timeout)
        return stats[0]

    def sync_weights(self) -> SyncReport:
        """``_sync_weights``, repeated (same version: idempotent) if a rollout worker was
        restarting; a stalled one still raises ``SyncTimeout``."""
        return while_restarting(self._sync_weights, "weight sync", self.cfg.resources.start_timeout_s)

    def _sync_weights(self) -> SyncReport:
        """Object store: rank 0 publishes the buckets once; every rollout worker loads them.
        Collective: rank 0 broadcasts them into every worker through the weight group, which is
        (re)built first when a member is not in it (a worker Ray restarted). Hard deadline."""
        if not isinstance(self.sync, ObjectStoreSync):  # CollectiveSync (distributed/collective.py)
            return self.sync.sync(self.version)
        return self._publish_export(self._export(), time.perf_counter(), self.version)

    def _export(self) -> list:
        """Ask every learner rank to export (rank 0 publishes). Called from the driver's main
        thread only: Ray runs one caller's calls to an actor in order, so the export sees this
        step's weights, never the next step's."""
        return [r.export.remote() for r in self.cluster.learners]

    def _publish_export(self, exports: list, start: float, version: int) -> SyncReport:
        try:
            published = ray.get(exports, timeout=self.cfg.sync.timeout_s)[0]
        except ray.exceptions.GetTimeoutError:
            raise SyncTimeout(version, "weight export on the learner ranks", self.cfg.sync.timeout_s) from None
        report = self.sync.publish_ref(
            published["ref"][0], published["version"], published["num_bytes"], published["num_buckets"],
            timeout_s=max(1e-3, self.cfg.sync.timeout_s - (time.perf_counter() - start)),
        )
        return dataclasses.replace(report, seconds=time.perf_counter() - start)  # export included

    def can_sync_in_background(self) -> bool:
        """Async mode, object-store transport: the learner need not wait while rollout workers
        load a version (each finishes its running generation first, which can take as long as
        a learner step). The collective transport keeps learner rank 0 in the broadcast, so
        there is nothing to overlap."""
        return self.cfg.mode == "async" and isinstance(self.sync, ObjectStoreSync)

    def begin_background_sync(self) -> None:
        """Export now (ordered before the next step), let a thread wait for the loads; its
        report is collected by ``finish_background_sync`` before the next sync, checkpoint,
        evaluation, producer restart or the end of the run."""
        exports, start, version = self._export(), time.perf_counter(), self.version
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(self._publish_export(exports, start, version))
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                future.set_exception(exc)

        # a daemon thread, not an executor's: a second Ctrl-C must not wait for a stalled load
        threading.Thread(target=run, daemon=True, name=f"weight-sync-v{version}").start()
        self.pending_sync = future

    def finish_background_sync(self) -> None:
        """Wait for the pending background sync (if any) and log the metrics row of the step
        that started it, now complete with its ``sync/*`` figures (rows stay in step order:
        the next step's row is logged after it). If the sync failed (an engine died or stalled
        while loading, a worker restarting), sync the current version again the checked way,
        which replaces dead engines or stops the run with ``SyncTimeout``."""
        future, self.pending_sync = self.pending_sync, None
        if future is None:
            return
        try:  # the thread's own waits are bounded by sync.timeout_s
            metrics = future.result(timeout=2 * self.cfg.sync.timeout_s + 60).as_metrics()
        except (EngineUnhealthy, SyncTimeout, ray.exceptions.RayActorError, concurrent.futures.TimeoutError) as exc:
            print(f"warning: background weight sync failed ({type(exc).__name__}: {exc}); "
                  "syncing again with the health check", flush=True)
            metrics = self.sync_to_healthy_engines().as_metrics()
        self.flush_held_row(metrics)

    def flush_held_row(self, extra: dict[str, float]) -> None:
        if self.held_row is not None:
            step, row = self.held_row
            self.held_row = None
            self.sink.log({**row, **extra}, step=step)

    def evaluate(self) -> EvalReport:
        worker = self.cluster.rollout_workers[0]
        return self.across_rollout_restarts(
            lambda: get_within(worker.evaluate.remote(self.eval_prompts), self.timeout, "held-out evaluation"),
            "held-out evaluation")

    def across_rollout_restarts(self, call, what: str):
        """``call()`` (a call on rollout workers), made again once a worker that died during it,
        or that Ray restarted earlier, has its stream position and the current weights back: a
        restarted worker refuses to generate or evaluate before that (``RestartedWorker``), so
        it cannot silently serve the initial weights. Bounded by ``resources.max_actor_restarts``;
        a worker out of restarts raises ``ActorDiedError``."""
        for attempt in range(self.cfg.resources.max_actor_restarts + 1):
            try:
                return call()
            except (ray.exceptions.RayActorError, RestartedWorker) as exc:
                if attempt == self.cfg.resources.max_actor_restarts:
                    raise
                print(f"warning: {what} met a restarted rollout worker ({type(exc).__name__}); "
                      "restoring it and asking again", flush=True)
                self.health.count_restarts()  # waits for a restart under way, restores streams
                self.sync_weights()
        raise AssertionError("unreachable")

    def request_telemetry(self) -> "TelemetryRequest":
        """Ask every actor for its metrics and the producers for their process ids, without
        waiting: the driver collects the answers one step later, so a step never waits for them."""
        c = self.cluster
        actors = [*c.rollout_workers, *c.teachers, *c.learners, c.buffer]
        return TelemetryRequest(
            metrics=[a.metrics.remote() for a in actors],
            rollout_health=[w.health.remote() for w in c.rollout_workers],
            teacher_pids=[t.pid.remote() for t in c.teachers],
        )

    def collect_telemetry(self, request: "TelemetryRequest | None" = None) -> dict[str, float]:
        """Role metrics (``*/idle_fraction``, buffer, teacher counters, ``system/*``) and restart
        counting, from ``request`` (issued a step earlier) or a fresh one. An answer lost with an
        actor that died meanwhile is asked again once Ray has restarted it (bounded)."""

        def fetch(req: TelemetryRequest) -> tuple[list[dict[str, float]], list[dict[str, Any]], list[int]]:
            return (get_within(req.metrics, self.timeout, "metrics"),
                    get_within(req.rollout_health, self.timeout, "rollout worker health"),
                    get_within(req.teacher_pids, self.timeout, "teacher pids"))

        try:
            gathered, health, teacher_pids = fetch(request or self.request_telemetry())
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
            gathered, health, teacher_pids = while_restarting(
                lambda: fetch(self.request_telemetry()), "metrics", self.cfg.resources.start_timeout_s)
        self.health.note_restarts({"rollout": [h["pid"] for h in health], "teacher": teacher_pids})
        self.health.replace_unhealthy(dict(enumerate(health)))
        out: dict[str, float] = {}
        for metrics in gathered:
            out.update(metrics)
        wall = time.perf_counter() - self.started
        out["system/pairs_per_s"] = self.pairs_trained / max(wall, 1e-9)
        for role in ("rollout", "teacher", "train"):
            idle = [v for k, v in out.items() if k.startswith(f"{role}/") and k.endswith("idle_fraction")]
            if idle:
                out[f"system/{role}_idle_fraction"] = sum(idle) / len(idle)
        return out

    def sync_to_healthy_engines(self) -> SyncReport:
        """``sync_weights`` after the engine health check; an engine that died after the check
        fails its load at once (``EngineUnhealthy``): its worker is replaced and the sync
        repeated (bounded by ``resources.max_actor_restarts``)."""
        for attempt in range(self.cfg.resources.max_actor_restarts + 1):
            self.health.check_engines()
            try:
                return self.sync_weights()
            except (EngineUnhealthy, SyncTimeout) as exc:
                # an engine that died during its load stalls it: a sync timeout is recoverable
                # when the health check now finds (and replaces) a dead engine, else it stops the run
                if attempt == self.cfg.resources.max_actor_restarts:
                    raise
                if isinstance(exc, SyncTimeout) and not self.health.check_engines():
                    raise
                print(f"warning: {exc}; the worker was replaced, syncing again", flush=True)
        raise AssertionError("unreachable")

    # -- fault tolerance ----------------------------------------------------------------------
    def revive_producers(self) -> None:
        """Async mode: a producer task ends only when stopped or when its rollout worker (or a
        teacher it waited on, beyond its retries) died. Ray restarts the actor; here its
        restarted engine gets the current weights and a new producer task."""
        if not self.producers:
            return
        done, _ = ray.wait(self.producers, num_returns=len(self.producers), timeout=0)
        if not done:
            return
        self.finish_background_sync()  # a pending load must not race the restarted worker's sync
        ended: dict[int, str] = {}
        for ref in done:
            i = self.producers.index(ref)
            try:
                ray.get(ref, timeout=self.timeout)
                ended[i] = "returned"
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                ended[i] = type(exc).__name__
            restarts = self.health.count("faults/producer_restarts")
            if restarts > self.max_producer_restarts:
                raise RuntimeError(
                    f"rollout producers failed {int(restarts)} times "
                    f"(last: worker {i}, {ended[i]}); more than resources.max_actor_restarts allows"
                )
            print(f"warning: producer of rollout worker {i} ended ({ended[i]}); restarting it", flush=True)
        if "RayTaskError" in ended.values():  # the actor lives: was it its engine that failed?
            self.health.check_engines()
        self.health.count_restarts()
        self.sync_weights()  # restarted engines start from the initial weights
        for i in ended:
            self.producers[i] = self._produce(self.cluster.rollout_workers[i])

    def tend_producers(self) -> None:
        """Between the 5-second slices of a wait for a batch: a producer whose engine died is
        blocked forever inside vLLM rather than failed, so check the engines (replacing dead
        ones ends their producers), then restart ended producers."""
        if self.producers:
            self.health.check_engines()
        self.revive_producers()

    def _produce(self, worker):
        return worker.produce.remote(
            self.cluster.teachers, self.cluster.buffer, self.cfg.resources.max_inflight_batches, self.timeout
        )

    # -- checkpoint / resume (docs/reliability.md) ------------------------------------------------
    def write_checkpoint(self, wandb_run_id: str | None, timeout: float | None = None) -> Path:
        """Learner state from every rank (DeepSpeed: each writes its shard), the buffer state,
        each rollout worker's prompt-stream position, the driver's counters; atomic."""
        timeout = timeout or self.timeout
        c = self.cluster
        if self.cfg.mode == "async":  # producers run on: their hand-offs, snapshotted with the pairs
            state = get_within(c.buffer.checkpoint_state.remote(len(c.rollout_workers)), timeout,
                               "buffer and hand-off state for a checkpoint")
        else:  # between lockstep rounds nothing is in flight; each round reported the positions
            state = {
                "buffer": get_within(c.buffer.state_dict.remote(), timeout, "buffer state for a checkpoint"),
                "rollout_workers": [self.health.stream_states.get(i) for i in range(len(c.rollout_workers))],
            }
        state.update(version=self.version, pairs_trained=self.pairs_trained, wandb_run_id=wandb_run_id)

        def learner_files(directory: Path) -> None:
            get_within([r.save_state.remote(str(directory / "learner")) for r in c.learners], timeout,
                 "learner ranks saving a checkpoint")

        return save_checkpoint(self.cfg.run_dir, self.version, state, to_dict(self.cfg),
                               write_files=learner_files, keep=self.cfg.checkpoint.keep)

    def restore(self, ckpt: Checkpoint) -> dict[str, float]:
        """Load ``ckpt`` into freshly started actors, then push the restored weights out."""
        c, state = self.cluster, ckpt.state
        versions = get_within([r.load_state.remote(str(ckpt.path / "learner")) for r in c.learners],
                        self.timeout, "learner ranks loading a checkpoint")
        if set(versions) != {state["version"]}:
            raise RuntimeError(f"{ckpt.path}: learner ranks restored versions {versions}, expected {state['version']}")
        self.version = state["version"]
        self.pairs_trained = state.get("pairs_trained", 0)
        after = get_within(c.buffer.load_state_dict.remote(state["buffer"]), self.timeout, "buffer restore")
        workers = state["rollout_workers"]
        streams: list[dict[str, Any]] = []
        if len(workers) == len(c.rollout_workers):  # else: fresh streams (worker count changed)
            restored = get_within([w.load_state_dict.remote(s, after["prompts_logged_after"])
                                   for w, s in zip(c.rollout_workers, workers)], self.timeout, "rollout worker restore")
            if self.cfg.mode == "async":  # positions until each producer's first hand-off
                get_within(c.buffer.seed_stream_positions.remote(restored), self.timeout, "stream positions")
            else:
                self.health.stream_states = dict(enumerate(restored))
            streams = [s["stream"] for s in restored]
        self.sync_weights()
        return {
            "resume/from_step": float(ckpt.step),
            "resume/pairs_logged_after_checkpoint": float(after["logged"]),
            "resume/pairs_admitted_after_checkpoint": float(after["admitted"]),
            "resume/buffer_size": float(after["size"]),
            # prompts in flight at the checkpoint, drawn again first; prompts drawn after it whose
            # pairs were logged before the crash, passed over (docs/reliability.md)
            "resume/prompts_replayed": float(sum(len(s.get("replay", [])) for s in streams)),
            "resume/prompts_skipped": float(sum(sum(s.get("skip", {}).values()) for s in streams)),
        }

    def stop_with_checkpoint(self, exc: BaseException, wandb_run_id: str | None) -> None:
        """A fault that stops the run: try to leave a checkpoint at the current step (bounded
        time), and say in the error which checkpoint a resume will use."""
        try:
            path = self.write_checkpoint(wandb_run_id, timeout=min(self.timeout, 120))
            note = (f"checkpoint written at step {self.version}: {path}; resume with "
                    f"`correction-rl train --resume {self.cfg.run_dir}`")
        except Exception as ck_exc:  # noqa: BLE001 - a dead learner cannot save its state
            from correction_rl.run.checkpoint import latest_valid

            prev, _ = latest_valid(self.cfg.run_dir)
            note = (f"no checkpoint at step {self.version} ({type(ck_exc).__name__}: {ck_exc}); "
                    + (f"a resume will use {prev.path} (step {prev.step})" if prev else "no earlier checkpoint exists"))
        print(f"error: the run stopped at step {self.version}: {exc}\n{note}", flush=True)
        if hasattr(exc, "add_note"):
            exc.add_note(note)

    # -- loops --------------------------------------------------------------------------------
    def sample(self, between_waits=None) -> list[CorrectionPair]:
        """Wait (in slices of at most 5 s, calling ``between_waits`` between them so dead
        producers are noticed and restarted) up to ``call_timeout_s`` for a learner batch."""
        n = self.cfg.learner.micro_batch_pairs * self.cfg.learner.grad_accum * len(self.cluster.learners)
        deadline = time.monotonic() + self.timeout
        pairs = None
        while pairs is None and time.monotonic() < deadline:
            wait = max(0.0, min(5.0, deadline - time.monotonic()))
            pairs = get_within(self.cluster.buffer.sample.remote(n, self.version, wait), wait + 60, "buffer sample")
            if pairs is None and between_waits is not None:
                between_waits()
        if pairs is None:
            raise TimeoutError(
                f"no batch of {n} admissible pairs within {self.timeout:.0f} s: the producers "
                "stalled (see teacher/skipped/* and rollout idle fractions)"
            )
        return pairs

    def collect_lockstep(self) -> None:
        """Sync mode: every worker generates one batch; teachers correct; pairs are stored. A
        rollout worker that dies during the round is restarted by Ray: the driver restores its
        stream and the current weights into it and repeats the round (bounded by
        ``resources.max_actor_restarts``; teacher calls are retried by Ray itself)."""
        workers = self.cluster.rollout_workers
        calls = {i: w.generate_round.remote() for i, w in enumerate(workers)}
        batches: dict[int, list] = {}
        for attempt in range(self.cfg.resources.max_actor_restarts + 1):
            failed = []
            for i, ref in calls.items():
                try:  # the position after the batch comes with it: a later kill cannot lose it
                    batches[i], self.health.stream_states[i] = get_within(ref, self.timeout, "generation")
                except (ray.exceptions.RayActorError, RestartedWorker):  # died, or restarted while idle
                    failed.append(i)
            if not failed:
                break
            if attempt == self.cfg.resources.max_actor_restarts:
                raise RuntimeError(f"rollout workers {failed} failed generating {attempt + 1} times in a "
                                   "row; more than resources.max_actor_restarts allows")
            print(f"warning: rollout workers {failed} were restarted; repeating their batch once their "
                  "streams are restored", flush=True)
            self.health.count_restarts()  # waits for the restart, restores the streams
            self.sync_weights()
            calls = {i: workers[i].generate_round.remote() for i in failed}
        teachers = self.cluster.teachers
        pair_lists = get_within(
            [teachers[i % len(teachers)].correct.remote(batches[i]) for i in range(len(workers))],
            self.timeout,
            "correction",
        )
        pairs = [p for lst in pair_lists for p in lst]
        get_within(self.cluster.buffer.add.remote(pairs), self.timeout, "buffer add")

    def next_batch(self, between_waits=None) -> list[CorrectionPair]:
        if self.cfg.mode == "async":
            return self.sample(between_waits)
        n = self.cfg.learner.micro_batch_pairs * self.cfg.learner.grad_accum * len(self.cluster.learners)
        for _ in range(100):
            pairs = get_within(self.cluster.buffer.sample.remote(n, self.version, 0.0), self.timeout, "buffer sample")
            if pairs is not None:
                return pairs
            self.collect_lockstep()
        raise RuntimeError(
            f"sync mode: no batch of {n} admissible pairs after 100 collection rounds at learner "
            f"version {self.version}; check buffer.max_staleness against the rollout workers' "
            "policy versions and the teacher's rejection counters"
        )

    def train(self, sink, resume_metrics: dict[str, float] | None = None, wandb_run_id: str | None = None) -> None:
        """Run to ``total_steps``; checkpoints every ``checkpoint.every_steps``. A sync that
        exceeds its timeout or a dead/stuck learner rank stops the run with a checkpoint."""
        resume_metrics = dict(resume_metrics or {})
        every_ckpt = self.cfg.checkpoint.every_steps
        try:
            with StopSignals() as signals:
                self._train(sink, resume_metrics, every_ckpt, wandb_run_id, signals)
        except (SyncTimeout, TimeoutError, ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            self.stop_with_checkpoint(exc, wandb_run_id)
            raise

    def _train(self, sink, resume_metrics, every_ckpt, wandb_run_id, signals: StopSignals) -> None:
        self.sink = sink
        if self.cfg.mode == "async":
            self.producers = [self._produce(w) for w in self.cluster.rollout_workers]
        telemetry = None  # requested at the end of one step, collected at the end of the next
        try:
            while self.version < self.cfg.total_steps:
                clock = PhaseClock()
                with clock("sample"):
                    self.revive_producers()
                    pairs = self.next_batch(self.tend_producers)
                staleness = [self.version - p.policy_version for p in pairs]
                with clock("learn"):
                    metrics: dict[str, Any] = self.learn(pairs).as_metrics()
                maybe_log_corrections(sink, pairs, None, self.version, self.cfg)  # W&B table (diffs.py)
                metrics["buffer/batch_staleness_mean"] = sum(staleness) / max(1, len(staleness))
                metrics["buffer/batch_staleness_max"] = float(max(staleness, default=0))
                every = self.cfg.eval.every_steps
                evaluating = bool(every) and self.version % every == 0 and self.version < self.cfg.total_steps
                stopping = signals.received is not None and self.version < self.cfg.total_steps
                checkpointing = stopping or (bool(every_ckpt) and self.version % every_ckpt == 0
                                             and self.version < self.cfg.total_steps)
                background = False
                if self.version % self.cfg.sync.every_steps == 0 or self.version == self.cfg.total_steps:
                    with clock("sync"):
                        self.finish_background_sync()  # the previous one
                        background = self.can_sync_in_background() and not (
                            evaluating or checkpointing or self.version == self.cfg.total_steps)
                        if background:
                            self.begin_background_sync()
                        else:
                            metrics.update(self.sync_to_healthy_engines().as_metrics())
                if evaluating or checkpointing:  # never while a load is still under way
                    self.finish_background_sync()  # one from an earlier step (sync.every_steps > 1)
                if evaluating:
                    with clock("eval"):
                        metrics.update(self.evaluate().as_metrics())
                with clock("metrics"):
                    last = self.version >= self.cfg.total_steps
                    metrics.update(self.collect_telemetry(None if last else telemetry))
                    telemetry = None if last else self.request_telemetry()
                metrics.update(self.health.faults)
                metrics.update(clock.as_metrics())
                metrics.update(resume_metrics)
                resume_metrics = {}
                # SIGINT/SIGTERM: the step is done; leave a checkpoint, then stop (the caller's
                # ``finally`` closes W&B and the actors)
                checkpoint = None
                if checkpointing:
                    t0 = time.perf_counter()
                    checkpoint = self.write_checkpoint(wandb_run_id)
                    metrics["checkpoint/seconds"] = time.perf_counter() - t0
                    metrics["checkpoint/step"] = float(self.version)
                if background:
                    self.held_row = (self.version, metrics)
                else:
                    self.finish_background_sync()  # one from an earlier step (sync.every_steps > 1)
                    sink.log(metrics, step=self.version)
                if stopping:
                    raise RunInterrupted(signals.received, self.version, checkpoint)
        except BaseException:
            self.flush_held_row({})  # its sync's outcome is unknown; the step itself happened
            for w in self.cluster.rollout_workers:
                w.stop.remote()
            if self.producers:  # bounded: a stalled worker must not turn a fault into a hang
                ray.wait(self.producers, num_returns=len(self.producers), timeout=min(self.timeout, 30))
            raise
        self.stop_producers()

    def stop_producers(self) -> None:
        """End of the run: stop the producers and wait (bounded) for the batches they handed
        to teachers. One whose rollout worker died since the last step ended with it: Ray
        restarts the worker, and the batches it had handed off are stored by their teachers or
        stay in the hand-off ledger (a later resume draws them again)."""
        for w in self.cluster.rollout_workers:
            w.stop.remote()
        for i, ref in enumerate(self.producers):
            try:
                get_within(ref, self.timeout, "rollout producers to stop")
            except ray.exceptions.RayActorError as exc:
                print(f"warning: rollout worker {i} died at the end of the run ({type(exc).__name__})", flush=True)


def check_settings(cfg: RunConfig) -> None:
    """Settings only the Ray modes can get wrong, refused (``ConfigError``) before any resource
    is reserved or engine started."""
    res, t = cfg.resources, cfg.teacher
    try:
        choose_transport(cfg.sync.transport, res.gpus_per_learner_rank, res.gpus_per_rollout_worker,
                         cfg.rollout.engine)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if t.kind == "human" and t.human_wait_s >= res.call_timeout_s:
        raise ConfigError(f"teacher.human_wait_s={t.human_wait_s:g} must be < resources.call_timeout_s="
                          f"{res.call_timeout_s:g} in mode {cfg.mode!r}: a teacher worker's correct() "
                          "call would time out before the human teacher stops waiting")


def run(cfg: RunConfig) -> RunResult:
    """Start (or join) Ray, place the actors, train, evaluate before and after."""
    check_settings(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    train_prompts, eval_prompts = load_prompts(cfg)
    ckpt = find_checkpoint(cfg)
    init_ray(cfg)
    cluster = start_cluster(cfg, train_prompts)
    wandb_id = ckpt.state.get("wandb_run_id") if ckpt else None
    sink = build_sink(cfg, run_dir, resume_id=wandb_id)
    wandb_id = wandb_id or _wandb_run_id(sink)
    try:
        driver = Driver(cfg, cluster, eval_prompts)
        before_path = run_dir / "eval_before.json"
        if ckpt is not None and before_path.exists():
            before = load_report(before_path)
        else:
            before = driver.evaluate()
            save_report(before, before_path)
            sink.log(before.as_metrics(), step=0)
        resume_metrics = driver.restore(ckpt) if ckpt is not None else None
        if ckpt is not None:
            print(f"resumed from {ckpt.path} at step {ckpt.step} "
                  f"({int(resume_metrics['resume/pairs_logged_after_checkpoint'])} pairs logged after it, "
                  f"buffer {int(resume_metrics['resume/buffer_size'])})", file=sys.stderr, flush=True)
        driver.train(sink, resume_metrics, wandb_id)
        after = driver.evaluate()
        save_report(after, run_dir / "eval_after.json")
        sink.log(after.as_metrics(), step=driver.version)
        get_within([r.save_pretrained.remote(str(run_dir / "policy")) for r in cluster.learners], driver.timeout, "save")
        roles = while_restarting(lambda: placement_record(cluster), "actor placement", cfg.resources.start_timeout_s)
        (run_dir / "roles.json").write_text(json.dumps(roles, indent=2) + "\n")
        driver.write_checkpoint(wandb_id)
        return RunResult(run_dir, driver.version, before, after)
    finally:
        sink.close()
        cluster.shutdown()


def placement_record(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    """Which node each actor ran on (for the multi-node placement checks): per role, each actor's
    pid, bundle, label selector, node id / IP and that node's custom resources and labels."""
    return describe_placement(cluster)
