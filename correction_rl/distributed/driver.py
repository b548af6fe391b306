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

import json
import time
from pathlib import Path
from typing import Any

import ray

from correction_rl.components import build_sink, load_prompts
from correction_rl.config import RunConfig, dump_config
from correction_rl.diffs import maybe_log_corrections
from correction_rl.distributed.cluster import Cluster, describe_placement, init_ray, start_cluster
from correction_rl.distributed.weights import ObjectStoreSync
from correction_rl.evaluation import EvalReport
from correction_rl.loop import RunResult, save_report
from correction_rl.sync import SyncReport, SyncTimeout
from correction_rl.types import CorrectionPair, StepStats


def _get(refs, timeout: float, what: str):
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout:.0f} s") from None


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
        """Rank 0 publishes the buckets once; every rollout worker loads them; hard deadline."""
        start = time.perf_counter()
        exports = [r.export.remote() for r in self.cluster.learners]
        try:
            published = ray.get(exports, timeout=self.cfg.sync.timeout_s)[0]
        except ray.exceptions.GetTimeoutError:
            raise SyncTimeout(self.version, "weight export on the learner ranks", self.cfg.sync.timeout_s) from None
        remaining = max(1e-3, self.cfg.sync.timeout_s - (time.perf_counter() - start))
        self.sync.timeout_s = remaining
        report = self.sync.publish_ref(
            published["ref"][0], published["version"], published["num_bytes"], published["num_buckets"]
        )
        return SyncReport(
            version=report.version,
            seconds=time.perf_counter() - start,
            num_bytes=report.num_bytes,
            num_messages=report.num_messages,
            num_targets=report.num_targets,
        )

    def evaluate(self) -> EvalReport:
        worker = self.cluster.rollout_workers[0]
        return _get(worker.evaluate.remote(self.eval_prompts), self.timeout, "held-out evaluation")

    def role_metrics(self) -> dict[str, float]:
        actors = [*self.cluster.rollout_workers, *self.cluster.teachers, *self.cluster.learners]
        out: dict[str, float] = {}
        for metrics in _get([a.metrics.remote() for a in actors], self.timeout, "metrics"):
            out.update(metrics)
        out.update(_get(self.cluster.buffer.metrics.remote(), self.timeout, "buffer metrics"))
        wall = time.perf_counter() - self.started
        out["system/pairs_per_s"] = self.pairs_trained / max(wall, 1e-9)
        for role in ("rollout", "teacher", "train"):
            idle = [v for k, v in out.items() if k.startswith(f"{role}/") and k.endswith("idle_fraction")]
            if idle:
                out[f"system/{role}_idle_fraction"] = sum(idle) / len(idle)
        return out

    # -- loops --------------------------------------------------------------------------------
    def sample(self) -> list[CorrectionPair]:
        n = self.cfg.learner.micro_batch_pairs * self.cfg.learner.grad_accum * len(self.cluster.learners)
        pairs = _get(
            self.cluster.buffer.sample.remote(n, self.version, self.timeout), self.timeout + 30, "buffer sample"
        )
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

    def next_batch(self) -> list[CorrectionPair]:
        if self.cfg.mode == "async":
            return self.sample()
        n = self.cfg.learner.micro_batch_pairs * self.cfg.learner.grad_accum * len(self.cluster.learners)
        while True:
            pairs = _get(self.cluster.buffer.sample.remote(n, self.version, 0.0), self.timeout, "buffer sample")
            if pairs is not None:
                return pairs
            self.collect_lockstep()

    def train(self, sink) -> None:
        producers = []
        if self.cfg.mode == "async":
            producers = [
                w.produce.remote(
                    self.cluster.teachers,
                    self.cluster.buffer,
                    self.cfg.resources.max_inflight_batches,
                    self.timeout,
                )
                for w in self.cluster.rollout_workers
            ]
        try:
            while self.version < self.cfg.total_steps:
                pairs = self.next_batch()
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
                sink.log(metrics, step=self.version)
        finally:
            for w in self.cluster.rollout_workers:
                w.stop.remote()
            if producers:
                _get(producers, self.timeout, "rollout producers to stop")


def run(cfg: RunConfig) -> RunResult:
    """Start (or join) Ray, place the actors, train, evaluate before and after."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    train_prompts, eval_prompts = load_prompts(cfg)
    init_ray(cfg)
    cluster = start_cluster(cfg, train_prompts)
    sink = build_sink(cfg, run_dir)
    try:
        driver = Driver(cfg, cluster, eval_prompts)
        before = driver.evaluate()
        save_report(before, run_dir / "eval_before.json")
        sink.log(before.as_metrics(), step=0)
        driver.train(sink)
        after = driver.evaluate()
        save_report(after, run_dir / "eval_after.json")
        sink.log(after.as_metrics(), step=driver.version)
        _get(cluster.learners[0].save_pretrained.remote(str(run_dir / "policy")), driver.timeout, "save")
        (run_dir / "roles.json").write_text(json.dumps(placement_record(cluster), indent=2) + "\n")
        return RunResult(run_dir, driver.version, before, after)
    finally:
        sink.close()
        cluster.shutdown()


def placement_record(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    """Which node each actor ran on (for the multi-node placement checks): per role, each actor's
    pid, bundle, label selector, node id / IP and that node's custom resources and labels."""
    return describe_placement(cluster)
