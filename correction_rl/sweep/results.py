"""``SWEEP_DIR/results.jsonl``: one row per finished trial, and nothing else.

A row is appended with one ``write`` of the whole line on a file opened ``O_APPEND``, then
``fsync``: a crash can at worst leave a *torn last line* (a prefix of a row, no newline). Readers
skip and report it (``ResultsFile.torn``); before the next append the sweep moves it aside to
``results.jsonl.torn-<time>`` and truncates the file to its last complete line, so the next row
never glues onto a fragment. Each trial appears at most once: the runner appends a row only for
a trial without one, and ``--retry-failed`` first *rewrites* the file without the failed rows
(to a temporary file, fsync'ed, then renamed over it), keeping them in ``failed_attempts.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT = "correction-rl/sweep-result"
VERSION = 1
Status = Literal["ok", "failed", "timeout"]
STATUSES = ("ok", "failed", "timeout")


@dataclass(frozen=True)
class EvalPoint:
    """One held-out evaluation during a trial: where it was (step, teacher calls so far) and
    its metrics (``greedy/correction_rate``, ``sampled/kl``, ...)."""

    step: int
    teacher_calls: float | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class TrialResult:
    """One row of ``results.jsonl``."""

    trial_id: str
    arm: str
    condition: str
    seed: int
    overrides: dict[str, Any]
    digest: str
    status: Status
    wall_s: float
    error: str | None = None
    """The last lines of the trial's output (failed), or what timed out."""
    exit_code: int | None = None
    teacher_calls: float | None = None
    """Rollouts sent to the teacher over the run (``collect.teacher_calls`` says how counted)."""
    before: dict[str, float | None] = field(default_factory=dict)
    """``eval_before.json`` as ``{"greedy/correction_rate": ..., "sampled/kl": ...}``."""
    after: dict[str, float | None] = field(default_factory=dict)
    history: list[EvalPoint] = field(default_factory=list)
    """Every evaluation in ``metrics.jsonl`` (before, during and after training)."""
    run_dir: str = ""
    host: str = ""
    finished_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "TrialResult":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in row.items() if k in names}
        kwargs["history"] = [EvalPoint(**p) for p in row.get("history") or []]
        if kwargs.get("status") not in STATUSES:
            raise ValueError(f"status {kwargs.get('status')!r} is not one of {STATUSES}")
        return cls(**kwargs)


@dataclass
class ResultsFile:
    """What ``read_results`` found."""

    rows: list[TrialResult]
    torn: str | None = None
    """A last line without its newline that is not a complete row (a write cut by a crash)."""
    bad_lines: list[int] = field(default_factory=list)
    """1-based numbers of other lines that are not a valid row (skipped)."""
    duplicates: list[str] = field(default_factory=list)
    """Trial ids found on more than one line (the first row is kept)."""

    @property
    def notes(self) -> list[str]:
        out = []
        if self.torn is not None:
            out.append(f"results.jsonl: skipped a torn last line ({len(self.torn)} bytes, a write cut short)")
        if self.bad_lines:
            out.append(f"results.jsonl: skipped {len(self.bad_lines)} line(s) that are not a result row "
                       f"(line {', '.join(map(str, self.bad_lines[:10]))})")
        if self.duplicates:
            out.append(f"results.jsonl: trial(s) on more than one line, first row kept: {', '.join(self.duplicates)}")
        return out

    def by_id(self) -> dict[str, TrialResult]:
        return {r.trial_id: r for r in self.rows}


def read_results(path: str | Path) -> ResultsFile:
    """Read ``results.jsonl`` (missing: no rows). Never raises for a torn or bad line."""
    path = Path(path)
    if not path.exists():
        return ResultsFile([])
    data = path.read_bytes()
    out = ResultsFile([])
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    seen: set[str] = set()
    for number, raw in enumerate(lines + ([tail] if tail else []), start=1):
        if not raw.strip():
            continue
        try:
            row = TrialResult.from_json(json.loads(raw.decode("utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError):
            if tail and number == len(lines) + 1:
                out.torn = raw.decode("utf-8", errors="replace")
            else:
                out.bad_lines.append(number)
            continue
        if row.trial_id in seen:
            out.duplicates.append(row.trial_id)
            continue
        seen.add(row.trial_id)
        out.rows.append(row)
    return out


def repair_tail(path: str | Path) -> Path | None:
    """Make the file end at a complete line before appending: bytes after the last newline (a
    torn write) move to ``<path>.torn-<time>``, whose path is returned."""
    path = Path(path)
    if not path.exists():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    cut = data.rfind(b"\n") + 1
    aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.write_bytes(data[cut:])
    with open(path, "r+b") as fh:
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())
    return aside


def append_row(path: str | Path, result: TrialResult) -> None:
    """Append one row durably: a single write of the whole line, then fsync."""
    line = (json.dumps(result.to_json(), sort_keys=False, allow_nan=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):  # a short write on a regular file means the disk is full
            raise OSError(f"{path}: short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite(path: str | Path, rows: list[TrialResult]) -> None:
    """Replace the file's rows atomically (temporary file, fsync, rename, fsync the directory)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row.to_json(), allow_nan=False, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
