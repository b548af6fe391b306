"""The durable correction log: every teacher correction, on disk, before anything else sees it.

Teacher corrections are the expensive part of this system (a large model's time or a person's),
so the replay buffer appends each batch of pairs here, flushed and fsync'ed, BEFORE admitting
them to memory: whatever happens afterwards (stale eviction, capacity eviction, a crash, a
restart), the correction is on disk and a resumed run does not ask the teacher again
(``seen_ids``).

Format (JSON Lines, UTF-8, append-only, one writer):

* line 1, the header: ``{"type": "header", "format": "correction-rl/correction-log",
  "version": 1, "created_at": <unix time>, "meta": {...}}`` — ``meta`` is free-form run
  metadata (run name, teacher kind); it must never hold secrets, and nothing in this module
  reads environment variables or API keys (a ``CorrectionPair`` holds token ids, a version and
  the teacher's *name* only).
* every other line, one pair: ``{"type": "pair", "logged_at": <unix time>, "pair":
  CorrectionPair.to_json()}``.

Crash tolerance: a record is one ``write`` of ``json + "\\n"``; a crash can only leave the LAST
line partial. ``read`` reports such a truncated tail (``TruncatedLogWarning``) and skips it; a
broken line anywhere else is corruption and fails with ``file:line``. Reopening a log for
append moves a partial tail aside to ``<log>.partial-<time>`` (kept for inspection) before
writing, so the next record does not glue onto it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from correction_rl.types import CorrectionPair
from correction_rl.errors import UserError

FORMAT = "correction-rl/correction-log"
VERSION = 1


class CorrectionLogError(ValueError, UserError):
    """A corrupted or foreign correction log; the message names ``file:line``."""


class TruncatedLogWarning(UserWarning):
    """The log ends in a partial record (a crash mid-write); the partial record was skipped."""


@dataclass(frozen=True)
class LogScan:
    """What a full pass over a log found (``scan``)."""

    records: int
    """Complete pair records."""
    header: dict[str, Any]
    valid_bytes: int
    """Byte length of the complete part (header + complete records)."""
    truncated_bytes: int
    """Bytes of the partial final record (0 when the log ends cleanly)."""


def _parse(path: Path, lineno: int, raw: bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorrectionLogError(f"{path}:{lineno}: not a JSON record ({exc})") from None
    if not isinstance(record, dict):
        raise CorrectionLogError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def _check_header(path: Path, record: dict[str, Any]) -> None:
    if record.get("type") != "header" or record.get("format") != FORMAT:
        raise CorrectionLogError(f"{path}:1: not a correction log header (expected format {FORMAT!r})")
    if record.get("version") != VERSION:
        raise CorrectionLogError(
            f"{path}:1: correction log version {record.get('version')!r}; this code reads version {VERSION}"
        )


def _to_pair(path: Path, lineno: int, record: dict[str, Any]) -> CorrectionPair:
    if record.get("type") != "pair" or not isinstance(record.get("pair"), dict):
        raise CorrectionLogError(f"{path}:{lineno}: expected a pair record, got type={record.get('type')!r}")
    try:
        return CorrectionPair.from_json(record["pair"])
    except TypeError as exc:
        raise CorrectionLogError(f"{path}:{lineno}: bad pair record ({exc})") from None


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes, int, bool]]:
    """(line number, raw line, byte offset after it, ends with newline)."""
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            offset += len(raw)
            yield lineno, raw, offset, raw.endswith(b"\n")


def _scan(path: Path, want_pairs: bool) -> Iterator[CorrectionPair | LogScan]:
    """One pass: yields pairs (when ``want_pairs``) and finally a ``LogScan``."""
    header: dict[str, Any] | None = None
    records = valid = truncated = 0
    for lineno, raw, end, complete in _iter_lines(path):
        body = raw.rstrip(b"\n")
        if complete and body.strip(b"\x00"):
            record = _parse(path, lineno, body)
        else:
            # No newline (necessarily the last line) or an empty line: a record cut short by a
            # crash, or the zero fill some filesystems leave after one. Tolerated only at the
            # end of the file; a complete JSON object that merely lacks its newline is kept.
            record = _try_parse(body) if not complete else None
            if record is None:
                if complete and _has_more_data(path, end):
                    raise CorrectionLogError(f"{path}:{lineno}: empty line inside the log")
                truncated = os.path.getsize(path) - valid
                warnings.warn(
                    f"{path}:{lineno}: partial final record ({truncated} bytes, a crash "
                    "mid-write) skipped",
                    TruncatedLogWarning,
                    stacklevel=3,
                )
                break
        if header is None:
            _check_header(path, record)
            header = record
        else:
            pair = _to_pair(path, lineno, record)
            records += 1
            if want_pairs:
                yield pair
        valid = end
    yield LogScan(records=records, header=header or {}, valid_bytes=valid, truncated_bytes=truncated)


def _try_parse(body: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _has_more_data(path: Path, offset: int) -> bool:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return bool(fh.read().strip(b"\x00\n"))


def read(path: str | Path) -> Iterator[CorrectionPair]:
    """The pairs of a log, in append order. A partial final record is skipped with a
    ``TruncatedLogWarning``; a broken record elsewhere raises ``CorrectionLogError`` naming
    ``file:line``."""
    path = Path(path)
    for item in _scan(path, want_pairs=True):
        if isinstance(item, CorrectionPair):
            yield item


def scan_header(path: str | Path) -> dict[str, Any]:
    """The header record of a log (its ``meta`` says which run wrote it)."""
    path = Path(path)
    with open(path, "rb") as fh:
        first = fh.readline()
    record = _parse(path, 1, first)
    _check_header(path, record)
    return record


def scan(path: str | Path) -> LogScan:
    """Count the records and find the clean end of a log (without keeping the pairs)."""
    result = None
    for item in _scan(Path(path), want_pairs=False):
        result = item
    assert isinstance(result, LogScan)
    return result


_PAIR_FIELDS = tuple(f.name for f in dataclasses.fields(CorrectionPair))


def pair_record(pair: CorrectionPair) -> dict[str, Any]:
    """``pair.to_json()`` without ``dataclasses.asdict``'s deep copy of every token id (which
    was ~90% of the log's append time); only for immediate serialization."""
    return {name: getattr(pair, name) for name in _PAIR_FIELDS}


class CorrectionLog:
    """Append-only writer of one correction log (one writer per file: an exclusive ``flock``
    makes a second writer, e.g. two runs on the same run directory, fail loudly).

    ``append`` writes a batch with one flush + ``fsync``, skipping pair ids already in the log
    (dedupe across restarts and duplicate deliveries), and returns the pairs actually written.
    Thread safe.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any] | None = None, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.num_records = 0
        self.recovered_partial: Path | None = None
        """Where a partial tail found at open was moved (None when the log was clean)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab+", buffering=0)
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise CorrectionLogError(f"{self.path}: another writer holds this correction log") from None
        try:
            if os.path.getsize(self.path) > 0:
                self._recover()
            if os.path.getsize(self.path) == 0:
                header = {"type": "header", "format": FORMAT, "version": VERSION,
                          "created_at": time.time(), "meta": dict(meta or {})}
                self._write([json.dumps(header)])
                _fsync_dir(self.path.parent)
            self.header = scan_header(self.path)
        except BaseException:
            self.close()  # a corrupted log must not keep the writer lock
            raise

    def _recover(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncatedLogWarning)
            for item in _scan(self.path, want_pairs=True):
                if isinstance(item, CorrectionPair):
                    self._seen.add(item.pair_id)
                else:
                    end = item
        self.num_records = end.records
        size = os.path.getsize(self.path)
        if end.valid_bytes < size:
            with open(self.path, "rb") as fh:
                fh.seek(end.valid_bytes)
                tail = fh.read()
            if tail.strip(b"\x00\n"):
                aside = self.path.with_name(f"{self.path.name}.partial-{int(time.time() * 1000)}")
                aside.write_bytes(tail)
                self.recovered_partial = aside
                warnings.warn(
                    f"{self.path}: partial final record ({len(tail)} bytes) moved to {aside}",
                    TruncatedLogWarning,
                    stacklevel=3,
                )
            os.truncate(self.path, end.valid_bytes)
            os.fsync(self._fh.fileno())
        with open(self.path, "rb") as fh:  # a complete last record may lack its newline
            fh.seek(max(0, end.valid_bytes - 1))
            if fh.read(1) not in (b"\n", b""):
                self._write([""])

    def _write(self, lines: list[str]) -> None:
        """Write whole lines or nothing: a failed write (disk full, I/O error) is cut back to
        the previous end, so the next append cannot glue onto a half record."""
        fd = self._fh.fileno()
        start = os.fstat(fd).st_size
        view = memoryview(("\n".join(lines) + "\n").encode())
        try:
            while view:  # unbuffered file: nothing lingers in a Python buffer after a failure
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, start)
            finally:
                raise

    def append(self, pairs: Iterable[CorrectionPair]) -> list[CorrectionPair]:
        """Write the pairs not yet in the log (one flush + fsync for the batch); returns them."""
        with self._lock:
            if self._fh.closed:
                raise CorrectionLogError(f"{self.path}: append after close")
            fresh: list[CorrectionPair] = []
            ids: set[str] = set()
            for pair in pairs:
                if pair.pair_id in self._seen or pair.pair_id in ids:
                    continue
                ids.add(pair.pair_id)
                fresh.append(pair)
            if fresh:
                now = time.time()
                self._write(
                    [json.dumps({"type": "pair", "logged_at": now, "pair": pair_record(p)}) for p in fresh]
                )
                self._seen.update(ids)
                self.num_records += len(fresh)
            return fresh

    def seen_ids(self) -> frozenset[str]:
        """Pair ids already in the log: a resumed run skips rollouts with these ids."""
        with self._lock:
            return frozenset(self._seen)

    def __contains__(self, pair_id: str) -> bool:
        with self._lock:
            return pair_id in self._seen

    def __len__(self) -> int:
        return self.num_records

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
                self._fh.close()

    def __enter__(self) -> "CorrectionLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Pickling a writer would duplicate the file handle and break the single-writer rule.
    def __getstate__(self) -> None:
        raise TypeError("CorrectionLog holds an open file; create it where it is used (e.g. in the buffer actor)")

    read = staticmethod(read)


def _fsync_dir(directory: Path) -> None:
    """Make a newly created file's directory entry durable too."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
