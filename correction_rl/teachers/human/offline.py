"""Offline mode: export open items to JSONL, import corrections from JSONL.

For annotation tools people already use (Label Studio, Argilla, a spreadsheet): export gives
one ``{"item_id", "prompt", "response", "task"}`` object per line (plus ``"messages"``, the whole
conversation, for a chat prompt: ``prompt`` is then its last user message); the tool (or a person) adds
``"corrected"`` (y') and optionally ``"annotator"``; import validates every line first and
stores nothing unless the whole file is valid, with errors that name ``file:line``. The store
itself is one transaction that checks the items again (``CorrectionQueue.import_corrections``):
an item withdrawn by the teacher while the file was being validated fails the whole import,
nothing stored, rather than half of it.

Command line: ``correction-rl human-queue export|import FILE --db QUEUE`` (also
``python -m correction_rl.teachers.human.offline``). A missing file, bytes that are not UTF-8,
or a ``--db`` that is not a queue are one ``error:`` line with exit code 2, like every command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from correction_rl.errors import UserError
from correction_rl.teachers.human.queue import OPEN_STATES, CorrectionQueue, ItemsNotOpen

EXPORT_FIELDS = ("item_id", "prompt", "response", "task")
IMPORT_FIELDS = {"item_id", "corrected", "annotator", "prompt", "response", "task", "messages"}


class CorrectionImportError(ValueError, UserError):
    """One or more invalid lines; ``errors`` lists ``file:line: message`` for each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        shown = "\n".join(errors[:20]) + (f"\n... and {len(errors) - 20} more" if len(errors) > 20 else "")
        super().__init__(f"{len(errors)} invalid line(s):\n{shown}")


@dataclass(frozen=True)
class ImportResult:
    stored: int
    path: Path


def export_pending(queue: CorrectionQueue, path: str | Path) -> int:
    """Writes every open item (pending or leased) to ``path``; returns how many."""
    items = queue.open_items()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            record = {k: getattr(item, k) for k in EXPORT_FIELDS}
            if item.messages:  # a chat prompt: the whole conversation, as the web page shows it
                record["messages"] = item.public()["messages"]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(items)


@dataclass(frozen=True)
class ImportRow:
    """One valid line of an import file."""

    lineno: int
    item_id: str
    annotator: str
    corrected: str


class _LineError(Exception):
    """One invalid line (collected into ``CorrectionImportError``)."""


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _LineError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                         "save the file as UTF-8") from None


def _check_line(record: object, where: str, default_annotator: str) -> tuple[str, str, str]:
    if not isinstance(record, dict):
        raise _LineError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - IMPORT_FIELDS)
    if unknown:
        raise _LineError(f"{where}: unknown field(s) {unknown} (allowed: {sorted(IMPORT_FIELDS)})")
    item_id, corrected = record.get("item_id"), record.get("corrected")
    annotator = record.get("annotator", default_annotator)
    if not isinstance(item_id, str) or not item_id:
        raise _LineError(f"{where}: field 'item_id' must be a non-empty string")
    if not isinstance(corrected, str):
        raise _LineError(f"{where}: field 'corrected' must be a string (y'), got {type(corrected).__name__}")
    if not isinstance(annotator, str) or not annotator:
        raise _LineError(f"{where}: field 'annotator' must be a non-empty string")
    return item_id, annotator, corrected


def read_import(queue: CorrectionQueue, path: str | Path, default_annotator: str = "offline") -> list[ImportRow]:
    """Validates every line of ``path`` against ``queue`` (stores nothing); raises
    ``CorrectionImportError`` naming ``file:line`` of every invalid line, or the
    ``FileNotFoundError`` / ``IsADirectoryError`` of ``open``."""
    path = Path(path)
    rows: list[ImportRow] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = _decode(raw, where)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _LineError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
                item_id, annotator, corrected = _check_line(record, where, default_annotator)
                if item_id in seen:
                    raise _LineError(f"{where}: item {item_id!r} already corrected on line {seen[item_id]}")
            except _LineError as exc:
                errors.append(str(exc))
                continue
            seen[item_id] = lineno
            item = queue.get(item_id)
            if item is None:
                errors.append(f"{where}: item {item_id!r} is not in the queue {queue.path}")
            elif item.state not in OPEN_STATES:
                errors.append(f"{where}: item {item_id!r} is already {item.state}")
            else:
                rows.append(ImportRow(lineno, item_id, annotator, corrected))
    if errors:
        raise CorrectionImportError(errors)
    return rows


def store_import(queue: CorrectionQueue, path: str | Path, rows: list[ImportRow]) -> ImportResult:
    """Stores validated rows in one transaction; an item no longer open by then (withdrawn by
    the teacher, saved in the app) fails the whole import with ``CorrectionImportError``."""
    try:
        queue.import_corrections([(r.item_id, r.annotator, r.corrected) for r in rows])
    except ItemsNotOpen as exc:
        errors = [f"{path}:{r.lineno}: item {r.item_id!r} is "
                  f"{'no longer in the queue' if exc.states[r.item_id] is None else 'now ' + str(exc.states[r.item_id])}"
                  " (changed while the file was validated)"
                  for r in rows if r.item_id in exc.states]
        raise CorrectionImportError(errors) from None
    return ImportResult(stored=len(rows), path=Path(path))


def import_corrections(queue: CorrectionQueue, path: str | Path, default_annotator: str = "offline") -> ImportResult:
    """Validates every line of ``path``, then stores all corrections in one transaction;
    raises ``CorrectionImportError`` (nothing stored) when any line is invalid or an item
    stopped being open before the store."""
    return store_import(queue, path, read_import(queue, path, default_annotator))


def cli(argv: list[str]) -> int:
    """``correction-rl human-queue export|import FILE --db QUEUE [--annotator NAME]``"""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="correction-rl human-queue",
                                     description="Export open correction items / import corrections (JSONL).")
    parser.add_argument("action", choices=["export", "import"])
    parser.add_argument("file", help="JSONL to write (export) or read (import)")
    parser.add_argument("--db", required=True, help="the run's queue file (runs/<name>/human_queue.sqlite)")
    parser.add_argument("--annotator", default="offline", help="import: name for lines without 'annotator'")
    args = parser.parse_args(argv)
    queue = CorrectionQueue(args.db, create=False)
    try:
        if args.action == "export":
            print(f"exported {export_pending(queue, args.file)} open item(s) to {args.file}")
            return 0
        try:
            result = import_corrections(queue, args.file, args.annotator)
        except CorrectionImportError as exc:  # every bad line on its own line: the user fixes them all
            print(f"error: {args.file}: {len(exc.errors)} invalid line(s), nothing stored:", file=sys.stderr)
            for line in exc.errors:
                print(f"  {line}", file=sys.stderr)
            return 2
    finally:
        queue.close()
    print(f"stored {result.stored} correction(s) from {args.file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m correction_rl.teachers.human.offline ...``: ``cli`` with the errors of
    every ``correction-rl`` command (one line, exit code 2)."""
    import sys

    from correction_rl.errors import run_cli

    return run_cli(cli, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
