"""The run lifecycle both drivers share: everything around the step loop.

A driver (the in-process loop, ``run/inprocess.py``; the Ray driver, ``distributed/``) only
says how to evaluate, restore, train, save and close (the ``Session`` Protocol).
``run_session`` does the rest, in this order, the same in every mode:

1. take the run directory's lock, before writing anything (``run/directory.py``);
2. apply ``checkpoint.resume``: the verified checkpoints, newest first; or, for a start at step
   0 in a directory holding an old run, ``checkpoint.on_existing`` (refuse by default);
3. a fresh start writes ``config.yaml``; start the session;
4. evaluate before training (a resume reads ``eval_before.json`` instead), then restore the
   newest checkpoint that CAN be restored: one that fails (a state of the wrong shape, a buffer
   state that disagrees with the correction log) is reported on stderr in one line and the next
   older one is tried, exactly like one with a bad hash. A resume writes ``config.yaml`` only
   once a checkpoint restored, so a failed resume leaves the run's config as it was;
5. open the metric sink (continuing the checkpoint's W&B run), train, evaluate after, save the
   policy and a final checkpoint; close everything, and remove a run directory this call
   created if a failure left nothing in it.

The typed checkpoint state (``RunState``), resume metrics (``ResumeReport``), stop signals and
the bounded "sample, else collect one more round" helper live in ``run/state.py`` and are
re-exported here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from correction_rl.buffer.replay import BufferStateError
from correction_rl.config import RunConfig, dump_config, to_dict
from correction_rl.models import copy_tokenizer
from correction_rl.run.checkpoint import Checkpoint, CheckpointError, check_compatible, list_checkpoints, verify
from correction_rl.run.directory import RunDirectory, RunDirectoryError
from correction_rl.run.evaluation import EvalMetrics, EvalReport
from correction_rl.run.state import (
    MAX_COLLECTION_ROUNDS,
    NoBatchError,
    ResumeReport,
    RunInterrupted,
    RunState,
    StopSignals,
    sample_or_collect,
)

__all__ = [
    "MAX_COLLECTION_ROUNDS", "NoBatchError", "ResumeReport", "RunDirectory", "RunDirectoryError",
    "RunInterrupted", "RunResult", "RunState", "Session", "StopSignals", "find_checkpoints",
    "load_report", "restore_newest", "run_session", "sample_or_collect", "save_report", "wandb_run_id",
]

RESTORE_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, BufferStateError, FileNotFoundError)
"""What makes a verified checkpoint unrestorable (reported, then the next older one is tried): a
state of the wrong shape or a learner version that does not match (``CheckpointError``), a
buffer state that disagrees with the correction log (``BufferStateError``: a torn log after a
kill), a file of it that is gone. Deliberately narrow: a timeout while restoring (a slow engine,
a slow DeepSpeed load) says nothing about the checkpoint, and falling back then would silently
drop the newer checkpoint's steps; a ``TypeError`` or ``KeyError`` is a bug and keeps its
traceback. ``ConfigMismatch`` is not among them in effect: it is raised before restoring, since
an older checkpoint of the same run would not fit the config either."""


class Session(Protocol):
    """What a driver provides; ``run_session`` calls it in the order of the module docstring."""

    version: int
    """Learner steps done (the policy version)."""

    def evaluate(self) -> EvalReport: ...

    def restore(self, ckpt: Checkpoint) -> ResumeReport:
        """Load ``ckpt`` (its ``RunState.of(ckpt)``) and push the restored weights to the engines;
        may be called again with an older checkpoint after raising one of ``RESTORE_ERRORS``."""
        ...

    def train(self, sink: Any, resume: ResumeReport | None, wandb_run_id: str | None) -> None:
        """Run to ``total_steps``; raise ``RunInterrupted`` after a checkpoint on SIGINT/SIGTERM."""
        ...

    def save_policy(self, path: Path) -> None: ...

    def write_checkpoint(self, wandb_run_id: str | None) -> Path: ...

    def close(self) -> None: ...


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
# Evaluation reports, W&B id


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


def wandb_run_id(sink: Any) -> str | None:
    """The W&B run id of a sink (a ``MultiSink``'s W&B member), for the checkpoint."""
    for s in getattr(sink, "sinks", [sink]):
        if getattr(s, "run_id", None):
            return s.run_id
    return None


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Choosing and restoring a checkpoint


def find_checkpoints(cfg: RunConfig) -> list[Checkpoint]:
    """The checkpoints a run with ``cfg`` may resume from, newest first, each verified (hashes,
    manifest shape); ones that fail are reported on stderr and left out. Empty: start at step 0.
    Raises ``CheckpointError`` when checkpoints exist but none verifies, and ``ConfigMismatch``
    (naming the fields) when the newest cannot be resumed under this config."""
    if cfg.checkpoint.resume == "never":
        return []
    found, rejected = [], 0
    for path in reversed(list_checkpoints(cfg.run_dir)):
        try:
            found.append(verify(path))
        except (CheckpointError, OSError) as exc:
            rejected += 1
            _warn(f"skipping unusable checkpoint {path}: {exc}")
    if not found and rejected:
        raise CheckpointError(
            f"{cfg.run_dir}: no checkpoint verifies ({rejected} rejected, see above); move the "
            "checkpoints directory away to start over, or set checkpoint.resume=never"
        )
    if found:
        check_compatible(found[0], to_dict(cfg))
    return found


def restore_newest(session: Session, candidates: list[Checkpoint], cfg: RunConfig) -> tuple[Checkpoint, ResumeReport]:
    """Restore the newest of ``candidates`` that restores; each that does not is reported in one
    line and the next older one is tried. ``CheckpointError`` when none does."""
    now = to_dict(cfg)
    last: BaseException | None = None
    for ckpt in candidates:
        check_compatible(ckpt, now)
        try:
            return ckpt, session.restore(ckpt)
        except RESTORE_ERRORS as exc:
            last = exc
            reason = " ".join(str(exc).split()) or type(exc).__name__
            _warn(f"skipping unusable checkpoint {ckpt.path}: cannot restore it ({type(exc).__name__}: {reason})")
    raise CheckpointError(
        f"{cfg.run_dir}: no checkpoint could be restored ({len(candidates)} tried, see above); move the "
        "checkpoints directory away to start over, or set checkpoint.resume=never"
    ) from last


# ---------------------------------------------------------------------------------------------
# The lifecycle


def run_session(cfg: RunConfig, start: Callable[[RunDirectory], Session]) -> RunResult:
    """Run ``cfg`` with the driver ``start`` builds in the locked run directory (a resume hands
    it the checkpoint later, through ``Session.restore``); see the module docstring."""
    from correction_rl.run.components import build_sink

    run_dir = RunDirectory.open(cfg.run_dir)
    try:
        candidates = find_checkpoints(cfg)
        if not candidates:
            run_dir.make_room(cfg.checkpoint.on_existing)
            dump_config(cfg, run_dir.path / "config.yaml")  # a resume keeps the old one until it restored
        session = start(run_dir)
        sink = None
        try:
            before_path = run_dir.path / "eval_before.json"
            fresh_before = not (candidates and before_path.exists())
            if fresh_before:  # the engines still hold the starting weights here
                before = session.evaluate()
                save_report(before, before_path)
            else:
                before = load_report(before_path)
            ckpt, resume = restore_newest(session, candidates, cfg) if candidates else (None, None)
            wandb_id = RunState.of(ckpt).wandb_run_id if ckpt is not None else None
            sink = build_sink(cfg, run_dir.path, resume_id=wandb_id)
            wandb_id = wandb_id or wandb_run_id(sink)
            if fresh_before:
                sink.log(before.as_metrics(), step=0)
            if ckpt is not None and resume is not None:
                dump_config(cfg, run_dir.path / "config.yaml")
                print(resume.summary(ckpt.path), file=sys.stderr, flush=True)
            session.train(sink, resume, wandb_id)
            after = session.evaluate()
            save_report(after, run_dir.path / "eval_after.json")
            sink.log(after.as_metrics(), step=session.version)
            session.save_policy(run_dir.path / "policy")
            copy_tokenizer(cfg.model.path, run_dir.path / "policy")
            session.write_checkpoint(wandb_id)
            return RunResult(run_dir.path, session.version, before, after)
        finally:
            try:
                if sink is not None:
                    sink.close()
            finally:
                session.close()
    except BaseException:
        run_dir.remove_if_empty()
        raise
    finally:
        run_dir.release()
