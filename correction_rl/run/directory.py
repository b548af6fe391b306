"""A run directory, held by one ``train`` at a time, and what a fresh start does to an old one.

Why the lock comes first: everything a run writes (``config.yaml``, the correction log, the
metrics, checkpoints) belongs to the one process driving it. A second ``train`` on a live run
directory must fail before it writes anything, or it silently edits the live run (a later
``--resume`` would read the second run's ``config.yaml``). The lock is an exclusive ``flock`` on
``<run_dir>/.lock``, held until the run ends and released by the kernel if the process dies, so
a crashed run never leaves a stale lock behind. The file stays (deleting a lock file races with
a process that is opening it); it holds the pid of the last holder, for the error message.

Why a fresh start refuses an old run's data: a run that starts at step 0 in a directory that
holds another run's correction log would treat the old pairs as its own (their rollouts are
neither corrected nor trained on), append a second step 0 to ``metrics.jsonl`` and mix two
runs' records. So it must be told what to do (``checkpoint.on_existing``): ``refuse`` (the
default, a one-line error), ``overwrite`` (delete the old files) or ``move_aside`` (move them
to ``<run_dir>.old-<time>`` next to it), and it says which it did.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal
from correction_rl.errors import UserError

LOCK = ".lock"
SCAFFOLD = {LOCK, "config.yaml", "config.yaml.partial"}
"""Files that do not make a directory hold a run's data: the lock and the config (rewritten by
every start)."""

OnExisting = Literal["refuse", "overwrite", "move_aside"]


class RunDirectoryError(RuntimeError, UserError):
    """The run directory is in use by another process, or holds data a fresh start would mix
    with its own (one readable line; ``train`` exits with code 2)."""


def _holds_data(path: Path) -> bool:
    """True unless ``path`` is scaffolding: the lock, the config, an empty file, a correction
    log without records, or a directory of only such things."""
    if path.is_symlink() or not path.exists():
        return path.is_symlink()
    if path.is_dir():
        return any(_holds_data(p) for p in path.iterdir())
    if path.name in SCAFFOLD or path.stat().st_size == 0:
        return False
    if path.name == "corrections.jsonl":
        from correction_rl.buffer.correction_log import CorrectionLogError, scan

        try:
            return scan(path).records > 0
        except (CorrectionLogError, OSError, ValueError):
            return True
    return True


class RunDirectory:
    """``<output_dir>/<name>``, locked by this process for the lifetime of a run."""

    def __init__(self, path: Path, created: bool, lock_fd: int):
        self.path = path
        self.created = created
        """This process made the directory (so it may remove it again if it stays empty)."""
        self._fd: int | None = lock_fd

    @classmethod
    def open(cls, path: str | Path) -> "RunDirectory":
        """Create ``path`` if needed and take its lock, or raise ``RunDirectoryError`` naming
        the process that holds it. Nothing else is written."""
        path = Path(path)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirectoryError(f"cannot create the run directory {path}: {exc.strerror or exc}") from None
        if not path.is_dir():
            raise RunDirectoryError(f"{path} exists and is not a directory")
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirectoryError(
                f"{path} is in use by another train (pid {holder}); wait for it to finish, stop it, "
                "or choose another --name / --output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, created, fd)

    # ------------------------------------------------------------------------------------------
    def holds_data(self) -> bool:
        """Anything but scaffolding (``_holds_data``) inside: a previous run's files."""
        return any(_holds_data(p) for p in self.path.iterdir() if p.name != LOCK)

    def make_room(self, on_existing: str) -> None:
        """A fresh start (step 0) in a directory that holds a previous run's data: refuse, or
        clear it as ``on_existing`` says, and say on stderr what was done."""
        if self._pending_move_aside():  # a move_aside a kill interrupted: finish it first
            print(f"note: finished moving the previous run's files to {self._move_aside()}", file=sys.stderr, flush=True)
        if not self.holds_data():
            return
        found = sorted(p.name for p in self.path.iterdir() if p.name != LOCK and _holds_data(p))
        if on_existing == "overwrite":
            for p in self.path.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            print(f"note: deleted the previous run's files in {self.path} ({', '.join(found)}); "
                  "checkpoint.on_existing=overwrite", file=sys.stderr, flush=True)
        elif on_existing == "move_aside":
            aside = self._move_aside()
            print(f"note: moved the previous run's files from {self.path} to {aside}; "
                  "checkpoint.on_existing=move_aside", file=sys.stderr, flush=True)
        elif on_existing == "refuse":
            raise RunDirectoryError(
                f"{self.path} holds a previous run ({', '.join(found)}) and this run starts at step 0 "
                "(checkpoint.resume=never, or no checkpoint to resume); a fresh start would mix the two "
                "runs: set checkpoint.on_existing=overwrite or move_aside, resume it, or choose another --name"
            )
        else:
            raise RunDirectoryError(f"checkpoint.on_existing={on_existing!r}: expected refuse, overwrite or move_aside")

    def _pending_move_aside(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{glob.escape(self.path.name)}.old-*.partial"))

    def _move_aside(self) -> Path:
        """Move every file but the lock into a sibling ``NAME.old-<time>``, all or nothing as
        seen from outside: the files go into ``NAME.old-<time>.partial`` first, which is renamed
        when all are in. A move that was interrupted (a kill) left that ``.partial`` behind; the
        next one finishes it, so the previous run is never split over two directories."""
        pending = self._pending_move_aside()
        if pending:
            staging = pending[0]
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            staging, n = self.path.with_name(f"{self.path.name}.old-{stamp}.partial"), 1
            while staging.exists() or staging.with_suffix("").exists():
                staging, n = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}.partial"), n + 1
            staging.mkdir()
        for p in self.path.iterdir():
            if p.name != LOCK:
                p.rename(staging / p.name)
        aside = staging.with_suffix("")
        staging.rename(aside)
        return aside

    def remove_if_empty(self) -> bool:
        """After a failed start: remove the directory if this process created it and it holds
        only scaffolding, so a failure leaves no empty run directory behind."""
        if not self.created or self.holds_data():
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
