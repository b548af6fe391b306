"""The durable correction queue: rollouts wait in SQLite until one annotator corrects them.

Why SQLite: one file, transactions, and a commit that is on disk before we tell the browser
"saved" — enough for the handful of annotators one machine serves (docs/human-teachers.md says
how to scale past it). Every state change is one ``BEGIN IMMEDIATE`` transaction, so several
web-server threads, several training processes on one node (the Ray modes' teacher workers) and
an offline import can share the file.

Leases: ``lease()`` hands an item to exactly one annotator until ``lease_expires``; an item whose
lease ran out (closed tab, lost laptop) is offered again. ``complete()`` only succeeds for the
annotator holding the current lease, so an item is stored exactly once even when a stale tab
submits after its lease was handed to someone else.

States: ``pending`` -> ``leased`` -> ``done``; ``skip()`` returns a leased item to ``pending``
(never offered to that annotator again); ``cancel()`` (the teacher stopped waiting) makes it
``cancelled``; enqueued again, a cancelled item is ``pending`` once more.

Item ids are content ids (``item_ids``): a batch enqueued a second time finds its own items.
That is what happens when Ray retries the ``correct`` call of a teacher worker that died while
people were correcting its batch: the retry collects the corrections already saved and waits for
the rest, instead of putting a second copy of every item in front of the annotators.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from correction_rl.errors import UserError
from correction_rl.types import Rollout

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    task TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending',
    enqueued_at REAL NOT NULL,
    lease_owner TEXT,
    leased_at REAL,
    lease_expires REAL,
    leases INTEGER NOT NULL DEFAULT 0,
    corrected TEXT,
    annotator TEXT,
    done_at REAL,
    edit_distance INTEGER,
    messages TEXT
);
CREATE INDEX IF NOT EXISTS items_state ON items(state, enqueued_at);
CREATE TABLE IF NOT EXISTS skips (
    item_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    PRIMARY KEY (item_id, annotator)
);
"""

ADDED_COLUMNS = {"messages": "TEXT"}
"""Columns newer than the first queue files: added to an older file when it is opened."""
OPEN_STATES = ("pending", "leased")
BUSY_TIMEOUT_S = 30.0
"""How long one write waits for another process's transaction before failing."""


class QueueError(RuntimeError, UserError):
    """A request the queue cannot honour (unknown item, lease not held, a file that is not a
    queue); the message says why."""


class AlreadySaved(QueueError):
    """``complete`` for an item the same annotator has already saved (a double-clicked Submit,
    a retried request): nothing was changed. ``same_text`` says whether the repeat carried the
    text that was saved; a different text is not stored (a saved correction is final)."""

    def __init__(self, item: "Item", same_text: bool) -> None:
        self.item, self.same_text = item, same_text
        detail = "" if same_text else "; a saved correction is final, the new text was not stored"
        super().__init__(f"item {item.item_id!r}: already saved by {item.annotator!r}{detail}")


class ItemsNotOpen(QueueError):
    """An import named items that are unknown or no longer open (``states``: item id -> its
    state, None when unknown); nothing of that import was stored."""

    def __init__(self, states: dict[str, str | None]) -> None:
        self.states = states
        shown = ", ".join(f"{i!r} {'unknown' if s is None else 'already ' + s}" for i, s in states.items())
        super().__init__(f"{len(states)} item(s) not open, nothing stored: {shown}")


@dataclass(frozen=True)
class Item:
    item_id: str
    prompt_id: str
    prompt: str
    response: str
    task: str
    state: str
    enqueued_at: float
    lease_owner: str | None = None
    leased_at: float | None = None
    lease_expires: float | None = None
    leases: int = 0
    corrected: str | None = None
    annotator: str | None = None
    done_at: float | None = None
    edit_distance: int | None = None
    messages: str | None = None
    """The prompt's chat conversation (``Prompt.messages``) as JSON, None for a plain prompt:
    the page shows every turn, since ``prompt`` alone is only the last user message."""

    def public(self) -> dict:
        """What an annotator's page may see (no other annotator's names)."""
        return {"item_id": self.item_id, "prompt": self.prompt, "response": self.response, "task": self.task,
                "messages": json.loads(self.messages) if self.messages else None, "lease_expires": self.lease_expires}


def item_ids(rollouts: Sequence[Rollout]) -> list[str]:
    """Content ids: prompt id, policy version and response text, plus the occurrence of that
    triple within the batch, so identical samples of one prompt in one batch stay separate
    items while the same batch enqueued twice maps onto the same items. (The same triple in a
    later batch also finds the earlier item: the same text under the same policy needs the
    same correction, and nobody is asked twice.)"""
    seen: Counter = Counter()
    ids = []
    for r in rollouts:
        key = (r.prompt.prompt_id, r.policy_version, r.response_text)
        seen[key] += 1
        blob = json.dumps([*key, seen[key]], ensure_ascii=False).encode()
        ids.append(hashlib.sha256(blob).hexdigest()[:32])
    return ids


def _check_existing_queue(path: Path) -> None:
    """Refuse a path that is not already a queue, reading it only (a read-only connection: an
    SQLite file of something else must not be switched to WAL or given our tables)."""
    if not path.is_file():
        raise QueueError(f"{path}: no such correction queue file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='items'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise QueueError(f"{path}: not a correction queue (SQLite: {exc})") from None
    if found is None:
        raise QueueError(f"{path}: an SQLite file, but not a correction queue (no items table)")


class CorrectionQueue:
    """Thread-safe handle on one queue file (one connection per thread, WAL journal); handles in
    several processes (the Ray teacher workers) share the file safely."""

    def __init__(self, path: str | Path, lease_timeout_s: float = 300.0, create: bool = True) -> None:
        """Opens (creating if needed) the queue file; any number of handles, in any number of
        processes on the same node, may share one file. ``create=False`` (the offline tool's
        ``--db``) opens only an existing queue: a missing file, or an SQLite file of something
        else, raises ``QueueError`` instead of becoming a queue."""
        if lease_timeout_s <= 0:
            raise ValueError(f"lease_timeout_s={lease_timeout_s}: must be > 0")
        self.path = Path(path)
        if not create:
            _check_existing_queue(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_timeout_s = float(lease_timeout_s)
        self._local = threading.local()
        try:
            with self._tx() as db:
                for statement in filter(str.strip, SCHEMA.split(";")):
                    db.execute(statement)
                have = {row["name"] for row in db.execute("PRAGMA table_info(items)")}
                for column, kind in ADDED_COLUMNS.items():
                    if column not in have:  # a queue file written before the column existed
                        db.execute(f"ALTER TABLE items ADD COLUMN {column} {kind}")
        except sqlite3.DatabaseError as exc:  # "file is not a database", a directory, no access
            self.close()
            raise QueueError(f"{self.path}: cannot be used as a correction queue (SQLite: {exc})") from None

    # -- connection plumbing -----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, set up for several processes on one node sharing the file.

        * busy timeout (``connect(timeout=BUSY_TIMEOUT_S)``): a writer waits for another
          process's transaction instead of failing with "database is locked"; every write is
          one short ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two
          writers never deadlock upgrading read locks).
        * WAL journal: readers (the teachers polling ``items``) never block the writer (a save)
          and vice versa. WAL needs shared memory, hence one node and a local disk.
        * ``synchronous=FULL``: a commit is on disk before we tell the browser "saved".

        Switching a new file to WAL needs a moment of exclusive access, which SQLite does not
        always wait for; when several processes open a fresh file at once we retry (bounded)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            except sqlite3.Error as exc:
                raise QueueError(f"{self.path}: cannot open the correction queue (SQLite: {exc})") from None
            conn.row_factory = sqlite3.Row
            deadline = time.monotonic() + BUSY_TIMEOUT_S
            while True:
                try:
                    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    break
                except sqlite3.DatabaseError as exc:
                    if "locked" not in str(exc):  # "file is not a database", an I/O error
                        conn.close()
                        raise QueueError(f"{self.path}: cannot be used as a correction queue (SQLite: {exc})") from None
                    if time.monotonic() > deadline:
                        conn.close()
                        raise QueueError(f"{self.path}: cannot switch to WAL journal: {exc}") from exc
                    time.sleep(0.05)
            if mode.lower() != "wal":
                conn.close()
                raise QueueError(f"{self.path}: journal mode {mode!r}, not WAL (a network file system? "
                                 "the queue needs a local disk, docs/human-teachers.md)")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> "_Tx":
        return self._Tx(self._conn())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @staticmethod
    def _item(row: sqlite3.Row | None) -> Item | None:
        return Item(**dict(row)) if row is not None else None

    # -- producer side (the teacher) ---------------------------------------------------------

    def enqueue(self, rollouts: Sequence[Rollout], now: float | None = None) -> list[str]:
        """One item per rollout; returns their ids, in order. A rollout already queued keeps
        its item (open, or done with its correction); a cancelled one is reopened."""
        now = time.time() if now is None else now
        ids = item_ids(rollouts)
        with self._tx() as db:
            db.executemany(
                "INSERT INTO items (item_id, prompt_id, prompt, response, task, enqueued_at, messages) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(item_id) DO UPDATE SET state='pending', "
                "enqueued_at=excluded.enqueued_at, lease_owner=NULL, leased_at=NULL, lease_expires=NULL "
                "WHERE items.state='cancelled'",
                [(i, r.prompt.prompt_id, r.prompt.text, r.response_text, r.prompt.task, now + k * 1e-6,
                  json.dumps(r.prompt.messages, ensure_ascii=False) if r.prompt.messages else None)
                 for k, (i, r) in enumerate(zip(ids, rollouts))],
            )
        return ids

    def get(self, item_id: str) -> Item | None:
        return self._item(self._conn().execute("SELECT * FROM items WHERE item_id=?", (item_id,)).fetchone())

    def items(self, item_ids: Iterable[str]) -> dict[str, Item]:
        """The items among ``item_ids``, in any state."""
        ids = list(item_ids)
        out: dict[str, Item] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = self._conn().execute(
                f"SELECT * FROM items WHERE item_id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            out.update({r["item_id"]: self._item(r) for r in rows})
        return out

    def done(self, item_ids: Iterable[str]) -> dict[str, Item]:
        """The finished items among ``item_ids``."""
        return {i: item for i, item in self.items(item_ids).items() if item.state == "done"}

    def cancel(self, item_ids: Iterable[str]) -> int:
        """Withdraws still-open items (the teacher stopped waiting); returns how many. A done item
        stays done: the check and the update are one transaction, so no correction is lost."""
        ids = list(item_ids)
        with self._tx() as db:
            n = 0
            for item_id in ids:
                n += db.execute(
                    "UPDATE items SET state='cancelled', lease_owner=NULL WHERE item_id=? AND state IN ('pending','leased')",
                    (item_id,),
                ).rowcount
        return n

    # -- annotator side (the web app, offline import) -------------------------------------------

    def lease(self, annotator: str, now: float | None = None) -> Item | None:
        """The oldest open item this annotator has not skipped, leased to them; None when none.

        An annotator who still holds an unexpired lease gets that same item back (a reloaded
        page resumes where it was, instead of leaking a second lease)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM items WHERE state='leased' AND lease_owner=? AND lease_expires>? "
                "ORDER BY enqueued_at LIMIT 1", (annotator, now),
            ).fetchone()
            if row is not None:
                return self._item(row)
            row = db.execute(
                "SELECT * FROM items WHERE (state='pending' OR (state='leased' AND lease_expires<=?)) "
                "AND item_id NOT IN (SELECT item_id FROM skips WHERE annotator=?) "
                "ORDER BY enqueued_at LIMIT 1", (now, annotator),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE items SET state='leased', lease_owner=?, leased_at=?, lease_expires=?, leases=leases+1 "
                "WHERE item_id=?", (annotator, now, now + self.lease_timeout_s, row["item_id"]),
            )
            return self._item(db.execute("SELECT * FROM items WHERE item_id=?", (row["item_id"],)).fetchone())

    def _held(self, db: sqlite3.Connection, item_id: str, annotator: str, now: float) -> sqlite3.Row:
        row = db.execute("SELECT * FROM items WHERE item_id=?", (item_id,)).fetchone()
        if row is None:
            raise QueueError(f"item {item_id!r}: unknown")
        if row["state"] != "leased" or row["lease_owner"] != annotator:
            raise QueueError(f"item {item_id!r}: not leased to {annotator!r} (state {row['state']}); "
                             "its lease expired and it went to someone else, or it was withdrawn")
        return row

    def renew(self, item_id: str, annotator: str, now: float | None = None) -> float:
        """Extends the caller's lease (the page does this while the annotator is editing)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            self._held(db, item_id, annotator, now)
            expires = now + self.lease_timeout_s
            db.execute("UPDATE items SET lease_expires=? WHERE item_id=?", (expires, item_id))
        return expires

    def complete(self, item_id: str, annotator: str, corrected: str, now: float | None = None) -> Item:
        """Stores y' for the item the caller holds; committed (on disk) when this returns.

        A lease that expired but was not yet taken by anyone else still counts: the work is not
        thrown away. A lease taken over by another annotator raises ``QueueError``; an item this
        annotator already saved raises ``AlreadySaved`` (a double-clicked Submit is not "lost
        its lease") and changes nothing."""
        from correction_rl.edits import edit_distance

        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT * FROM items WHERE item_id=?", (item_id,)).fetchone()
            if row is not None and row["state"] == "done" and row["annotator"] == annotator:
                raise AlreadySaved(self._item(row), same_text=row["corrected"] == corrected)  # type: ignore[arg-type]
            row = self._held(db, item_id, annotator, now)
            db.execute(
                "UPDATE items SET state='done', corrected=?, annotator=?, done_at=?, edit_distance=?, "
                "lease_owner=NULL WHERE item_id=?",
                (corrected, annotator, now, edit_distance(row["response"], corrected), item_id),
            )
        return self.get(item_id)  # type: ignore[return-value]

    def skip(self, item_id: str, annotator: str, now: float | None = None) -> None:
        """Gives the item back for someone else; this annotator is not offered it again."""
        now = time.time() if now is None else now
        with self._tx() as db:
            self._held(db, item_id, annotator, now)
            db.execute("INSERT OR IGNORE INTO skips (item_id, annotator) VALUES (?, ?)", (item_id, annotator))
            db.execute("UPDATE items SET state='pending', lease_owner=NULL, lease_expires=NULL WHERE item_id=?",
                       (item_id,))

    def import_correction(self, item_id: str, annotator: str, corrected: str, now: float | None = None) -> Item:
        """Offline import of one correction (``import_corrections`` with one row)."""
        return self.import_corrections([(item_id, annotator, corrected)], now)[0]

    def import_corrections(self, rows: Sequence[tuple[str, str, str]], now: float | None = None) -> list[Item]:
        """Offline import: stores ``(item_id, annotator, y')`` for open items regardless of
        leases (the file is the authority), all or nothing. The states are checked inside the
        same transaction that stores, so an item cancelled (or saved in the app) after the
        file was validated makes the whole import fail with ``ItemsNotOpen``, nothing stored."""
        from correction_rl.edits import edit_distance

        now = time.time() if now is None else now
        with self._tx() as db:
            found = {r["item_id"]: r for r in (
                db.execute("SELECT * FROM items WHERE item_id=?", (item_id,)).fetchone() for item_id, _, _ in rows)
                if r is not None}
            not_open = {item_id: (found[item_id]["state"] if item_id in found else None)
                        for item_id, _, _ in rows
                        if item_id not in found or found[item_id]["state"] not in OPEN_STATES}
            if not_open:
                raise ItemsNotOpen(not_open)  # rolls the transaction back: nothing stored
            db.executemany(
                "UPDATE items SET state='done', corrected=?, annotator=?, done_at=?, edit_distance=?, "
                "lease_owner=NULL WHERE item_id=?",
                [(corrected, annotator, now, edit_distance(found[item_id]["response"], corrected), item_id)
                 for item_id, annotator, corrected in rows],
            )
        stored = self.items(item_id for item_id, _, _ in rows)
        return [stored[item_id] for item_id, _, _ in rows]

    # -- reading -------------------------------------------------------------------------------

    def open_items(self) -> list[Item]:
        rows = self._conn().execute(
            "SELECT * FROM items WHERE state IN ('pending','leased') ORDER BY enqueued_at").fetchall()
        return [self._item(r) for r in rows]  # type: ignore[misc]

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) AS n FROM items GROUP BY state").fetchall()
        out = {s: 0 for s in ("pending", "leased", "done", "cancelled")}
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def wait_s_mean(self) -> float:
        """Mean time from enqueue to saved correction over all finished items."""
        row = self._conn().execute("SELECT AVG(done_at - enqueued_at) FROM items WHERE state='done'").fetchone()
        return float(row[0] or 0.0)

    def depth(self) -> int:
        """Items waiting for a correction (pending or leased)."""
        c = self.counts()
        return c["pending"] + c["leased"]

    def annotator_stats(self) -> dict[str, dict[str, float]]:
        """Per annotator: corrections, mean edit distance, mean time from lease to save."""
        rows = self._conn().execute(
            "SELECT annotator, COUNT(*) AS n, AVG(edit_distance) AS ed, AVG(done_at - leased_at) AS ttc "
            "FROM items WHERE state='done' GROUP BY annotator").fetchall()
        return {r["annotator"]: {"corrections": float(r["n"]), "edit_distance_mean": float(r["ed"] or 0.0),
                                 "time_to_correct_s_mean": float(r["ttc"] or 0.0)} for r in rows}

    def progress(self, annotator: str) -> dict[str, int]:
        mine = self._conn().execute(
            "SELECT COUNT(*) FROM items WHERE state='done' AND annotator=?", (annotator,)).fetchone()[0]
        c = self.counts()
        return {"done_by_you": int(mine), "done": c["done"], "open": c["pending"] + c["leased"]}

