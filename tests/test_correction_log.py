"""Durable correction log: append + reopen, crash tails, corruption, dedupe, single writer."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from correction_rl.buffer.correction_log import (
    CorrectionLog,
    CorrectionLogError,
    TruncatedLogWarning,
    pair_record,
    read,
    scan,
)
from correction_rl.types import CorrectionPair, make_pair_id

ROOT = str(Path(__file__).resolve().parents[1])


def pair(i: int, version: int = 0, noop: bool = False) -> CorrectionPair:
    rejected = [10 + i % 7, 11, 12, 2]
    chosen = list(rejected) if noop else [10 + i % 7, 13, 2]
    return CorrectionPair(
        pair_id=make_pair_id(f"p{i}", rejected[:-1], version), prompt_ids=[1, 5, 6],
        rejected_ids=rejected, chosen_ids=chosen, policy_version=version, teacher="oracle",
        edit_distance=0 if noop else 2, prompt_id=f"p{i}",
        ref_logps=(-1.5, -2.25) if i % 2 else None,
    )


def test_append_then_read_back_identical_records(tmp_path):
    path = tmp_path / "corrections.jsonl"
    pairs = [pair(i) for i in range(5)]
    with CorrectionLog(path, meta={"run": "t", "teacher": "oracle"}) as log:
        assert log.append(pairs[:3]) == pairs[:3]
        assert log.append(pairs[3:]) == pairs[3:]
        assert len(log) == 5
    assert list(read(path)) == pairs  # ref_logps tuples survive the JSON round trip
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["type"] == "header" and header["meta"] == {"run": "t", "teacher": "oracle"}
    assert [json.loads(x)["type"] for x in lines[1:]] == ["pair"] * 5
    assert scan(path).records == 5


def test_fast_record_serializes_like_to_json():
    for p in (pair(0), pair(1, version=4, noop=True)):
        assert json.dumps(pair_record(p)) == json.dumps(p.to_json())


def test_reopen_appends_and_dedupes_against_earlier_sessions(tmp_path):
    path = tmp_path / "log.jsonl"
    with CorrectionLog(path) as log:
        log.append([pair(0), pair(1)])
    with CorrectionLog(path) as log:
        assert log.seen_ids() == {pair(0).pair_id, pair(1).pair_id}
        assert pair(1).pair_id in log
        written = log.append([pair(1), pair(2), pair(2), pair(0), pair(3)])
        assert [p.pair_id for p in written] == [pair(2).pair_id, pair(3).pair_id]
        assert len(log) == 4
    ids = [p.pair_id for p in read(path)]
    assert ids == [pair(i).pair_id for i in range(4)] and len(set(ids)) == 4
    assert sum(1 for line in path.read_text().splitlines() if '"header"' in line) == 1


def test_truncated_final_line_is_reported_and_skipped(tmp_path):
    path = tmp_path / "log.jsonl"
    with CorrectionLog(path) as log:
        log.append([pair(0), pair(1)])
    full = json.dumps({"type": "pair", "logged_at": 0.0, "pair": pair(2).to_json()})
    with open(path, "a") as fh:
        fh.write(full[: len(full) // 2])  # the crash hit mid-write
    with pytest.warns(TruncatedLogWarning, match=r"log\.jsonl:4: partial final record"):
        got = list(read(path))
    assert [p.pair_id for p in got] == [pair(0).pair_id, pair(1).pair_id]

    # Reopening for append moves the partial tail aside, so new records are not glued to it.
    with pytest.warns(TruncatedLogWarning, match="moved to"):
        log = CorrectionLog(path)
    assert log.recovered_partial is not None
    assert log.recovered_partial.read_text() == full[: len(full) // 2]
    log.append([pair(2)])
    log.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean now: no warning
        assert [p.pair_id for p in read(path)] == [pair(i).pair_id for i in range(3)]


def test_zero_filled_tail_after_crash_is_tolerated(tmp_path):
    path = tmp_path / "log.jsonl"
    with CorrectionLog(path) as log:
        log.append([pair(0)])
    with open(path, "ab") as fh:
        fh.write(b"\x00" * 64)
    with pytest.warns(TruncatedLogWarning):
        assert len(list(read(path))) == 1


def test_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "log.jsonl"
    with CorrectionLog(path) as log:
        log.append([pair(0)])
    with open(path, "a") as fh:
        fh.write(json.dumps({"type": "pair", "logged_at": 0.0, "pair": pair(1).to_json()}))
    assert len(list(read(path))) == 2
    with CorrectionLog(path) as log:
        assert len(log) == 2
        log.append([pair(2)])
    assert len(list(read(path))) == 3


def test_corrupted_middle_line_fails_with_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with CorrectionLog(path) as log:
        log.append([pair(i) for i in range(4)])
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][:30] + "###" + lines[2][30:]  # line 3 = the second pair
    path.write_text("".join(lines))
    with pytest.raises(CorrectionLogError, match=rf"{path.name}:3: not a JSON record"):
        list(read(path))
    with pytest.raises(CorrectionLogError, match=":3:"):
        CorrectionLog(path)
    with pytest.raises(CorrectionLogError, match=":3:"):  # the failed open released its lock
        CorrectionLog(path)


def test_bad_pair_fields_and_blank_lines_are_named(tmp_path):
    path = tmp_path / "log.jsonl"
    with CorrectionLog(path) as log:
        log.append([pair(0), pair(1)])
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["pair"]["surprise"] = 1
    bad = lines[:1] + [json.dumps(record) + "\n"] + lines[2:]
    path.write_text("".join(bad))
    with pytest.raises(CorrectionLogError, match=r":2: bad pair record.*surprise"):
        list(read(path))
    path.write_text("".join(lines[:2] + ["\n"] + lines[2:]))
    with pytest.raises(CorrectionLogError, match=":3: empty line inside the log"):
        list(read(path))


def test_failed_write_leaves_no_half_record(tmp_path, monkeypatch):
    import correction_rl.buffer.correction_log as mod

    path = tmp_path / "log.jsonl"
    log = CorrectionLog(path)
    log.append([pair(0)])
    real_write = mod.os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod.os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        log.append([pair(1), pair(2)])
    monkeypatch.setattr(mod.os, "write", real_write)
    assert pair(1).pair_id not in log  # not recorded as written: it will be retried
    assert log.append([pair(1), pair(2)]) == [pair(1), pair(2)]
    log.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p.pair_id for p in read(path)] == [pair(i).pair_id for i in range(3)]


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.5}\n')
    with pytest.raises(CorrectionLogError, match=r"metrics\.jsonl:1: not a correction log header"):
        list(read(path))


def test_second_writer_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "log.jsonl"
    first = CorrectionLog(path)
    with pytest.raises(CorrectionLogError, match="another writer"):
        CorrectionLog(path)
    first.close()
    CorrectionLog(path).close()


def test_records_survive_a_killed_writer_process(tmp_path):
    """The writer process dies right after append() returns (no close, no atexit): every
    appended record is on disk, because append flushes and fsyncs."""
    path = tmp_path / "log.jsonl"
    code = (
        "import os, sys\n"
        "from correction_rl.buffer.correction_log import CorrectionLog\n"
        "from tests.test_correction_log import pair\n"
        "log = CorrectionLog(sys.argv[1])\n"
        "log.append([pair(i) for i in range(3)])\n"
        "log.append([pair(3)])\n"
        "os._exit(9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 9, out.stderr
    assert [p.pair_id for p in read(path)] == [pair(i).pair_id for i in range(4)]
