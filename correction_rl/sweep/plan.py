"""The sweep directory, and which trials a (re)started sweep still has to run.

```
SWEEP_DIR/
  .lock              flock'ed by the one sweep driving this directory (holds its pid)
  spec.yaml          the spec this directory runs (rewritten by --resume with a new spec)
  results.jsonl      one row per finished trial (results.py)
  failed_attempts.jsonl   rows --retry-failed took out of results.jsonl, kept for the record
  configs/<id>.yaml  each trial's resolved run config (`correction-rl train --config` reruns it)
  trials/<id>/       each trial's run directory (docs/run_directory.md)
  logs/<id>.log      each trial's stdout + stderr
  stale/<id>-<time>/ run directories of trials that were running when a sweep was interrupted
  report.md, report/ written by `correction-rl report SWEEP_DIR`
```

Resume rules (``plan``): a trial with a row is done, unless ``retry_failed`` and its row is not
``ok``; a trial without a row runs, and a run directory it left (the sweep was killed while it
ran) is moved to ``stale/`` first, so every trial that runs starts from a clean directory. A
row whose digest differs from the trial the spec now describes is refused (the spec or the base
config changed under the same trial id): mixing the two would silently compare different runs.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from correction_rl.errors import UserError
from correction_rl.sweep.results import TrialResult, append_row, read_results, repair_tail, rewrite
from correction_rl.sweep.spec import SpecError
from correction_rl.sweep.trials import Trial

SPEC_FILE = "spec.yaml"
RESULTS_FILE = "results.jsonl"
HELD_WAIT_S = 30.0
"""How long a resumed sweep waits for an interrupted trial's run to release its directory."""


class SweepDirectoryError(RuntimeError, UserError):
    """The sweep directory is in use, or a trial's run directory is still held by a process."""


@dataclass(frozen=True)
class SweepDir:
    root: Path

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def spec(self) -> Path:
        return self.root / SPEC_FILE

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def run_dir(self, trial_id: str) -> Path:
        return self.trials / trial_id

    def log(self, trial_id: str) -> Path:
        return self.root / "logs" / f"{trial_id}.log"

    def config(self, trial_id: str) -> Path:
        return self.root / "configs" / f"{trial_id}.yaml"

    def lock(self) -> int:
        """Take the directory's lock (released by the kernel when the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SweepDirectoryError(f"{self.root} is in use by another sweep (pid {holder}); "
                                      "wait for it or choose another --sweep-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd


def is_sweep_dir(path: str | Path) -> bool:
    """A directory a sweep made: it holds the spec (``correction-rl report`` dispatches on this)."""
    return (Path(path) / SPEC_FILE).is_file()


@dataclass
class Plan:
    todo: list[Trial]
    done: list[TrialResult]
    retried: list[str] = field(default_factory=list)
    moved: list[tuple[str, Path]] = field(default_factory=list)
    """(trial id, where its stale run directory went)."""
    notes: list[str] = field(default_factory=list)


def _held(run_dir: Path) -> str | None:
    """The pid holding a run directory's lock, or None when no live process holds it."""
    lock = run_dir / ".lock"
    if not lock.exists():
        return None
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)
    return None


def move_aside(sweep: SweepDir, trial_id: str) -> Path | None:
    run_dir = sweep.run_dir(trial_id)
    if not run_dir.exists():
        return None
    deadline = time.monotonic() + HELD_WAIT_S  # a killed sweep's runs die with their workers, shortly
    while (holder := _held(run_dir)) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    if holder is not None:
        raise SweepDirectoryError(f"{run_dir} is in use by a train (pid {holder}), left from an earlier "
                                  "sweep: stop it before resuming")
    stale = sweep.root / "stale"
    stale.mkdir(exist_ok=True)
    aside = stale / f"{trial_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        aside = stale / f"{trial_id}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    run_dir.rename(aside)
    return aside


def plan(sweep: SweepDir, trials: list[Trial], retry_failed: bool = False) -> Plan:
    """Decide what runs (module docstring), repairing a torn last row and applying
    ``retry_failed``; raises ``SpecError`` when a row no longer matches its trial."""
    notes = []
    torn = repair_tail(sweep.results)
    if torn is not None:
        notes.append(f"results.jsonl ended in a torn line (a write cut short): moved it to {torn}")
    found = read_results(sweep.results)
    notes += [n for n in found.notes if "torn" not in n]
    rows = found.by_id()
    wanted = {t.trial_id: t for t in trials}
    for trial_id, row in rows.items():
        trial = wanted.get(trial_id)
        if trial is not None and row.digest != trial.digest:
            raise SpecError(f"{sweep.results}: trial {trial_id} finished with other settings than the spec now "
                            f"gives it (digest {row.digest} != {trial.digest}: the spec or its base config "
                            "changed); use a new --sweep-dir, or delete that row to rerun it")
    extra = sorted(set(rows) - set(wanted))
    if extra:
        notes.append(f"{len(extra)} row(s) in results.jsonl belong to trials this spec no longer has "
                     f"(kept): {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    retried = []
    if retry_failed:
        retried = [i for i, r in rows.items() if r.status != "ok" and i in wanted]
        if retried:
            for trial_id in retried:
                append_row(sweep.root / "failed_attempts.jsonl", rows[trial_id])
            rewrite(sweep.results, [r for r in found.rows if r.trial_id not in retried])
            for trial_id in retried:
                del rows[trial_id]
    todo = [t for t in trials if t.trial_id not in rows]
    moved = [(t.trial_id, p) for t in todo if (p := move_aside(sweep, t.trial_id)) is not None]
    done = [rows[t.trial_id] for t in trials if t.trial_id in rows]
    return Plan(todo=todo, done=done, retried=retried, moved=moved, notes=notes)
