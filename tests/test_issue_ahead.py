"""The async driver issues step k+1 before step k has returned (``Driver.issue_ahead``, issue 19):
the learner goes from one step and its export to the next without waiting for the driver's
turnaround. These runs check what that must not break: nothing runs between two steps issued
back to back when an evaluation or a checkpoint needs it there, a checkpoint holds exactly the
version it names, every row carries its own step's sync, and a step issued ahead that finds no
batch trains nothing and the run goes on.
"""

from __future__ import annotations

import json

import pytest
from test_distributed import system_config

from correction_rl.observe.metrics import read_jsonl_metrics

pytestmark = pytest.mark.slow


def _record(monkeypatch, method: str) -> list[int]:
    """Wrap ``Driver.<method>``; returns the driver's version at each call that did something
    (``issue_ahead``: returned a step)."""
    from correction_rl.distributed.driver import Driver

    calls: list[int] = []
    original = getattr(Driver, method)

    def recorded(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if method != "issue_ahead" or result is not None:
            calls.append(self.version)
        return result

    monkeypatch.setattr(Driver, method, recorded)
    return calls


def test_steps_are_issued_ahead_except_where_evaluation_or_a_checkpoint_runs_between(
        tmp_path, ray_local, warm_policy_dir, monkeypatch):
    from correction_rl.distributed.driver import run

    ahead = _record(monkeypatch, "issue_ahead")
    cfg = system_config(tmp_path, warm_policy_dir, "ahead", total_steps=7, eval__every_steps=3,
                        checkpoint__every_steps=4)
    result = run(cfg)
    assert result.steps == 7

    # the step making version u is issued ahead when the step before (making u-1) has a plan
    # with nothing between: u-1 in {1, 2, 5}; 3 and 6 evaluate, 4 checkpoints, 7 ends the run
    assert [version + 2 for version in ahead] == [2, 3, 6]
    rows = [r for r in read_jsonl_metrics(result.run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["sync/version"] for r in rows] == list(range(1, 8))  # each row its own step's sync
    assert all(r["train/num_pairs"] == cfg.learner.micro_batch_pairs for r in rows)
    assert {r["step"] for r in rows if "eval/greedy/correction_rate" in r} == {3, 6}
    saved = json.loads((result.run_dir / "checkpoints" / "step-00000004" / "learner" / "learner.json").read_text())
    assert saved["version"] == 4 and saved["counters"]["steps"] == 4  # not a step issued after it


def test_a_step_issued_ahead_without_a_batch_trains_nothing_and_the_run_goes_on(
        tmp_path, ray_local, warm_policy_dir, monkeypatch):
    """``max_staleness: 0`` needs pairs of the very version the step trains from, which cannot
    exist when the step is issued ahead (its predecessor has not even finished): with requests
    that wait 0.01 s, such steps find no batch. Each must come back empty, publish the export
    queued behind it (the next optimizer update waits for that), leave the next step to wait for
    its batch the ordinary way (a request at a version never reached would starve the run), and
    the run must train every step on a full batch."""
    from correction_rl.distributed import sampling
    from correction_rl.distributed.driver import run

    monkeypatch.setattr(sampling, "SAMPLE_WAIT_S", 0.01)
    missed = _record(monkeypatch, "missed_batch")
    cfg = system_config(tmp_path, warm_policy_dir, "ahead-missed", total_steps=4, buffer__max_staleness=0,
                        eval__every_steps=0, resources__call_timeout_s=90)  # a starved run fails in 90 s
    result = run(cfg)
    assert result.steps == 4
    assert missed, "no step issued ahead went without a batch: the test did not reach the path"

    rows = [r for r in read_jsonl_metrics(result.run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["train/num_pairs"] == cfg.learner.micro_batch_pairs for r in rows)
    assert all(r["train/skipped_steps"] == 0 for r in rows)  # an empty step is not a skipped one
    assert max(r["buffer/batch_staleness_max"] for r in rows) == 0
