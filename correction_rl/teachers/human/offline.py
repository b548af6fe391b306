"""Offline mode: export open items to JSONL, import corrections from JSONL.

For annotation tools people already use (Label Studio, Argilla, a spreadsheet): export gives
one ``{"item_id", "prompt", "response", "task"}`` object per line; the tool (or a person) adds
``"corrected"`` (y') and optionally ``"annotator"``; import validates every line first and
stores nothing unless the whole file is valid, with errors that name ``file:line``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from correction_rl.teachers.human.queue import OPEN_STATES, CorrectionQueue

EXPORT_FIELDS = ("item_id", "prompt", "response", "task")
IMPORT_FIELDS = {"item_id", "corrected", "annotator", "prompt", "response", "task"}


class CorrectionImportError(ValueError):
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
            f.write(json.dumps({k: getattr(item, k) for k in EXPORT_FIELDS}, ensure_ascii=False) + "\n")
    return len(items)


def import_corrections(queue: CorrectionQueue, path: str | Path, default_annotator: str = "offline") -> ImportResult:
    """Validates every line of ``path``, then stores all corrections; raises ``CorrectionImportError``
    (nothing stored) when any line is invalid."""
    path = Path(path)
    rows: list[tuple[str, str, str]] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: not JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                errors.append(f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            unknown = sorted(set(record) - IMPORT_FIELDS)
            if unknown:
                errors.append(f"{where}: unknown field(s) {unknown} (allowed: {sorted(IMPORT_FIELDS)})")
                continue
            item_id, corrected = record.get("item_id"), record.get("corrected")
            annotator = record.get("annotator", default_annotator)
            if not isinstance(item_id, str) or not item_id:
                errors.append(f"{where}: field 'item_id' must be a non-empty string")
                continue
            if not isinstance(corrected, str):
                errors.append(f"{where}: field 'corrected' must be a string (y'), got {type(corrected).__name__}")
                continue
            if not isinstance(annotator, str) or not annotator:
                errors.append(f"{where}: field 'annotator' must be a non-empty string")
                continue
            if item_id in seen:
                errors.append(f"{where}: item {item_id!r} already corrected on line {seen[item_id]}")
                continue
            seen[item_id] = lineno
            item = queue.get(item_id)
            if item is None:
                errors.append(f"{where}: item {item_id!r} is not in the queue {queue.path}")
            elif item.state not in OPEN_STATES:
                errors.append(f"{where}: item {item_id!r} is already {item.state}")
            else:
                rows.append((item_id, annotator, corrected))
    if errors:
        raise CorrectionImportError(errors)
    for item_id, annotator, corrected in rows:
        queue.import_correction(item_id, annotator, corrected)
    return ImportResult(stored=len(rows), path=path)


def main(argv: list[str] | None = None) -> int:
    """``python -m correction_rl.teachers.human.offline export|import --db QUEUE FILE``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m correction_rl.teachers.human.offline",
                                     description="Export open correction items / import corrections (JSONL).")
    parser.add_argument("action", choices=["export", "import"])
    parser.add_argument("file", help="JSONL to write (export) or read (import)")
    parser.add_argument("--db", required=True, help="the run's queue file (runs/<name>/human_queue.sqlite)")
    parser.add_argument("--annotator", default="offline", help="import: name for lines without 'annotator'")
    args = parser.parse_args(argv)
    if not Path(args.db).exists():
        parser.error(f"--db {args.db}: no such queue file")
    queue = CorrectionQueue(args.db)
    if args.action == "export":
        print(f"exported {export_pending(queue, args.file)} open item(s) to {args.file}")
        return 0
    try:
        result = import_corrections(queue, args.file, args.annotator)
    except CorrectionImportError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"stored {result.stored} correction(s) from {args.file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
