"""Atomic, verified, retained checkpoints of a run, and the config check a resume must pass.

Why it works this way (docs/reliability.md has the long form):

* **Atomic.** A checkpoint is a directory ``<run_dir>/checkpoints/step-00000012``. It is written
  under a temporary name (``.tmp-step-...``), every file is fsync'ed, a ``manifest.json`` with
  the SHA-256 and size of every file is written LAST, and only then is the directory renamed to
  its final name (and the parent directory fsync'ed). A crash at any moment leaves either the
  previous complete checkpoints, or a ``.tmp-*`` directory that is ignored and cleaned up.
* **Verified.** Loading re-hashes every file against the manifest. A checkpoint whose manifest
  is missing, unreadable, or disagrees with its files (a bad disk, a copy cut short, a person
  editing a file) is reported by name with the reason, and the previous checkpoint is used.
* **Retained.** After each successful save, only the newest ``keep`` checkpoints stay.
* **Config-checked.** Each checkpoint holds the resolved config it was written under. A resume
  whose config differs in a field that would make the restored state wrong (the optimizer state
  layout, the prompt stream, the loss being optimised) is refused, naming the dotted fields;
  fields that are safe to change (``total_steps``, timeouts, metrics, resources other than the
  learner world size, ...) may differ.

What goes INTO a checkpoint is the run lifecycle's ``RunState`` (``run/state.py``, one layout for
both drivers): a ``state.json`` of small JSON state plus whatever files ``write_files(tmp_dir)`` writes (the
learner's torch or DeepSpeed state).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from correction_rl.errors import UserError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "state.json"
CONFIG = "config.yaml"
FORMAT = 2
"""2: one state layout in every mode (``run/state.RunState``: ``streams`` replaced the
in-process ``prompt_stream`` and the Ray ``rollout_workers``). 1: the layouts before it."""
PREFIX = "step-"

BREAKING_FIELDS: tuple[str, ...] = (
    "seed",
    "mode",
    "model.path",
    "model.dtype",
    "task",
    "objective",
    "rollout.batch_size",
    "learner.backend",
    "learner.zero_stage",
    "learner.lr",
    "learner.weight_decay",
    "learner.lr_schedule",
    "learner.warmup_steps",
    "learner.micro_batch_pairs",
    "learner.grad_accum",
    "learner.lora",
    "buffer.capacity",
    "buffer.max_staleness",
    "buffer.max_reuse",
    "buffer.admit_noops",
    "resources.num_learner_ranks",
)
"""Dotted config fields (or whole sections) that must match the checkpoint's to resume: the
optimizer/DeepSpeed state layout (backend, ZeRO stage, learner ranks), the LR schedule and
optimizer hyper-parameters, the prompt stream (seed, tasks, batch size), the loss (objective:
the reference log-probs in the correction log were computed for it), the learner batch, the
LoRA adapter (``learner.lora``: with it the learner state holds only the adapter and its
optimizer state, whose shapes follow the rank and target layers), and the buffer rules the
restored buffer state was admitted under."""


class CheckpointError(RuntimeError, UserError):
    """No usable checkpoint, or one that cannot be resumed under this config."""


class ConfigMismatch(CheckpointError):
    """The resume config differs from the checkpoint's in fields that break resuming."""

    def __init__(self, checkpoint: Path, diffs: dict[str, tuple[Any, Any]]):
        self.checkpoint = checkpoint
        self.diffs = diffs
        lines = [f"  {k}: checkpoint {a!r} != now {b!r}" for k, (a, b) in sorted(diffs.items())]
        super().__init__(
            f"cannot resume from {checkpoint}: the config differs in field(s) that break resuming "
            f"({', '.join(sorted(diffs))}):\n" + "\n".join(lines)
            + "\nuse the checkpoint's values, or start a new run (another name / output_dir)"
        )


@dataclass(frozen=True)
class Checkpoint:
    """One verified checkpoint on disk."""

    path: Path
    step: int
    state: dict[str, Any]
    """The ``state.json`` the caller saved."""
    config: dict[str, Any]
    """The resolved config (nested dict) it was written under."""


@dataclass(frozen=True)
class Rejected:
    """A checkpoint directory that failed verification, and why (reported, then skipped)."""

    path: Path
    reason: str


# ---------------------------------------------------------------------------------------------
# Writing


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    config: dict[str, Any],
    write_files: Callable[[Path], None] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``; returns its path.

    ``state``: JSON-serializable small state; ``config``: the resolved config as a nested dict;
    ``write_files(tmp_dir)``: writes any further files (e.g. the learner state) into the
    temporary directory. Saving the same step twice replaces the older copy atomically enough
    (the old one is moved aside first, then removed)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / STATE).write_text(json.dumps({"format": FORMAT, "step": step, **state}, indent=1) + "\n")
    (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    if write_files is not None:
        write_files(tmp)
    manifest = {"format": FORMAT, "step": step, "files": {}}
    for path in _files(tmp):
        _fsync_file(path)
        manifest["files"][path.relative_to(tmp).as_posix()] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync_file(tmp / MANIFEST)
    for sub in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync_dir(sub)
    if final.exists():
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    prune(run_dir, keep)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-named checkpoint directories, oldest first (temporary ones are not listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX):
            try:
                found.append((int(p.name[len(PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def prune(run_dir: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` checkpoints and leftover temporary directories of
    dead writers; returns what was removed."""
    removed = []
    ckpts = list_checkpoints(run_dir)
    for p in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    root = checkpoint_root(run_dir)
    for p in root.glob(".tmp-*") if root.is_dir() else ():
        pid = p.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Reading


def verify(path: str | Path) -> Checkpoint:
    """Check every file of one checkpoint against its manifest; raise ``CheckpointError`` naming
    the first problem (missing manifest, missing/extra/changed file, unreadable state)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (a partial checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{mpath}: unreadable manifest ({exc})") from None
    bad = _manifest_shape_error(files)
    if bad:
        raise CheckpointError(f"{mpath}: manifest of the wrong shape ({bad})")
    on_disk = {p.relative_to(path).as_posix() for p in _files(path)}
    missing = sorted(set(files) - on_disk)
    if missing:
        raise CheckpointError(f"{path}: file(s) listed in the manifest are missing: {missing}")
    extra = sorted(on_disk - set(files))
    if extra:
        raise CheckpointError(f"{path}: file(s) not in the manifest: {extra}")
    for rel, meta in files.items():
        f = path / rel
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {meta['bytes']} (truncated or changed)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 differs from the manifest (corrupted or changed)")
    try:
        state = json.loads((path / STATE).read_text())
        config = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: unreadable {STATE}/{CONFIG} ({exc})") from None
    if not isinstance(state, dict) or not isinstance(config, dict):
        raise CheckpointError(f"{path}: {STATE} and {CONFIG} must each hold a mapping")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path / STATE}: format {state.get('format')!r}, expected {FORMAT} "
                              "(written by another version of correction_rl, whose state layout differs)")
    if not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool):
        raise CheckpointError(f"{path / STATE}: step {state.get('step')!r} is not an integer")
    return Checkpoint(path=path, step=state["step"], state=state, config=config)


def _manifest_shape_error(files: Any) -> str | None:
    """What is wrong with a manifest's ``files`` table (valid JSON can still be the wrong shape,
    e.g. ``"state.json": 5``), or None."""
    if not isinstance(files, dict):
        return f"'files' is {type(files).__name__}, expected an object"
    for rel, meta in files.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str)
                and isinstance(meta.get("bytes"), int) and not isinstance(meta.get("bytes"), bool)):
            return f"entry {rel!r} is {meta!r}, expected {{'sha256': str, 'bytes': int}}"
    return None


def latest_valid(run_dir: str | Path) -> tuple[Checkpoint | None, list[Rejected]]:
    """The newest checkpoint that verifies, and every newer one that did not (with reasons),
    so the caller can report them. ``(None, rejected)`` when none is usable."""
    rejected: list[Rejected] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return verify(path), rejected
        except (CheckpointError, OSError) as exc:
            rejected.append(Rejected(path, str(exc)))
    return None, rejected


# ---------------------------------------------------------------------------------------------
# Config compatibility


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree and not prefix.startswith("task.difficulty"):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _breaks(key: str, breaking: Iterable[str]) -> bool:
    return any(key == b or key.startswith(b + ".") for b in breaking)


def config_diffs(saved: dict[str, Any], now: dict[str, Any],
                 breaking: Iterable[str] = BREAKING_FIELDS) -> dict[str, tuple[Any, Any]]:
    """Dotted fields in ``breaking`` whose values differ: ``{field: (saved, now)}``.

    A field the checkpoint's config does not have (added to the schema after it was written,
    e.g. ``learner.lora``) counts as its default there, so a checkpoint from before the field
    existed resumes as long as the field is left at its default."""
    from correction_rl.config import RunConfig, to_dict

    a, b = _flatten(saved), _flatten(now)
    defaults = _flatten(to_dict(RunConfig()))
    missing = object()
    diffs = {}
    for key in sorted(set(a) | set(b)):
        if not _breaks(key, breaking):
            continue
        va, vb = a.get(key, missing), b.get(key, missing)
        if va is missing and key in defaults:
            va = defaults[key]
        if va != vb:
            diffs[key] = (None if va is missing else va, None if vb is missing else vb)
    return diffs


def check_compatible(ckpt: Checkpoint, now: dict[str, Any]) -> None:
    """Raise ``ConfigMismatch`` (naming the fields) if ``now`` cannot resume ``ckpt``."""
    diffs = config_diffs(ckpt.config, now)
    if diffs:
        raise ConfigMismatch(ckpt.path, diffs)
