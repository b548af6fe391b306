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

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import ray

from correction_rl.checkpoint import Checkpoint, save_checkpoint
from correction_rl.components import build_sink, load_prompts
from correction_rl.config import RunConfig, dump_config, to_dict
from correction_rl.diffs import maybe_log_corrections
from correction_rl.distributed.cluster import Cluster, describe_placement, init_ray, start_cluster
from correction_rl.distributed.weights import ObjectStoreSync
from correction_rl.evaluation import EvalReport
from correction_rl.loop import RunResult, _wandb_run_id, find_checkpoint, load_report, save_report
from correction_rl.sync import SyncReport, SyncTimeout
from correction_rl.types import CorrectionPair, StepStats


def _get(refs, timeout: float, what: str):
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout:.0f} s") from None


def _while_restarting(call, what: str, timeout: float):
    """``call()``, retried while an actor it touches is being restarted by Ray (calls to a
    restarting actor fail with ``ActorUnavailableError`` instead of waiting); bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: an actor was still restarting after {timeout:.0f} s") from None
            time.sleep(1.0)


class Driver:
    def __init__(self, cfg: RunConfig, cluster: Cluster, eval_prompts):
        self.cfg = cfg
        self.cluster = cluster
        self.eval_prompts = eval_prompts
        self.version = 0
        self.sync = ObjectStoreSync(cluster.rollout_workers, cfg.sync.timeout_s)
        self.timeout = cfg.resources.call_timeout_s
        self.pairs_trained = 0
        self.started = time.perf_counter()
        self.producers: list = []
        self.faults: dict[str, float] = {}
        """Restart counters (``faults/*`` metrics)."""
        self.max_producer_restarts = max(1, cfg.resources.max_actor_restarts) * (
            len(cluster.rollout_workers) + len(cluster.teachers))
        self.pids = self.actor_pids()

    # -- phases -------------------------------------------------------------------------------
    def learn(self, pairs: list[CorrectionPair]) -> StepStats:
        """One step on every rank, each on its own shard of the sampled pairs."""
        ranks = self.cluster.learners
        shards = [pairs[i :: len(ranks)] for i in range(len(ranks))]
        stats = _get([r.train_step.remote(s) for r, s in zip(ranks, shards)], self.timeout, "learner step")
        self.version = stats[0].step
        self.pairs_trained += sum(s.num_pairs for s in stats)
        ray.get(self.cluster.buffer.set_learner_version.remote(self.version), timeout=self.timeout)
        return stats[0]

    def sync_weights(self) -> SyncReport:
        """``_sync_weights``, repeated (same version: idempotent) if a rollout worker was
        restarting; a stalled one still raises ``SyncTimeout``."""
        return _while_restarting(self._sync_weights, "weight sync", self.cfg.resources.start_timeout_s)

    def _sync_weights(self) -> SyncReport:
        """Rank 0 publishes the buckets once; every rollout worker loads them; hard deadline."""
        start = time.perf_counter()
        exports = [r.export.remote() for r in self.cluster.learners]
        try:
            published = ray.get(exports, timeout=self.cfg.sync.timeout_s)[0]
        except ray.exceptions.GetTimeoutError:
            raise SyncTimeout(self.version, "weight export on the learner ranks", self.cfg.sync.timeout_s) from None
        report = self.sync.publish_ref(
            published["ref"][0], published["version"], published["num_bytes"], published["num_buckets"],
            timeout_s=max(1e-3, self.cfg.sync.timeout_s - (time.perf_counter() - start)),
        )
        return dataclasses.replace(report, seconds=time.perf_counter() - start)  # export included

    def evaluate(self) -> EvalReport:
        worker = self.cluster.rollout_workers[0]
        return _while_restarting(lambda: _get(worker.evaluate.remote(self.eval_prompts), self.timeout, "held-out evaluation"),
                                 "held-out evaluation", self.cfg.resources.start_timeout_s)

    def role_metrics(self) -> dict[str, float]:
        actors = [*self.cluster.rollout_workers, *self.cluster.teachers, *self.cluster.learners]
        out: dict[str, float] = {}
        gathered = _while_restarting(lambda: _get([a.metrics.remote() for a in actors], self.timeout, "metrics"),
                                     "metrics", self.cfg.resources.start_timeout_s)
        for metrics in gathered:
            out.update(metrics)
        out.update(_get(self.cluster.buffer.metrics.remote(), self.timeout, "buffer metrics"))
        wall = time.perf_counter() - self.started
        out["system/pairs_per_s"] = self.pairs_trained / max(wall, 1e-9)
        for role in ("rollout", "teacher", "train"):
            idle = [v for k, v in out.items() if k.startswith(f"{role}/") and k.endswith("idle_fraction")]
            if idle:
                out[f"system/{role}_idle_fraction"] = sum(idle) / len(idle)
        return out

    # -- fault tolerance ----------------------------------------------------------------------
    def actor_pids(self) -> dict[str, list[int]]:
        return _while_restarting(self._actor_pids, "actor pids", self.cfg.resources.start_timeout_s)

    def _actor_pids(self) -> dict[str, list[int]]:
        c = self.cluster
        return {
            "rollout": _get([w.pid.remote() for w in c.rollout_workers], self.timeout, "rollout worker pids"),
            "teacher": _get([t.pid.remote() for t in c.teachers], self.timeout, "teacher pids"),
        }

    def count_restarts(self) -> None:
        """A changed process id means Ray restarted that actor (``max_actor_restarts``)."""
        pids = self.actor_pids()
        for role, now in pids.items():
            for i, (old, new) in enumerate(zip(self.pids[role], now)):
                if old != new:
                    self.faults[f"faults/{role}_restarts"] = self.faults.get(f"faults/{role}_restarts", 0) + 1
                    print(f"warning: {role} worker {i} was restarted (pid {old} -> {new})", flush=True)
        self.pids = pids

    def revive_producers(self) -> None:
        """Async mode: a producer task ends only when stopped or when its rollout worker (or a
        teacher it waited on, beyond its retries) died. Ray restarts the actor; here its
        restarted engine gets the current weights and a new producer task."""
        if not self.producers:
            return
        done, _ = ray.wait(self.producers, num_returns=len(self.producers), timeout=0)
        if not done:
            return
        for ref in done:
            i = self.producers.index(ref)
            try:
                ray.get(ref, timeout=self.timeout)
                reason = "returned"
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                reason = type(exc).__name__
            self.faults["faults/producer_restarts"] = self.faults.get("faults/producer_restarts", 0) + 1
            if self.faults["faults/producer_restarts"] > self.max_producer_restarts:
                raise RuntimeError(
                    f"rollout producers failed {int(self.faults['faults/producer_restarts'])} times "
                    f"(last: worker {i}, {reason}); more than resources.max_actor_restarts allows"
                )
            print(f"warning: producer of rollout worker {i} ended ({reason}); restarting it", flush=True)
            self.count_restarts()
            self.sync_weights()  # a restarted engine starts from the initial weights
            self.producers[i] = self._produce(self.cluster.rollout_workers[i])

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
        state = {
            "version": self.version,
            "buffer": _get(c.buffer.state_dict.remote(), timeout, "buffer state for a checkpoint"),
            "rollout_workers": _get([w.state_dict.remote() for w in c.rollout_workers], timeout,
                                    "rollout worker state for a checkpoint"),
            "pairs_trained": self.pairs_trained,
            "wandb_run_id": wandb_run_id,
        }

        def learner_files(directory: Path) -> None:
            _get([r.save_state.remote(str(directory / "learner")) for r in c.learners], timeout,
                 "learner ranks saving a checkpoint")

        return save_checkpoint(self.cfg.run_dir, self.version, state, to_dict(self.cfg),
                               write_files=learner_files, keep=self.cfg.checkpoint.keep)

    def restore(self, ckpt: Checkpoint) -> dict[str, float]:
        """Load ``ckpt`` into freshly started actors, then push the restored weights out."""
        c, state = self.cluster, ckpt.state
        versions = _get([r.load_state.remote(str(ckpt.path / "learner")) for r in c.learners],
                        self.timeout, "learner ranks loading a checkpoint")
        if set(versions) != {state["version"]}:
            raise RuntimeError(f"{ckpt.path}: learner ranks restored versions {versions}, expected {state['version']}")
        self.version = state["version"]
        self.pairs_trained = state.get("pairs_trained", 0)
        after = _get(c.buffer.load_state_dict.remote(state["buffer"]), self.timeout, "buffer restore")
        workers = state["rollout_workers"]
        if len(workers) == len(c.rollout_workers):  # else: fresh streams (worker count changed)
            _get([w.load_state_dict.remote(s) for w, s in zip(c.rollout_workers, workers)],
                 self.timeout, "rollout worker restore")
        self.sync_weights()
        return {
            "resume/from_step": float(ckpt.step),
            "resume/pairs_logged_after_checkpoint": float(after["logged"]),
            "resume/pairs_admitted_after_checkpoint": float(after["admitted"]),
            "resume/buffer_size": float(after["size"]),
        }

    def stop_with_checkpoint(self, exc: BaseException, wandb_run_id: str | None) -> None:
        """A fault that stops the run: try to leave a checkpoint at the current step (bounded
        time), and say in the error which checkpoint a resume will use."""
        try:
            path = self.write_checkpoint(wandb_run_id, timeout=min(self.timeout, 120))
            note = (f"checkpoint written at step {self.version}: {path}; resume with "
                    f"`correction-rl train --resume {self.cfg.run_dir}`")
        except Exception as ck_exc:  # noqa: BLE001 - a dead learner cannot save its state
            from correction_rl.checkpoint import latest_valid

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
            pairs = _get(self.cluster.buffer.sample.remote(n, self.version, wait), wait + 60, "buffer sample")
            if pairs is None and between_waits is not None:
                between_waits()
        if pairs is None:
            raise TimeoutError(
                f"no batch of {n} admissible pairs within {self.timeout:.0f} s: the producers "
                "stalled (see teacher/skipped/* and rollout idle fractions)"
            )
        return pairs

    def collect_lockstep(self) -> None:
        """Sync mode: every worker generates one batch; teachers correct; pairs are stored."""
        workers, teachers = self.cluster.rollout_workers, self.cluster.teachers
        batches = _get([w.generate.remote() for w in workers], self.timeout, "generation")
        pair_lists = _get(
            [teachers[i % len(teachers)].correct.remote(b) for i, b in enumerate(batches)],
            self.timeout,
            "correction",
        )
        pairs = [p for lst in pair_lists for p in lst]
        _get(self.cluster.buffer.add.remote(pairs), self.timeout, "buffer add")

    def next_batch(self, between_waits=None) -> list[CorrectionPair]:
        if self.cfg.mode == "async":
            return self.sample(between_waits)
        n = self.cfg.learner.micro_batch_pairs * self.cfg.learner.grad_accum * len(self.cluster.learners)
        for _ in range(100):
            pairs = _get(self.cluster.buffer.sample.remote(n, self.version, 0.0), self.timeout, "buffer sample")
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
            self._train(sink, resume_metrics, every_ckpt, wandb_run_id)
        except (SyncTimeout, TimeoutError, ray.exceptions.RayActorError) as exc:
            self.stop_with_checkpoint(exc, wandb_run_id)
            raise

    def _train(self, sink, resume_metrics, every_ckpt, wandb_run_id) -> None:
        if self.cfg.mode == "async":
            self.producers = [self._produce(w) for w in self.cluster.rollout_workers]
        try:
            while self.version < self.cfg.total_steps:
                self.revive_producers()
                pairs = self.next_batch(self.revive_producers)
                staleness = [self.version - p.policy_version for p in pairs]
                metrics: dict[str, Any] = self.learn(pairs).as_metrics()
                maybe_log_corrections(sink, pairs, None, self.version, self.cfg)  # W&B table (diffs.py)
                metrics["buffer/batch_staleness_mean"] = sum(staleness) / max(1, len(staleness))
                metrics["buffer/batch_staleness_max"] = float(max(staleness, default=0))
                if self.version % self.cfg.sync.every_steps == 0 or self.version == self.cfg.total_steps:
                    metrics.update(self.sync_weights().as_metrics())
                every = self.cfg.eval.every_steps
                if every and self.version % every == 0 and self.version < self.cfg.total_steps:
                    metrics.update(self.evaluate().as_metrics())
                metrics.update(self.role_metrics())
                self.count_restarts()
                metrics.update(self.faults)
                metrics.update(resume_metrics)
                resume_metrics = {}
                if every_ckpt and self.version % every_ckpt == 0 and self.version < self.cfg.total_steps:
                    t0 = time.perf_counter()
                    self.write_checkpoint(wandb_run_id)
                    metrics["checkpoint/seconds"] = time.perf_counter() - t0
                    metrics["checkpoint/step"] = float(self.version)
                sink.log(metrics, step=self.version)
        except BaseException:
            for w in self.cluster.rollout_workers:
                w.stop.remote()
            if self.producers:  # bounded: a stalled worker must not turn a fault into a hang
                ray.wait(self.producers, num_returns=len(self.producers), timeout=min(self.timeout, 30))
            raise
        for w in self.cluster.rollout_workers:
            w.stop.remote()
        if self.producers:
            _get(self.producers, self.timeout, "rollout producers to stop")


def run(cfg: RunConfig) -> RunResult:
    """Start (or join) Ray, place the actors, train, evaluate before and after."""
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
            print(f"resumed from {ckpt.path} at step {ckpt.step}", flush=True)
        driver.train(sink, resume_metrics, wandb_id)
        after = driver.evaluate()
        save_report(after, run_dir / "eval_after.json")
        sink.log(after.as_metrics(), step=driver.version)
        _get(cluster.learners[0].save_pretrained.remote(str(run_dir / "policy")), driver.timeout, "save")
        (run_dir / "roles.json").write_text(json.dumps(placement_record(cluster), indent=2) + "\n")
        driver.write_checkpoint(wandb_id)
        return RunResult(run_dir, driver.version, before, after)
    finally:
        sink.close()
        cluster.shutdown()


def placement_record(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    """Which node each actor ran on (for the multi-node placement checks): per role, each actor's
    pid, bundle, label selector, node id / IP and that node's custom resources and labels."""
    return describe_placement(cluster)
