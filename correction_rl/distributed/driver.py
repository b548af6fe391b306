"""The Ray driver's step loop: the same phases as the in-process loop, run by actors.

One step: sample a batch -> learn on every rank -> sync the weights -> (evaluate) -> telemetry
-> (checkpoint) -> log. In async mode the steps overlap: the next batch is asked for while a step
trains, and the next step is issued (after the export it must follow) before this step's
telemetry and row are made. Everything else has a room of its own: where batches come from in each
mode (``sampling.py``), the producers and restarted workers (``producers.py``), the weight
transport and background syncs (``weight_sync.py``), metrics (``telemetry.py``), checkpoints
(``checkpoints.py``), and the run around the loop (``session.py``, the shared lifecycle).

``async`` (default): rollout workers generate continuously and hand batches to teacher workers,
which push pairs into the buffer actor; the driver only asks the buffer for the next learner
batch, and the weight sync may overlap the next learner step. Staleness is bounded by the
buffer's admission control and the producers' back-pressure, never by discarding data silently.

``sync``: the same actors in lockstep — every worker generates one batch, the teachers correct
them, the pairs are stored, the learner trains, weights are synced — so the two modes can be
compared on the same config (benchmarks/bench_pipeline.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from correction_rl.config import RunConfig
from correction_rl.distributed.calls import get_within
from correction_rl.distributed.checkpoints import Checkpointer
from correction_rl.distributed.cluster import Cluster
from correction_rl.distributed.collective import make_weight_sync
from correction_rl.distributed.health import ActorHealth
from correction_rl.distributed.producers import Producers, Recovery
from correction_rl.distributed.sampling import Batch, BatchSource
from correction_rl.distributed.settings import check_settings
from correction_rl.distributed.telemetry import Telemetry
from correction_rl.distributed.weight_sync import WeightSyncer
from correction_rl.observe.diffs import maybe_log_corrections
from correction_rl.run.checkpoint import latest_valid
from correction_rl.run.evaluation import EvalReport
from correction_rl.run.state import ResumeReport, RunInterrupted, StopSignals
from correction_rl.timing import PhaseClock
from correction_rl.weights.sync import SyncReport, SyncTimeout


@dataclass(frozen=True)
class StepPlan:
    """What follows learner step ``version`` besides logging."""

    sync: bool
    evaluate: bool
    checkpoint: bool
    stop: bool
    last: bool

    @classmethod
    def after(cls, cfg: RunConfig, version: int, stop_requested: bool) -> "StepPlan":
        last = version >= cfg.total_steps
        every_eval, every_ckpt = cfg.eval.every_steps, cfg.checkpoint.every_steps
        stop = stop_requested and not last  # SIGINT/SIGTERM: checkpoint this step, then stop
        return cls(
            sync=version % cfg.sync.every_steps == 0 or last,
            evaluate=bool(every_eval) and version % every_eval == 0 and not last,
            checkpoint=stop or (bool(every_ckpt) and version % every_ckpt == 0 and not last),
            stop=stop,
            last=last,
        )

    @property
    def engines_needed(self) -> bool:
        """Evaluation, a checkpoint and the end of the run need every engine on this version:
        no background sync then."""
        return self.evaluate or self.checkpoint or self.last


class Driver:
    """The step loop over a started ``Cluster`` (``session.py`` starts and closes it)."""

    def __init__(self, cfg: RunConfig, cluster: Cluster, eval_prompts):
        self.cfg = cfg
        self.cluster = cluster
        self.eval_prompts = eval_prompts
        self.timeout = cfg.resources.call_timeout_s
        self.version = 0
        self.pairs_trained = 0
        self.sync = make_weight_sync(cfg, cluster.learners, cluster.rollout_workers)  # sync.transport
        """The one ``WeightTransport``; the loop never asks which it is."""
        self.health = ActorHealth(cfg, cluster)
        self.syncer = WeightSyncer(cfg, self.sync, self.health, lambda: self.version)
        self.recovery = Recovery(cfg, self.health, self.syncer)
        self.producers = Producers(cfg, cluster, self.health, self.syncer, self.recovery)
        self.batches = BatchSource(cfg, cluster, self.health, self.producers, self.recovery, lambda: self.version)
        self.telemetry = Telemetry(cfg, cluster, self.health)
        self.checkpoints = Checkpointer(cfg, cluster, self.health)
        self.checkpoints.trained_through = lambda: self.batches.trained_through  # a prefetch stays lent

    # -- phases ---------------------------------------------------------------------------------
    def start_learn(self, batch: Batch) -> list:
        """Issue one step on every rank, each on its own shard; returns the calls' references."""
        return [r.train_step.remote(s) for r, s in zip(self.cluster.learners, batch.shards)]

    def finish_learn(self, batch: Batch, calls: list) -> dict[str, float]:
        """Wait for the step issued by ``start_learn``; the buffer learns the new version (with
        the next sample when one is already asked for, else now)."""
        staleness = batch.info.staleness(self.version)  # at the version the step trains from
        stats = get_within(calls, self.timeout, "learner step")
        self.version = stats[0].step
        self.pairs_trained += sum(s.num_pairs for s in stats)
        self.batches.trained(batch)
        if self.batches.pending is None:
            get_within(self.cluster.buffer.set_learner_version.remote(self.version), self.timeout, "buffer version")
        return {**stats[0].as_metrics(),
                "buffer/batch_staleness_mean": sum(staleness) / max(1, len(staleness)),
                "buffer/batch_staleness_max": float(max(staleness, default=0))}

    def sync_weights(self) -> SyncReport:
        """Sync the current version into every rollout worker (``WeightSyncer.sync``)."""
        return self.syncer.sync()

    def evaluate(self) -> EvalReport:
        worker = self.cluster.rollout_workers[0]
        return self.recovery.around(
            lambda: get_within(worker.evaluate.remote(self.eval_prompts), self.timeout, "held-out evaluation"),
            "held-out evaluation")

    def write_checkpoint(self, wandb_run_id: str | None, timeout: float | None = None) -> Path:
        return self.checkpoints.write(self.version, self.pairs_trained, wandb_run_id, timeout)

    # -- the loop -------------------------------------------------------------------------------
    def train(self, sink, resume: ResumeReport | None = None, wandb_run_id: str | None = None) -> None:
        """Run to ``total_steps``; checkpoints every ``checkpoint.every_steps``. A sync that
        exceeds its timeout or a dead/stuck learner rank stops the run with a checkpoint."""
        try:
            with StopSignals() as signals:
                self._train(sink, resume, wandb_run_id, signals)
        except (SyncTimeout, TimeoutError, ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            self.stop_with_checkpoint(exc, wandb_run_id)
            raise

    def _train(self, sink, resume: ResumeReport | None, wandb_run_id: str | None, signals: StopSignals) -> None:
        self.syncer.sink = sink
        once = resume.as_metrics() if resume is not None else {}  # on the first row only
        self.producers.start()
        telemetry = None  # requested at the end of one step, collected at the end of the next
        launched: tuple[Batch, list] | None = None  # the next step, issued before this one's bookkeeping
        try:
            while self.version < self.cfg.total_steps:
                clock = PhaseClock()  # driver/<phase>_s: where a step's wall time goes
                if launched is None:
                    with clock("sample"):
                        launched = self.launch(signals)
                (batch, calls), launched = launched, None
                with clock("learn"):
                    metrics: dict[str, Any] = self.finish_learn(batch, calls)
                self.maybe_log_corrections(sink, batch)
                step = StepPlan.after(self.cfg, self.version, signals.received is not None)
                held = False
                if step.sync:
                    with clock("sync"):
                        held = self.syncer.after_step(metrics, may_overlap=not step.engines_needed)
                if self.pipelined and not step.engines_needed and not step.stop:
                    with clock("sample"):  # the next step trains while this one's row is made
                        launched = self.launch(signals)
                with clock("sync"):
                    self.syncer.settle_previous()  # the previous step's sync, normally long done
                if step.evaluate or step.checkpoint:  # never while a load is still under way
                    self.syncer.finish_background()  # one from an earlier step (sync.every_steps > 1)
                if step.evaluate:
                    with clock("eval"):
                        metrics.update(self.evaluate().as_metrics())
                with clock("metrics"):
                    metrics.update(self.telemetry.collect(self.pairs_trained, None if step.last else telemetry))
                    telemetry = None if step.last else self.telemetry.request()
                metrics.update({**self.health.faults, **clock.as_metrics("driver/"), "driver/step_s": clock.elapsed(), **once})
                once = {}
                checkpoint = self.checkpoint_step(wandb_run_id, metrics) if step.checkpoint else None
                self.syncer.log(metrics, self.version, held)
                if step.stop:  # the caller's ``finally`` closes W&B and the actors
                    raise RunInterrupted(signals.received, self.version, checkpoint)
        except BaseException:
            if launched is not None:  # a step issued ahead: a checkpoint now must hold it
                self.settle(*launched)
            self.syncer.flush_held_row({})  # its sync's outcome is unknown; the step itself happened
            self.producers.abort()
            raise
        self.producers.stop()

    @property
    def pipelined(self) -> bool:
        """Async mode overlaps the steps: the next batch is prefetched while a step trains, and
        the next step is issued before this one's telemetry and row (docs/architecture.md)."""
        return self.cfg.mode == "async"

    def launch(self, signals: StopSignals) -> tuple[Batch, list]:
        """Take the next batch and issue its step; then, in async mode, ask for the batch after
        it (a prefetch), unless that step would not run: the run ends or stops after this one."""
        batch = self.batches.next_batch()
        calls = self.start_learn(batch)
        upcoming = self.version + 1
        if upcoming < self.cfg.total_steps and signals.received is None:
            self.batches.prefetch(upcoming)
        return batch, calls

    def settle(self, batch: Batch, calls: list) -> None:
        """A fault or a stop met a step issued ahead: let it finish (bounded) so the driver's
        version matches the learner's state a checkpoint saves; a learner that cannot finish it
        cannot save one either."""
        try:
            self.finish_learn(batch, calls)
        except Exception as exc:  # noqa: BLE001 - reported, the original error propagates
            print(f"warning: the learner step issued ahead did not finish ({type(exc).__name__}: {exc})",
                  flush=True)

    def maybe_log_corrections(self, sink, batch: Batch) -> None:
        """A W&B table of the batch's corrections (``diffs.py``); its pairs are fetched from the
        object store on that step only."""
        every = self.cfg.metrics.table_every_steps
        if every > 0 and self.version % every == 0:
            maybe_log_corrections(sink, batch.pairs(self.timeout), None, self.version, self.cfg)

    def checkpoint_step(self, wandb_run_id: str | None, metrics: dict[str, float]) -> Path:
        start = time.perf_counter()
        path = self.write_checkpoint(wandb_run_id)
        metrics["checkpoint/seconds"] = time.perf_counter() - start
        metrics["checkpoint/step"] = float(self.version)
        return path

    def stop_with_checkpoint(self, exc: BaseException, wandb_run_id: str | None) -> None:
        """A fault that stops the run: try to leave a checkpoint at the current step (bounded
        time), and say in the error which checkpoint a resume will use."""
        try:
            path = self.write_checkpoint(wandb_run_id, timeout=min(self.timeout, 120))
            note = (f"checkpoint written at step {self.version}: {path}; resume with "
                    f"`correction-rl train --resume {self.cfg.run_dir}`")
        except Exception as ck_exc:  # noqa: BLE001 - a dead learner cannot save its state
            prev, _ = latest_valid(self.cfg.run_dir)
            note = (f"no checkpoint at step {self.version} ({type(ck_exc).__name__}: {ck_exc}); "
                    + (f"a resume will use {prev.path} (step {prev.step})" if prev else "no earlier checkpoint exists"))
        print(f"error: the run stopped at step {self.version}: {exc}\n{note}", flush=True)
        if sys.version_info >= (3, 11):  # add_note is 3.11+; the note was printed above anyway
            exc.add_note(note)


def run(cfg: RunConfig):
    """A whole Ray run (``session.run``: the shared lifecycle around this loop); kept here as
    the entry point ``train.py`` and the tests call."""
    from correction_rl.distributed.session import run as run_ray

    return run_ray(cfg)


__all__ = ["Driver", "StepPlan", "check_settings", "run"]
