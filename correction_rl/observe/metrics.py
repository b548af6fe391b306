"""Metric sinks: where the flat ``{"namespace/name": float}`` dicts of every component go.

Every component reports plain floats under a namespace (``train/``, ``eval/``, ``rollout/``,
``teacher/``, ``buffer/``, ``sync/``, ``system/``; docs/metrics.md lists the names), and the
driver hands one dict per learner step to a ``MetricSink``. Sinks are one-job classes behind a
two-method protocol, so the loop never knows whether it is talking to the console, a JSONL file,
W&B, or all of them (``MultiSink``). ``wandb`` is imported only inside ``WandbSink``.

``read_offline_run`` reads an offline W&B run back from its ``.wandb`` file, so tests check what
was actually written rather than that a directory exists. wandb 0.31 ships no Python reader for
that file (the old ``wandb.sdk.internal.datastore`` is gone; the Go core writes it), so the
small reader here follows its format: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
LevelDB-log framing (32 KiB blocks; records of ``crc32 | length | type`` + payload, split
FULL/FIRST/MIDDLE/LAST across blocks), each payload one ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, TextIO, runtime_checkable

from correction_rl.config import MetricsConfig

STEP_KEY = "step"
"""The step metric every W&B chart uses as its x axis (the learner step)."""
NAMESPACES = ("train", "eval", "rollout", "teacher", "buffer", "sync", "system")

DEFAULT_CONSOLE_KEYS = (
    "train/loss", "train/margin", "eval/greedy/correction_rate", "rollout/tokens_per_s",
    "teacher/pairs_per_s", "buffer/size", "buffer/last_batch_staleness_mean", "sync/seconds",
)


@runtime_checkable
class MetricSink(Protocol):
    """Receives one flat dict of floats per step."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class ConsoleSink:
    """One compact line per ``every`` steps with the selected keys (those present)."""

    def __init__(self, keys: Iterable[str] = DEFAULT_CONSOLE_KEYS, every: int = 1,
                 stream: TextIO | None = None):
        self.keys = tuple(keys)
        self.every = max(1, every)
        self.stream = stream

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step % self.every:
            return
        parts = [f"step {step}"]
        parts += [f"{k} {_fmt(metrics[k])}" for k in self.keys if k in metrics]
        print(" | ".join(parts), file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


def _fmt(value: float) -> str:
    value = float(value)
    if math.isfinite(value) and value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


class TornMetricsWarning(UserWarning):
    """``metrics.jsonl`` ended in a partial record (a crash mid-write); it was moved aside
    (sink) or skipped (reader)."""


class JsonlSink:
    """One JSON object per ``log`` call: ``{"step", "time", **metrics}``, flushed at once.

    Non-finite values (a NaN loss) are written as ``null`` so the file stays strict JSON that
    any tool reads; the step still appears, so the gap is visible. Appends, so a resumed run
    continues the same file. A run killed mid-write leaves a partial last line; opening the
    file again repairs that tail first, as the correction log does (``repair_jsonl_tail``), so
    the resumed run's first record starts on a line of its own instead of being glued onto the
    torn one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.recovered_partial: Path | None = repair_jsonl_tail(self.path)
        """Where a partial tail found at open was moved (None when the file ended cleanly)."""
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else None
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def repair_jsonl_tail(path: Path) -> Path | None:
    """Make ``path`` end at a line boundary before appending to it.

    A record is one ``write`` of ``json + "\\n"``, so a crash can only leave the last line
    partial (or a run of zero bytes some filesystems leave after one). A last line that is a
    complete JSON object merely lacking its newline gets the newline; anything else after the
    last newline is moved to ``<file>.partial-<ms>`` (kept for inspection) and cut off. Returns
    where the tail went, or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(path, "rb") as fh:  # the last MiB holds the last line (records are a few KB)
        base = max(0, size - (1 << 20))
        fh.seek(base)
        data = fh.read()
        if b"\n" not in data.rstrip(b"\x00") and base > 0:
            base = 0
            fh.seek(0)
            data = fh.read()
    cut = len(data.rstrip(b"\x00"))
    end = data.rfind(b"\n", 0, cut) + 1  # 0 when there is no newline at all
    tail = data[end:cut]
    cut, end = base + cut, base + end
    if cut == size and not tail:
        return None  # ends with a newline: nothing to repair
    if tail and _complete_record(tail):
        with open(path, "r+b") as fh:
            fh.truncate(cut)
            fh.seek(cut)
            fh.write(b"\n")
        return None
    aside = None
    if tail.strip():
        aside = path.with_name(f"{path.name}.partial-{int(time.time() * 1000)}")
        aside.write_bytes(tail)
        warnings.warn(f"{path}: partial final record ({len(tail)} bytes, a crash mid-write) moved to {aside}",
                      TornMetricsWarning, stacklevel=3)
    os.truncate(path, end)
    return aside


def _complete_record(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


@dataclass
class MetricsFile:
    """What ``load_jsonl_metrics`` read: the records, and the lines it could not use."""

    records: list[dict[str, Any]]
    bad_lines: list[int] = field(default_factory=list)
    """1-based numbers of lines that are not a JSON object (skipped)."""


def load_jsonl_metrics(path: str | Path, strict: bool = False) -> MetricsFile:
    """The records a ``JsonlSink`` wrote. A partial last line (a crash mid-write, or a write
    still under way while a test polls the file) is skipped with a ``TornMetricsWarning``.
    Any other line that is not a JSON object is skipped and counted in ``bad_lines`` (the
    report says how many), or with ``strict`` raises ``ValueError`` naming ``file:line``."""
    out = MetricsFile(records=[])
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    last = len(lines)  # the text after the final newline ("" for a clean file)
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip(b" \t\r\x00"):
            continue
        try:
            record = json.loads(raw)
            error = None if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            record, error = None, str(exc)
        if error is None:
            out.records.append(record)
        elif lineno == last:
            warnings.warn(f"{path}:{lineno}: partial final record ({len(raw)} bytes) skipped",
                          TornMetricsWarning, stacklevel=2)
        elif strict:
            raise ValueError(f"{path}:{lineno}: not a JSON metrics record ({error})")
        else:
            out.bad_lines.append(lineno)
    return out


def read_jsonl_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records a ``JsonlSink`` wrote (for tests: a broken line other than a partial last
    one raises ``ValueError`` naming ``file:line``)."""
    return load_jsonl_metrics(path, strict=True).records


class MultiSink:
    """Fans each ``log`` out to several sinks; ``close`` closes them all (even if one fails)."""

    def __init__(self, sinks: Iterable[MetricSink]):
        self.sinks = list(sinks)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # close the others first, then report
                errors.append(exc)
        if errors:
            raise errors[0]


class WandbSink:
    """Weights & Biases (online / offline / disabled from ``MetricsConfig.wandb_mode``).

    Offline runs go under ``<run_dir>/wandb/offline-run-*`` (``wandb sync`` uploads them later).
    Every metric is plotted against ``step`` (``define_metric``), which also makes a resumed run
    line up: pass the previous ``run_id`` as ``resume_id`` and the charts continue. The resolved
    config is the run's config. No network is touched unless the mode is ``online``.
    """

    def __init__(self, cfg: MetricsConfig, run_dir: str | Path, config_dict: dict[str, Any],
                 resume_id: str | None = None, name: str | None = None):
        os.environ.setdefault("WANDB_SILENT", "true")  # before import: the service start is quiet too
        import wandb  # lazy: the only import of wandb in the package

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=cfg.wandb_project,
            name=name,
            mode=cfg.wandb_mode,
            dir=str(self.run_dir),
            config=config_dict,
            id=resume_id,
            resume="allow" if resume_id else None,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                    save_code=False, disable_git=True),
        )
        self.run_id: str = self._run.id
        self.mode = cfg.wandb_mode
        self.sync_file: Path | None = (
            Path(self._run.settings.sync_file) if cfg.wandb_mode == "offline" else None
        )
        """The offline run's ``.wandb`` transaction log (``read_offline_run`` reads it)."""
        self._run.define_metric(STEP_KEY)
        self._run.define_metric("*", step_metric=STEP_KEY)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log({**{k: float(v) for k, v in metrics.items()}, STEP_KEY: int(step)})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (e.g. sampled corrections with their diffs) at ``step``."""
        import wandb

        self._run.log({key: wandb.Table(columns=columns, data=rows), STEP_KEY: int(step)})

    def close(self, wait_s: float = 30.0) -> None:
        """Finish the run. Offline, also wait until the ``.wandb`` file is complete: wandb
        0.31's ``finish`` can return before its writer has flushed the file (seen when several
        runs are made in one process), and a reader right after would find only the header."""
        if self._run is None:
            return
        self._run.finish()
        self._run = None
        if self.sync_file is not None and not _wait_complete(self.sync_file, wait_s):
            warnings.warn(f"{self.sync_file}: W&B offline file still incomplete after {wait_s} s")


def _wait_complete(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in iter_wandb_records(path)):
                return True
        except (OSError, ValueError):
            pass  # not written yet
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------
# Reading an offline run back.

_WANDB_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What a ``.wandb`` file (or several, for a resumed run) holds."""

    run_id: str
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metric_definitions: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    """The ``.wandb`` files read, oldest first."""
    complete: bool = True
    """Every file ends with W&B's exit record (False: a session crashed or is still running)."""


def iter_wandb_records(path: str | Path):
    """Yield the ``wandb_internal_pb2.Record``s of one ``.wandb`` file (CRCs checked)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(_WANDB_HEADER):
        raise ValueError(f"{path}: not a W&B transaction log (bad header {data[:7]!r})")
    pos, pending = len(_WANDB_HEADER), b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        if len(chunk) < length:
            break  # a record cut by a crash: everything before it is intact
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos += 7 + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload, pending = pending + chunk, b""
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _item_key(item: Any) -> str:
    return ".".join(item.nested_key) if item.nested_key else item.key


def _put(target: dict[str, Any], item: Any) -> None:
    """Store one history/summary item; W&B splits dict values (a table's metadata) into items
    with a nested key path, which are rebuilt as nested dicts here."""
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[keys[-1]] = json.loads(item.value_json)


def read_offline_runs(run_dir: str | Path) -> list[OfflineRun]:
    """Every offline run under ``run_dir`` (or ``run_dir/wandb``), one per run id; the files of
    a resumed run (one ``offline-run-*`` directory per session) are concatenated in order."""
    root = Path(run_dir)
    if (root / "wandb").is_dir():
        root = root / "wandb"
    files = sorted(root.glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    runs: dict[str, OfflineRun] = {}
    for path in files:
        run_id = path.stem.removeprefix("run-")
        run = runs.setdefault(run_id, OfflineRun(run_id=run_id))
        run.files.append(path)
        exited = False
        for record in iter_wandb_records(path):
            kind = record.WhichOneof("record_type")
            exited = exited or kind == "exit"
            if kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    _put(row, item)
                run.history.append(row)
            elif kind == "run":
                run.config.update({u.key: json.loads(u.value_json) for u in record.run.config.update
                                   if u.key != "_wandb"})
            elif kind == "config":
                run.config.update({_item_key(u): json.loads(u.value_json) for u in record.config.update
                                   if _item_key(u) != "_wandb"})
            elif kind == "summary":
                for item in record.summary.update:
                    _put(run.summary, item)
            elif kind == "metric":
                m = record.metric
                run.metric_definitions.append(
                    {"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric})
        run.complete = run.complete and exited
    return list(runs.values())


def read_offline_run(run_dir: str | Path) -> list[dict[str, Any]]:
    """The history rows (one dict per ``log`` call, with ``step`` and W&B's ``_step`` /
    ``_timestamp``) of the single offline run under ``run_dir``; raises if there is none or
    several."""
    runs = read_offline_runs(run_dir)
    if len(runs) != 1:
        raise ValueError(f"{run_dir}: expected one offline W&B run, found {len(runs)}: "
                         f"{[r.run_id for r in runs]}")
    return runs[0].history
