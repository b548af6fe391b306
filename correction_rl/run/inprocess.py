"""The in-process driver: the reference algorithm, one readable function per phase.

    act      generator.generate(prompts)           -> rollouts (y, policy version)
    correct  teacher.correct(rollouts)             -> corrections (y')
    store    make_pairs -> attach_reference -> buffer.add (durable log first)
    learn    buffer.sample -> learner.train_step   -> StepStats
    sync     flatten_to_buckets -> sync.publish    -> generators at the new version
    log      every component's metrics -> sinks

Everything runs in one process, without Ray: this is what tests and debugging use, and what the
distributed driver (correction_rl.distributed) parallelises without changing the phases.
"""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from correction_rl.buffer.replay import ReplayBuffer
from correction_rl.run.components import (
    buffer_config,
    build_eval_teacher,
    build_generator,
    build_sink,
    build_teacher,
    eval_modes,
    load_prompts,
    rollout_sampling,
)
from correction_rl.run.checkpoint import Checkpoint, CheckpointError, check_compatible, latest_valid, save_checkpoint
from correction_rl.config import RunConfig, dump_config, to_dict
from correction_rl.buffer.correction_log import CorrectionLog
from correction_rl.observe.diffs import maybe_log_corrections
from correction_rl.run.evaluation import EvalMetrics, EvalReport, evaluate
from correction_rl.learner.learner import Learner
from correction_rl.observe.metrics import MetricSink
from correction_rl.models import load_model, load_tokenizer
from correction_rl.pairs.make import make_pairs, rollout_pair_id
from correction_rl.prompts.stream import PromptStream
from correction_rl.rollout.base import Generator
from correction_rl.weights.sync import InProcessSync, SyncReport, flatten_to_buckets
from correction_rl.teachers.base import Teacher
from correction_rl.types import Prompt


@dataclass
class System:
    """The components of one in-process run, built once from the config."""

    cfg: RunConfig
    run_dir: Path
    tokenizer: Any
    generator: Generator
    teacher: Teacher
    learner: Learner
    buffer: ReplayBuffer
    sync: InProcessSync
    sink: MetricSink
    train_prompts: PromptStream
    eval_prompts: list[Prompt]
    init_model: Any
    """The starting policy, frozen: the KL(pi || pi_init) estimate of evaluation scores against it."""
    rng: random.Random
    counters: dict[str, float] = field(default_factory=dict)

    def count(self, key: str, amount: float = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + amount


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    before: EvalReport
    after: EvalReport

    COLUMNS = ("accuracy", "correction_rate", "mean_edit_distance", "mean_normalized_edit_distance", "kl")

    def comparison_table(self) -> str:
        """Held-out correction metrics before and after training, one row per decoding mode."""
        head = f"{'held-out':<16}" + "".join(f"{c:>15}" for c in ("accuracy", "corr. rate", "edit dist", "norm. edit", "KL"))
        lines = [head]
        for mode in self.after.modes:
            for label, report in ((f"{mode} before", self.before), (f"{mode} after", self.after)):
                metrics = report.modes.get(mode)
                cells = [getattr(metrics, c, None) if metrics else None for c in self.COLUMNS]
                lines.append(f"{label:<16}" + "".join(f"{v:>15.3f}" if v is not None else f"{'-':>15}" for v in cells))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Building


def build_system(cfg: RunConfig, wandb_resume_id: str | None = None) -> System:
    """``wandb_resume_id``: continue this W&B run (a resumed run's charts carry on)."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model.path)
    train, held_out = load_prompts(cfg)
    generator = build_generator(cfg)
    learner = Learner(
        load_model(cfg.model.path),
        pad_id=tokenizer.pad_token_id,
        learner_cfg=cfg.learner,
        objective_cfg=cfg.objective,
        model_cfg=cfg.model,
        total_steps=cfg.total_steps,
    )
    log = CorrectionLog(run_dir / "corrections.jsonl", meta={"run": cfg.name})
    return System(
        cfg=cfg,
        run_dir=run_dir,
        tokenizer=tokenizer,
        generator=generator,
        teacher=build_teacher(cfg),
        learner=learner,
        buffer=ReplayBuffer(buffer_config(cfg), log),
        sync=InProcessSync([generator], timeout_s=cfg.sync.timeout_s),
        sink=build_sink(cfg, run_dir, resume_id=wandb_resume_id),
        train_prompts=PromptStream(train, cfg.seed),
        eval_prompts=held_out,
        init_model=load_model(cfg.model.path).eval(),
        rng=random.Random(cfg.seed),
    )


# ---------------------------------------------------------------------------------------------
# The phases


def act_correct_store(system: System) -> dict[str, float]:
    """One batch of prompts through generator and teacher into the buffer."""
    cfg = system.cfg
    prompts = system.train_prompts.next_batch(cfg.rollout.batch_size)
    t0 = time.perf_counter()
    rollouts = system.generator.generate(prompts, rollout_sampling(cfg, system.rng.randrange(2**31)))
    t1 = time.perf_counter()
    log = system.buffer.log
    if log is not None:  # a resumed run: never ask the teacher again for a logged correction
        fresh = [r for r in rollouts if rollout_pair_id(r) not in log]
        if len(fresh) < len(rollouts):
            system.count("resume/corrections_reused", len(rollouts) - len(fresh))
        rollouts = fresh
    corrections = system.teacher.correct(rollouts) if rollouts else []
    t2 = time.perf_counter()
    pairs, skipped = make_pairs(corrections, system.tokenizer, system.tokenizer.eos_token_id)
    pairs = system.learner.attach_reference(pairs)
    added = system.buffer.add(pairs)
    for reason, n in skipped.items():
        system.count(f"teacher/skipped/{reason}", n)
    tokens = sum(len(r.response_ids) for r in rollouts)
    return {
        "rollout/seconds": t1 - t0,
        "rollout/tokens_per_s": tokens / max(t1 - t0, 1e-9),
        "rollout/mean_response_tokens": tokens / max(1, len(rollouts)),
        "teacher/seconds": t2 - t1,
        "teacher/pairs_per_s": len(pairs) / max(t2 - t1, 1e-9),
        "teacher/noop_rate": sum(p.is_noop for p in pairs) / max(1, len(pairs)),
        "teacher/mean_edit_distance": sum(p.edit_distance for p in pairs) / max(1, len(pairs)),
        "buffer/admitted": float(added.admitted),
    }


def learn(system: System) -> dict[str, float] | None:
    """Sample one step's pairs (collecting more first if needed) and apply one update."""
    cfg, learner = system.cfg, system.learner
    n = cfg.learner.micro_batch_pairs * cfg.learner.grad_accum
    collect: dict[str, float] = {}
    for _ in range(100):
        pairs = system.buffer.sample(n, learner.version, system.rng)
        if pairs is not None:
            break
        collect = act_correct_store(system)
    else:
        raise RuntimeError(
            f"the buffer gave no batch of {n} pairs after 100 collection rounds; check "
            "buffer.min_fresh_pairs / max_staleness and the teacher's rejection counters"
        )
    stats = learner.train_step(pairs)
    maybe_log_corrections(system.sink, pairs, system.tokenizer, learner.version, cfg)  # W&B table (diffs.py)
    return {**collect, **stats.as_metrics()}


def sync_weights(system: System) -> SyncReport:
    learner = system.learner
    update = flatten_to_buckets(
        learner.named_weights(), learner.version, system.cfg.sync.bucket_mb * 2**20
    )
    return system.sync.publish(update)


def held_out_eval(system: System) -> EvalReport:
    """Greedy (and sampled) held-out metrics of the generator's current weights, with the KL
    estimate against the starting policy."""
    cfg = system.cfg
    return evaluate(
        system.generator,
        system.eval_prompts,
        system.teacher if cfg.eval.teacher == "run" else build_eval_teacher(cfg),
        rollout_sampling(cfg, seed=cfg.seed),
        policy_model=system.learner.model,
        init_model=system.init_model,
        tokenizer=system.tokenizer,
        modes=eval_modes(cfg),
    )


def save_report(report: EvalReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")


def load_report(path: Path) -> EvalReport:
    """Read back what ``save_report`` wrote (a resumed run keeps its "before" numbers)."""
    raw = json.loads(Path(path).read_text())
    return EvalReport(
        modes={m: EvalMetrics(**v) for m, v in raw["modes"].items()},
        by_task={m: {t: EvalMetrics(**v) for t, v in tasks.items()} for m, tasks in raw["by_task"].items()},
        policy_version=raw.get("policy_version"),
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint / resume (docs/reliability.md)


class RunInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after the current step; a checkpoint was written."""

    def __init__(self, signame: str, step: int, checkpoint: Path | None):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        super().__init__(
            f"{signame}: stopped after learner step {step}; checkpoint {checkpoint} "
            f"(resume with `correction-rl train --resume {checkpoint.parent.parent if checkpoint else '<run_dir>'}`)"
        )


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (the first one); a second
    one interrupts at once (KeyboardInterrupt). Installed only in the main thread."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: finishing the current step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def find_checkpoint(cfg: RunConfig) -> Checkpoint | None:
    """The checkpoint a run with ``cfg`` resumes from (None: start at step 0). Newer checkpoints
    that fail verification are reported and skipped; an incompatible config raises
    ``ConfigMismatch`` naming the fields."""
    if cfg.checkpoint.resume == "never":
        return None
    ckpt, rejected = latest_valid(cfg.run_dir)
    for bad in rejected:
        msg = f"skipping unusable checkpoint {bad.path}: {bad.reason}"
        print(f"warning: {msg}", file=sys.stderr, flush=True)
    if ckpt is None:
        if rejected:
            raise CheckpointError(
                f"{cfg.run_dir}: no checkpoint verifies ({len(rejected)} rejected, see above); "
                "move the checkpoints directory away to start over, or set checkpoint.resume=never"
            )
        return None
    check_compatible(ckpt, to_dict(cfg))
    return ckpt


def _wandb_run_id(sink: Any) -> str | None:
    for s in getattr(sink, "sinks", [sink]):
        if getattr(s, "run_id", None):
            return s.run_id
    return None


def write_checkpoint(system: System) -> Path:
    """Everything an exact resume needs, atomically (checkpoint.save_checkpoint)."""
    version, internal, gauss = system.rng.getstate()
    state = {
        "version": system.learner.version,
        "prompt_stream": system.train_prompts.state_dict(),
        "buffer": system.buffer.state_dict(),
        "rng": [version, list(internal), gauss],
        "counters": dict(system.counters),
        "wandb_run_id": _wandb_run_id(system.sink),
        "generator_version": getattr(system.generator, "policy_version", None),
    }
    return save_checkpoint(
        system.run_dir, system.learner.version, state, to_dict(system.cfg),
        write_files=lambda d: system.learner.save_state(d / "learner"),
        keep=system.cfg.checkpoint.keep,
    )


def restore(system: System, ckpt: Checkpoint) -> dict[str, float]:
    """Load ``ckpt`` into a freshly built system; returns resume metrics. Pairs logged after the
    checkpoint (teacher work done before the crash) go into the buffer, not to the teacher again."""
    state = ckpt.state
    system.learner.load_state(ckpt.path / "learner")
    if system.learner.version != state["version"]:
        raise CheckpointError(f"{ckpt.path}: learner version {system.learner.version} != state {state['version']}")
    system.train_prompts.load_state_dict(state["prompt_stream"])
    after = system.buffer.load_state_dict(state["buffer"])
    # their pairs are back in the buffer: do not draw those prompts again (a regenerated
    # rollout differs once the policy moved on, so the pair-id check below would not catch it)
    system.train_prompts.account_for_logged(after.prompts_logged_after)
    v, internal, gauss = state["rng"]
    system.rng.setstate((v, tuple(internal), gauss))
    system.counters = {k: float(x) for k, x in state["counters"].items()}
    sync_weights(system)  # the generator serves the restored policy
    system.count("resume/count")
    return {
        "resume/from_step": float(ckpt.step),
        "resume/pairs_logged_after_checkpoint": float(after.logged),
        "resume/pairs_admitted_after_checkpoint": float(after.admitted),
        "resume/buffer_size": float(len(system.buffer)),
        "resume/prompts_skipped": float(sum(system.train_prompts.state.skip.values())),
    }


def run(cfg: RunConfig) -> RunResult:
    """act -> correct -> store -> learn -> sync -> log, until ``total_steps`` updates.

    Resumes from the newest valid checkpoint in the run directory (``checkpoint.resume``),
    writes one every ``checkpoint.every_steps`` steps and at the end; SIGINT/SIGTERM finish the
    current step, write a checkpoint, close the sinks and raise ``RunInterrupted``."""
    ckpt = find_checkpoint(cfg)
    system = build_system(cfg, wandb_resume_id=ckpt.state.get("wandb_run_id") if ckpt else None)
    try:
        with StopSignals() as stop:
            before_path = system.run_dir / "eval_before.json"
            if ckpt is not None and before_path.exists():
                before = load_report(before_path)
            else:  # the generator still holds the starting weights here
                before = held_out_eval(system)
                save_report(before, before_path)
                system.sink.log(before.as_metrics(), step=0)
            resume_metrics: dict[str, float] = {}
            if ckpt is not None:
                resume_metrics = restore(system, ckpt)
                print(f"resumed from {ckpt.path} at step {ckpt.step} "
                      f"({int(resume_metrics['resume/pairs_logged_after_checkpoint'])} pairs logged after it, "
                      f"buffer {int(resume_metrics['resume/buffer_size'])})", file=sys.stderr, flush=True)
            every = cfg.checkpoint.every_steps
            while system.learner.version < cfg.total_steps:
                metrics = learn(system)
                step = system.learner.version
                if step % cfg.sync.every_steps == 0 or step == cfg.total_steps:
                    metrics.update(sync_weights(system).as_metrics())
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.total_steps:
                    metrics.update(held_out_eval(system).as_metrics())
                metrics.update(system.buffer.stats().as_metrics())
                metrics.update(system.counters)
                metrics.update(resume_metrics)
                resume_metrics = {}
                teacher_metrics = getattr(system.teacher, "metrics", None)
                if callable(teacher_metrics):  # LLM teachers: latency, tokens, rejections by reason
                    metrics.update(teacher_metrics())
                if stop.received or (every and step % every == 0 and step < cfg.total_steps):
                    t0 = time.perf_counter()
                    path = write_checkpoint(system)
                    metrics["checkpoint/seconds"] = time.perf_counter() - t0
                    metrics["checkpoint/step"] = float(step)
                    if stop.received:
                        system.sink.log(metrics, step=step)
                        raise RunInterrupted(stop.received, step, path)
                system.sink.log(metrics, step=step)
            after = held_out_eval(system)
            save_report(after, system.run_dir / "eval_after.json")
            system.sink.log(after.as_metrics(), step=system.learner.version)
            system.learner.save_pretrained(system.run_dir / "policy")
            write_checkpoint(system)
            return RunResult(system.run_dir, system.learner.version, before, after)
    finally:
        system.sink.close()
        system.buffer.close() if hasattr(system.buffer, "close") else None
        close = getattr(system.generator, "close", None)
        if close:
            close()
        close_teacher = getattr(system.teacher, "close", None)
        if close_teacher:
            close_teacher()
