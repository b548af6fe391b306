"""The in-process driver: the reference algorithm, one readable method per phase.

    act      generator.generate(prompts)            -> rollouts (y, policy version)
    correct  teacher.correct(rollouts)              -> corrections (y')
    store    ingest(corrections, buffer)            -> pairs with pi_ref log-probs, logged, admitted
    learn    buffer.sample -> learner.train_step    -> StepStats
    sync     sync(transport, version)               -> generators at the new version
    log      every component's metrics -> sinks

Everything runs in one process, without Ray: this is what tests and debugging use, and what the
distributed driver (``correction_rl.distributed``) parallelises without changing the phases. The
route of a pair (``pairs/ingest.py``) and the weight transport interface
(``weights/transport.py``) are the same ones the Ray driver uses; everything around the step
loop (run directory, resume, evaluation before/after, checkpoints' layout) is the shared
lifecycle (``run/lifecycle.py``), of which ``InProcessSession`` is the in-process ``Session``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

from correction_rl.buffer.correction_log import CorrectionLog
from correction_rl.buffer.replay import ReplayBuffer
from correction_rl.config import RunConfig, to_dict
from correction_rl.learner.learner import Learner
from correction_rl.learner.backends import load_policy, resolve_dtype
from correction_rl.models import load_model, load_tokenizer
from correction_rl.observe.diffs import maybe_log_corrections
from correction_rl.pairs.ingest import Ingest
from correction_rl.pairs.make import rollout_pair_id
from correction_rl.prompts.split import train_and_held_out
from correction_rl.prompts.stream import PromptStream
from correction_rl.run.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from correction_rl.run.components import (
    buffer_config,
    build_eval_teacher,
    build_generator,
    build_teacher,
    eval_modes,
    rollout_sampling,
)
from correction_rl.run.evaluation import EvalReport, evaluate
from correction_rl.run.lifecycle import (
    ResumeReport,
    RunInterrupted,
    RunResult,
    RunState,
    StopSignals,
    run_session,
    sample_or_collect,
)
from correction_rl.weights.sync import SyncReport
from correction_rl.weights.transport import sync

__all__ = ["InProcessSession", "run"]


class InProcessSession:
    """The components of one in-process run, built once from the config, and its phases."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        try:
            self._build(cfg, run_dir)
        except BaseException:
            self.close()  # a half-built session must not keep the log's lock or an engine
            raise

    def _build(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.tokenizer = load_tokenizer(cfg.model.path)
        train, self.eval_prompts = train_and_held_out(cfg)
        self.train_prompts = PromptStream(train, cfg.seed)
        self.generator = build_generator(cfg)
        self.eval_generator = self.generator
        buffer_cfg = buffer_config(cfg)
        if cfg.rollout.policy == "initial":
            # Offline corrections (docs/objectives.md, "Experiment knobs"): the training engine
            # never gets new weights, a second engine does and serves evaluation; every pair is
            # pi_init's, so staleness grows with the step and must not evict them.
            self.eval_generator = build_generator(cfg)
            buffer_cfg = dataclasses.replace(buffer_cfg, max_staleness=cfg.total_steps)
        self.teacher = build_teacher(cfg)
        self._eval_teacher = None
        self.learner = Learner(  # ZeRO-3 + zero_init: only this rank's partition is materialised
            load_policy(cfg.model.path, cfg.learner, resolve_dtype(cfg.model, cfg.learner)),
            pad_id=self.tokenizer.pad_token_id,
            learner_cfg=cfg.learner,
            objective_cfg=cfg.objective,
            model_cfg=cfg.model,
            total_steps=cfg.total_steps,
            lora_merge=cfg.sync.lora_merge,
        )
        # the one owner of pi_ref; with LoRA it is this learner's base, adapter disabled (no copy)
        self.ingest = Ingest.from_config(cfg, self.tokenizer, policy=self.learner)
        log = CorrectionLog(self.run_dir / "corrections.jsonl", meta={"run": cfg.name})
        self.buffer = ReplayBuffer(buffer_cfg, log)
        self.transport = _transport(cfg, self.learner, self.eval_generator)
        self.init_model = load_model(cfg.model.path).eval()
        """The starting policy, frozen: the KL(pi || pi_init) estimate of evaluation scores against it."""
        self.rng = random.Random(cfg.seed)
        self.counters: dict[str, float] = {}

    @property
    def version(self) -> int:
        return self.learner.version

    def count(self, key: str, amount: float = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + amount

    # -- the phases --------------------------------------------------------------------------
    def act_correct_store(self) -> dict[str, float]:
        """One batch of prompts through generator and teacher into the buffer."""
        cfg = self.cfg
        prompts = self.train_prompts.next_batch(cfg.rollout.batch_size)
        t0 = time.perf_counter()
        rollouts = self.generator.generate(prompts, rollout_sampling(cfg, self.rng.randrange(2**31)))
        t1 = time.perf_counter()
        log = self.buffer.log
        if log is not None:  # a resumed run: never ask the teacher again for a logged correction
            fresh = [r for r in rollouts if rollout_pair_id(r) not in log]
            if len(fresh) < len(rollouts):
                self.count("resume/corrections_reused", len(rollouts) - len(fresh))
            rollouts = fresh
        self.count("teacher/calls", len(rollouts))  # cumulative: the budget arms are compared at
        corrections = self.teacher.correct(rollouts) if rollouts else []
        t2 = time.perf_counter()
        stored = self.ingest(corrections, self.buffer)
        for reason, n in stored.skipped.items():
            self.count(f"teacher/skipped/{reason}", n)
        pairs = stored.pairs
        tokens = sum(len(r.response_ids) for r in rollouts)
        return {
            "rollout/seconds": t1 - t0,
            "rollout/tokens_per_s": tokens / max(t1 - t0, 1e-9),
            "rollout/mean_response_tokens": tokens / max(1, len(rollouts)),
            "teacher/seconds": t2 - t1,
            "teacher/pairs_per_s": len(pairs) / max(t2 - t1, 1e-9),
            "teacher/noop_rate": sum(p.is_noop for p in pairs) / max(1, len(pairs)),
            "teacher/mean_edit_distance": sum(p.edit_distance for p in pairs) / max(1, len(pairs)),
            "buffer/admitted": float(stored.added),
        }

    def learn(self, sink: Any) -> dict[str, float]:
        """Sample one step's pairs (collecting more first if needed) and apply one update."""
        cfg, learner = self.cfg, self.learner
        n = cfg.learner.micro_batch_pairs * cfg.learner.grad_accum
        got = sample_or_collect(
            lambda: self.buffer.sample(n, learner.version, self.rng), self.act_correct_store,
            what=f"{n} pairs",
            hint="check rollout.batch_size, buffer.min_fresh_pairs / max_staleness and the teacher's "
                 "rejection counters (teacher/skipped/*)",
        )
        stats = learner.train_step(got.pairs)
        maybe_log_corrections(sink, got.pairs, self.tokenizer, learner.version, cfg)  # W&B table (diffs.py)
        return {**(got.last_round or {}), **stats.as_metrics()}

    def sync_weights(self) -> SyncReport:
        return sync(self.transport, self.learner.version)

    def evaluate(self) -> EvalReport:
        """Greedy (and sampled) held-out metrics of the generator's current weights, with the KL
        estimate against the starting policy."""
        cfg = self.cfg
        if cfg.eval.teacher == "run":
            teacher = self.teacher
        else:
            self._eval_teacher = self._eval_teacher or build_eval_teacher(cfg)
            teacher = self._eval_teacher
        return evaluate(
            self.eval_generator,
            self.eval_prompts,
            teacher,
            rollout_sampling(cfg, seed=cfg.seed),
            policy_model=self.learner.model,
            init_model=self.init_model,
            tokenizer=self.tokenizer,
            modes=eval_modes(cfg),
        )

    def budget_spent(self) -> bool:
        """``teacher.max_calls`` reached: arms of an experiment stop at the same number of
        rollouts sent to the teacher, whatever their objective does with no-op pairs."""
        limit = self.cfg.teacher.max_calls
        return bool(limit) and self.counters.get("teacher/calls", 0) >= limit

    # -- the loop ----------------------------------------------------------------------------
    def train(self, sink: Any, resume: ResumeReport | None, wandb_run_id: str | None) -> None:
        """act -> correct -> store -> learn -> sync -> log, until ``total_steps`` updates (or
        ``teacher.max_calls`` rollouts sent to the teacher); a
        checkpoint every ``checkpoint.every_steps``; SIGINT/SIGTERM finish the current step,
        write a checkpoint and raise ``RunInterrupted``."""
        cfg = self.cfg
        resume_metrics = resume.as_metrics() if resume is not None else {}
        every = cfg.checkpoint.every_steps
        with StopSignals() as stop:
            while self.learner.version < cfg.total_steps and not self.budget_spent():
                metrics = self.learn(sink)
                step = self.learner.version
                last = step == cfg.total_steps or self.budget_spent()
                if step % cfg.sync.every_steps == 0 or last:
                    metrics.update(self.sync_weights().as_metrics())
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and not last:
                    metrics.update(self.evaluate().as_metrics())
                metrics.update(self.buffer.stats().as_metrics())
                metrics.update(self.counters)
                metrics.update(resume_metrics)
                resume_metrics = {}
                teacher_metrics = getattr(self.teacher, "metrics", None)
                if callable(teacher_metrics):  # LLM teachers: latency, tokens, rejections by reason
                    metrics.update(teacher_metrics())
                if stop.received or (every and step % every == 0 and not last):
                    t0 = time.perf_counter()
                    path = self.write_checkpoint(wandb_run_id)
                    metrics["checkpoint/seconds"] = time.perf_counter() - t0
                    metrics["checkpoint/step"] = float(step)
                    if stop.received:
                        sink.log(metrics, step=step)
                        raise RunInterrupted(stop.received, step, path)
                sink.log(metrics, step=step)

    # -- checkpoint / resume (docs/reliability.md) ---------------------------------------------
    def write_checkpoint(self, wandb_run_id: str | None) -> Path:
        """Everything an exact resume needs, atomically (``RunState`` + the learner's files)."""
        version, internal, gauss = self.rng.getstate()
        state = RunState(
            version=self.learner.version,
            buffer=self.buffer.state_dict(),
            streams=[self.train_prompts.state_dict()],
            counters=dict(self.counters),
            rng=[version, list(internal), gauss],
            wandb_run_id=wandb_run_id,
            generator_version=getattr(self.generator, "policy_version", None),
        )
        return save_checkpoint(
            self.run_dir, self.learner.version, state.to_json(), to_dict(self.cfg),
            write_files=lambda d: self.learner.save_state(d / "learner"),
            keep=self.cfg.checkpoint.keep,
        )

    def restore(self, ckpt: Checkpoint) -> ResumeReport:
        """Load ``ckpt``; pairs logged after it (teacher work done before the crash) go into the
        buffer, not to the teacher again. Every part it loads is replaced whole, so after a
        failed restore an older checkpoint can be restored into the same session."""
        state = RunState.of(ckpt)
        if len(state.streams) != 1 or not isinstance(state.streams[0], dict):
            raise CheckpointError(f"{ckpt.path}: {len(state.streams)} prompt-stream states; an in-process "
                                  "run has one (a checkpoint of a Ray run with several rollout workers?)")
        after = self.buffer.load_state_dict(state.buffer)  # BufferStateError: it disagrees with the log
        self.learner.load_state(ckpt.path / "learner")
        if self.learner.version != state.version:
            raise CheckpointError(f"{ckpt.path}: learner version {self.learner.version} != state {state.version}")
        self.train_prompts.load_state_dict(state.streams[0])
        # their pairs are back in the buffer: do not draw those prompts again (a regenerated
        # rollout differs once the policy moved on, so the pair-id check would not catch it)
        self.train_prompts.account_for_logged(after.prompts_logged_after)
        if state.rng is not None:
            v, internal, gauss = state.rng
            self.rng.setstate((v, tuple(internal), gauss))
        self.counters = {k: float(x) for k, x in state.counters.items()}
        self.sync_weights()  # the generator serves the restored policy
        self.count("resume/count")
        return ResumeReport(
            from_step=ckpt.step,
            pairs_logged_after_checkpoint=after.logged,
            pairs_admitted_after_checkpoint=after.admitted,
            buffer_size=len(self.buffer),
            prompts_skipped=sum(self.train_prompts.state.skip.values()),
        )

    def save_policy(self, path: Path) -> None:
        self.learner.save_pretrained(path)

    def close(self) -> None:
        """Close everything that holds a resource, each even if another fails."""
        closers = []
        for name in ("buffer", "transport", "generator", "eval_generator", "teacher", "_eval_teacher"):
            if name == "eval_generator" and getattr(self, name, None) is getattr(self, "generator", None):
                continue
            close = getattr(getattr(self, name, None), "close", None)
            if callable(close):
                closers.append(close)
        errors = []
        for close in closers:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - report the first after closing the rest
                errors.append(exc)
        if errors:
            raise errors[0]


def _transport(cfg: RunConfig, learner: Learner, generator: Any):
    from correction_rl.weights.sync import InProcessSync

    return InProcessSync([generator], timeout_s=cfg.sync.timeout_s, source=learner,
                         bucket_bytes=int(cfg.sync.bucket_mb * 2**20))


def run(cfg: RunConfig) -> RunResult:
    """Train ``cfg`` in this process, through the shared run lifecycle (``run_session``)."""
    return run_session(cfg, lambda run_dir: InProcessSession(cfg, run_dir.path))
