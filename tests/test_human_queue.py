"""The human teacher's durable SQLite queue and its offline JSONL mode: leases, lease expiry,
exactly-once saves, durability across a reopen, and import errors that name file:line."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from correction_rl.teachers.human.offline import (
    CorrectionImportError,
    export_pending,
    import_corrections,
    read_import,
    store_import,
)
from correction_rl.teachers.human.queue import AlreadySaved, CorrectionQueue, QueueError
from correction_rl.teachers.human.teacher import HumanTeacher
from correction_rl.types import Prompt, Rollout


def rollouts(texts: list[str]) -> list[Rollout]:
    return [Rollout(prompt=Prompt(prompt_id=f"p{k}", text=f"What is {k}+{k}?", task="addition", answer=str(2 * k)),
                    prompt_ids=[1, 2], response_ids=[3], response_text=t, policy_version=0)
            for k, t in enumerate(texts)]


def test_lease_expires_and_the_item_is_offered_again_and_stored_once(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite", lease_timeout_s=10)
    (item_id,) = q.enqueue(rollouts(["4"]), now=0.0)
    first = q.lease("alice", now=1.0)
    assert first.item_id == item_id and first.lease_expires == 11.0
    assert q.lease("bob", now=5.0) is None  # alice's lease still runs
    assert q.lease("alice", now=6.0).item_id == item_id  # reload resumes the same lease
    second = q.lease("bob", now=12.0)  # expired: offered again
    assert second.item_id == item_id and second.leases == 2
    with pytest.raises(QueueError, match="not leased to 'alice'"):
        q.complete(item_id, "alice", "stale tab", now=13.0)
    saved = q.complete(item_id, "bob", "2", now=14.0)
    assert (saved.state, saved.corrected, saved.annotator, saved.edit_distance) == ("done", "2", "bob", 1)
    with pytest.raises(QueueError):
        q.complete(item_id, "bob", "again", now=15.0)
    assert q.counts() == {"pending": 0, "leased": 0, "done": 1, "cancelled": 0}


def test_expired_but_untaken_lease_still_saves_and_skip_moves_item_on(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite", lease_timeout_s=1)
    a, b = q.enqueue(rollouts(["1", "2"]), now=0.0)
    assert q.lease("alice", now=0.0).item_id == a
    assert q.complete(a, "alice", "0", now=50.0).state == "done"  # nobody took it: work kept
    assert q.lease("alice", now=51.0).item_id == b
    q.skip(b, "alice", now=51.5)
    assert q.lease("alice", now=52.0) is None  # never offered back to who skipped it
    assert q.lease("bob", now=52.0).item_id == b


def test_concurrent_annotators_never_share_an_item(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite", lease_timeout_s=600)
    q.enqueue(rollouts([str(k) for k in range(60)]))
    got: dict[str, list[str]] = {}

    def work(name: str) -> None:
        mine = got.setdefault(name, [])
        while (item := q.lease(name)) is not None:
            mine.append(item.item_id)
            q.complete(item.item_id, name, item.response + "!")
        q.close()

    threads = [threading.Thread(target=work, args=(f"a{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    all_ids = [i for ids in got.values() for i in ids]
    assert len(all_ids) == 60 and len(set(all_ids)) == 60
    assert q.counts()["done"] == 60
    assert sum(s["corrections"] for s in q.annotator_stats().values()) == 60


def _process_worker(path: str, name: str, n_items: int, start: float) -> None:
    """One training process and one annotator at once, like a Ray teacher worker beside the app."""
    import time as _time

    q = CorrectionQueue(path, lease_timeout_s=600)
    _time.sleep(max(0.0, start - _time.time()))  # all processes open and write at the same moment
    q.enqueue(rollouts([f"{name}-{k}" for k in range(n_items)]))
    while (item := q.lease(name)) is not None:
        q.complete(item.item_id, name, item.response + "!")


def test_processes_sharing_one_queue_file_never_share_an_item_or_lose_a_save(tmp_path):
    import multiprocessing
    import time

    path = tmp_path / "shared.sqlite"  # created by the racing processes themselves
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 1.5
    procs = [ctx.Process(target=_process_worker, args=(str(path), f"w{i}", 30, start)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    q = CorrectionQueue(path)
    assert q.counts() == {"pending": 0, "leased": 0, "done": 90, "cancelled": 0}
    rows = q._conn().execute("SELECT leases, corrected, response FROM items").fetchall()
    assert all(r["leases"] == 1 and r["corrected"] == r["response"] + "!" for r in rows)
    assert q._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_saved_corrections_survive_reopening_the_queue(tmp_path):
    path = tmp_path / "q.sqlite"
    q = CorrectionQueue(path)
    ids = q.enqueue(rollouts(["5", "7"]))
    item = q.lease("alice")
    q.complete(item.item_id, "alice", "0")
    q.close()
    again = CorrectionQueue(path)
    done = again.done(ids)
    assert list(done) == [ids[0]] and done[ids[0]].corrected == "0"
    assert [i.item_id for i in again.open_items()] == [ids[1]]


def test_a_retried_batch_finds_its_items_and_the_corrections_already_saved(tmp_path):
    """Ray retries ``correct`` when a teacher worker dies mid-wait: the retry must not queue a
    second copy of the batch, and what people saved before the death must be used."""
    q = CorrectionQueue(tmp_path / "q.sqlite")
    batch = rollouts(["1", "1", "3"])
    batch[1] = batch[0]  # two identical samples of one prompt: two items
    first = q.enqueue(batch)
    assert len(set(first)) == 3
    item = q.lease("alice")
    q.complete(item.item_id, "alice", "0")  # then the teacher worker dies
    q.lease("bob")  # bob holds the second one when the retry arrives
    retried = HumanTeacher(q, wait_s=0.3, poll_s=0.05).correct(batch)
    assert q.counts() == {"pending": 0, "leased": 0, "done": 1, "cancelled": 2}  # no new item
    assert [c.corrected_text for c in retried] == ["0", None, None]
    assert [c.rejection for c in retried] == [None, "timeout", "timeout"]
    assert q.enqueue(batch) == first
    assert q.counts() == {"pending": 2, "leased": 0, "done": 1, "cancelled": 0}, "withdrawn items reopen"


def test_a_caller_giving_up_does_not_withdraw_an_item_another_caller_still_waits_for(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite")
    batch = rollouts(["5"])
    result: list = []
    waiter = threading.Thread(target=lambda: result.extend(HumanTeacher(q, wait_s=20, poll_s=0.02).correct(batch)))
    waiter.start()
    while not q.open_items():
        pass
    # the same rollout (same content id) from a second caller that gives up meanwhile
    assert HumanTeacher(q, wait_s=0.1, poll_s=0.02).correct(batch)[0].rejection == "timeout"
    deadline = time.monotonic() + 10
    while (item := q.lease("alice")) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert item is not None, "withdrawn for good: the waiting caller did not reopen it"
    q.complete(item.item_id, "alice", "0")
    waiter.join(20)
    assert [c.corrected_text for c in result] == ["0"]


def test_teacher_times_out_withdraws_and_counts_and_uses_the_fallback(tmp_path):
    from correction_rl.teachers.oracle import OracleTeacher

    q = CorrectionQueue(tmp_path / "q.sqlite")
    teacher = HumanTeacher(q, wait_s=0.3, poll_s=0.05)
    out = teacher.correct(rollouts(["1", "3"]))
    assert [c.rejection for c in out] == ["timeout", "timeout"]
    assert q.counts()["cancelled"] == 2 and q.depth() == 0
    m = teacher.metrics()
    assert m["teacher/human/rejected/timeout"] == 2 and m["teacher/human/queue_depth"] == 0

    q2 = CorrectionQueue(tmp_path / "q2.sqlite")  # metrics count the whole queue file
    backed = HumanTeacher(q2, wait_s=0.2, poll_s=0.05, fallback=OracleTeacher())
    out = backed.correct(rollouts(["1", "3"]))  # answers of 0+0 and 1+1
    assert [(c.corrected_text, c.teacher) for c in out] == [("0", "oracle"), ("2", "oracle")]
    assert backed.metrics()["teacher/human/fallback"] == 2


def test_offline_export_then_import_feeds_the_waiting_teacher(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite")
    teacher = HumanTeacher(q, wait_s=20, poll_s=0.05)
    result: list = []
    worker = threading.Thread(target=lambda: result.extend(teacher.correct(rollouts(["1", "9"]))))
    worker.start()
    out = tmp_path / "pending.jsonl"
    while export_pending(q, out) < 2:
        pass
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in lines] == ["1", "9"] and lines[1]["prompt"] == "What is 1+1?"
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"item_id": r["item_id"], "corrected": str(2 * k), "annotator": "carol"})
                               + "\n" for k, r in enumerate(lines)))
    assert import_corrections(q, answers).stored == 2
    worker.join(20)
    assert [c.corrected_text for c in result] == ["0", "2"]
    assert teacher.metrics()["teacher/human/edit_distance_mean/carol"] == 1.0


def test_offline_export_of_a_chat_prompt_carries_the_conversation_and_imports_back(tmp_path):
    """A chat prompt's line has its whole conversation (``prompt`` is the last user turn); a
    tool that echoes the line back with ``corrected`` added imports cleanly."""
    conversation = [{"role": "system", "content": "Fix spelling."}, {"role": "user", "content": "teh"},
                    {"role": "assistant", "content": "the"}, {"role": "user", "content": "recieve"}]
    q = CorrectionQueue(tmp_path / "q.sqlite")
    chat = Rollout(prompt=Prompt(prompt_id="c", text="recieve", messages=conversation), prompt_ids=[1],
                   response_ids=[2], response_text="recieve", policy_version=0)
    chat_id, plain_id = q.enqueue([chat, *rollouts(["3"])])
    out = tmp_path / "pending.jsonl"
    assert export_pending(q, out) == 2
    lines = {r["item_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert lines[chat_id]["messages"] == conversation and lines[chat_id]["prompt"] == "recieve"
    assert "messages" not in lines[plain_id]
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({**lines[chat_id], "corrected": "receive"}) + "\n")
    assert import_corrections(q, answers).stored == 1 and q.get(chat_id).corrected == "receive"


def test_import_names_file_and_line_of_every_bad_line_and_stores_nothing(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite")
    good, done = q.enqueue(rollouts(["1", "2"]))
    q.import_correction(done, "x", "2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"item_id": good, "corrected": "0"}),
        "{not json",
        json.dumps({"item_id": good, "corrected": 3}),
        json.dumps({"item_id": "nope", "corrected": "1"}),
        json.dumps({"item_id": done, "corrected": "1"}),
        json.dumps({"item_id": good, "corected": "1"}),
        json.dumps({"item_id": good, "corrected": "1"}),
    ]) + "\n")
    with pytest.raises(CorrectionImportError) as err:
        import_corrections(q, bad)
    errors = err.value.errors
    assert [e.split(": ")[0] for e in errors] == [f"{bad}:{n}" for n in (2, 3, 4, 5, 6, 7)]
    assert "not JSON" in errors[0] and "'corrected' must be a string" in errors[1]
    assert "not in the queue" in errors[2] and "already done" in errors[3]
    assert "unknown field(s) ['corected']" in errors[4] and "already corrected on line 1" in errors[5]
    assert q.get(good).state == "pending"  # nothing stored


def test_an_item_cancelled_between_validation_and_storing_fails_the_whole_import(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite")
    first, second = q.enqueue(rollouts(["1", "2"]))
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"item_id": first, "corrected": "0"}) + "\n"
                       + json.dumps({"item_id": second, "corrected": "2"}) + "\n")
    rows = read_import(q, answers)  # the whole file is valid ...
    assert len(rows) == 2
    assert q.cancel([second]) == 1  # ... then the teacher stops waiting for the second item
    with pytest.raises(CorrectionImportError) as err:
        store_import(q, answers, rows)
    assert err.value.errors == [f"{answers}:2: item {second!r} is now cancelled (changed while the file was validated)"]
    assert q.counts() == {"pending": 1, "leased": 0, "done": 0, "cancelled": 1}  # nothing stored
    assert q.get(first).corrected is None


def test_the_same_annotator_saving_twice_is_already_saved_not_a_lost_lease(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite")
    (item_id,) = q.enqueue(rollouts(["1"]))
    q.lease("alice")
    saved = q.complete(item_id, "alice", "2")
    with pytest.raises(AlreadySaved) as again:  # a double-clicked Submit
        q.complete(item_id, "alice", "2")
    assert again.value.same_text and again.value.item.done_at == saved.done_at
    with pytest.raises(AlreadySaved, match="a saved correction is final") as changed:
        q.complete(item_id, "alice", "3")
    assert not changed.value.same_text and q.get(item_id).corrected == "2"
    with pytest.raises(QueueError, match="not leased to 'bob'") as other:
        q.complete(item_id, "bob", "2")  # someone else: still the lease error
    assert not isinstance(other.value, AlreadySaved)


def _offline(tmp_path, *args: str, module: str = "correction_rl.cli") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module] + (["human-queue"] if module == "correction_rl.cli" else [])
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_offline_import_of_a_missing_file_is_one_error_line(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite")
    q.close()
    line = _one_error_line(_offline(tmp_path, "import", "missing.jsonl", "--db", "q.sqlite"))
    assert line == "error: missing.jsonl: No such file or directory"


def test_offline_import_of_bytes_that_are_not_utf8_names_the_line(tmp_path):
    q = CorrectionQueue(tmp_path / "q.sqlite")
    (item_id,) = q.enqueue(rollouts(["1"]))
    q.close()
    (tmp_path / "answers.jsonl").write_bytes(
        json.dumps({"item_id": item_id, "corrected": "2"}).encode() + b"\n"
        + b'{"item_id": "x", "corrected": "caf\xe9"}\n')  # Latin-1, as a spreadsheet may save it
    proc = _offline(tmp_path, "import", "answers.jsonl", "--db", "q.sqlite")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: answers.jsonl: 1 invalid line(s), nothing stored:",
        "  answers.jsonl:2: not UTF-8 text (byte 0xe9 at column 35); save the file as UTF-8"]
    assert CorrectionQueue(tmp_path / "q.sqlite").counts()["done"] == 0


@pytest.mark.parametrize("module", ["correction_rl.cli", "correction_rl.teachers.human.offline"])
def test_offline_tool_refuses_a_db_that_is_not_a_queue(tmp_path, module):
    (tmp_path / "answers.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("not a database, just text\n" * 100)
    line = _one_error_line(_offline(tmp_path, "import", "answers.jsonl", "--db", "notes.txt", module=module))
    assert line.startswith("error: notes.txt: not a correction queue (SQLite: file is not a database)")
    other = tmp_path / "other.sqlite"  # someone else's SQLite file: refused, and left as it was
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    before = other.read_bytes()
    line = _one_error_line(_offline(tmp_path, "export", "out.jsonl", "--db", "other.sqlite", module=module))
    assert line == "error: other.sqlite: an SQLite file, but not a correction queue (no items table)"
    assert other.read_bytes() == before and not (tmp_path / "out.jsonl").exists()
    line = _one_error_line(_offline(tmp_path, "import", "answers.jsonl", "--db", "nope.sqlite", module=module))
    assert line == "error: nope.sqlite: no such correction queue file"
    assert not (tmp_path / "nope.sqlite").exists()
