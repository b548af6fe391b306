"""Sweeps (docs/sweeps.md): spec validation, trial expansion, the results file's crash safety,
resume / retry planning, the report's numbers and files, and end to end on a real local Ray
cluster: a 2x2 sweep killed mid-way and resumed, every trial in results.jsonl exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from correction_rl.config import ConfigError
from correction_rl.errors import UserError
from correction_rl.sweep.execute import TrialJob, execute_trial
from correction_rl.sweep.plan import SweepDir, plan
from correction_rl.sweep.results import EvalPoint, TrialResult, append_row, read_results, repair_tail
from correction_rl.sweep.spec import SpecError, load_spec, spec_from_dict
from correction_rl.sweep.stats import Stat, gain_curve, matched_gain, read_at, summarize, within_noise
from correction_rl.sweep.trials import expand, validate

REPO = Path(__file__).resolve().parents[1]

# A run of a few seconds: tiny model, 3 learner steps of 8 pairs, 8 held-out prompts, one
# evaluation during training (so the eval history has before / middle / after).
TINY_RUN = {
    "mode": "inprocess", "total_steps": 3,
    "task": {"names": ["reverse"], "num_train": 64, "num_eval": 8},
    "rollout": {"batch_size": 8, "max_new_tokens": 8},
    "eval": {"num_prompts": 8, "every_steps": 2},
    "learner": {"backend": "torch", "micro_batch_pairs": 8},
    "buffer": {"min_fresh_pairs": 4},
    "metrics": {"wandb_mode": "disabled", "progress": "lines"},
}


@pytest.fixture
def base_config(tmp_path, tiny_model_dir) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({**TINY_RUN, "model": {"path": str(tiny_model_dir)}}))
    return path


def write_spec(tmp_path: Path, body: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Spec validation and expansion


def test_spec_errors_name_the_key(tmp_path, base_config):
    with pytest.raises(SpecError, match=r"unknown key 'seed'; did you mean 'seeds'\?"):
        spec_from_dict({"base": str(base_config), "seed": [0]})
    with pytest.raises(SpecError, match="base: the base run config path is required"):
        spec_from_dict({"seeds": [0]})
    with pytest.raises(SpecError, match=r"arm 'dpo' sets 'objective.form', which is also a grid field"):
        spec_from_dict({"base": "b.yaml", "grid": {"objective.form": ["dpo"]}, "arms": {"dpo": {"objective.form": "dpo"}}})
    with pytest.raises(SpecError, match=r"'output_dir' cannot be set in a sweep"):
        spec_from_dict({"base": "b.yaml", "overrides": {"output_dir": "x"}})
    with pytest.raises(SpecError, match=r"seeds: .* lists a seed twice"):
        spec_from_dict({"base": "b.yaml", "seeds": [1, 1]})
    with pytest.raises(SpecError, match=r"grid.learner.lr: expected a non-empty list"):
        spec_from_dict({"base": "b.yaml", "grid": {"learner.lr": 0.1}})
    with pytest.raises(SpecError, match=r"resources: unknown key 'gpus'; did you mean 'num_gpus'\?"):
        spec_from_dict({"base": "b.yaml", "resources": {"gpus": 1}})
    dup = tmp_path / "dup.yaml"
    dup.write_text("base: a.yaml\nseeds: [0]\nseeds: [1]\n")
    with pytest.raises(SpecError, match="duplicate key 'seeds'"):
        load_spec(dup)
    assert issubclass(SpecError, ConfigError) and issubclass(SpecError, UserError)


def test_a_typo_in_a_dotted_field_names_the_field_and_the_arm(tmp_path, base_config):
    spec = load_spec(write_spec(tmp_path, {
        "base": str(base_config), "arms": {"good": {"objective.beta": 0.2}, "typo": {"objective.bta": 0.2}}}))
    trials = expand(spec)
    with pytest.raises(SpecError) as err:
        validate(spec, trials, tmp_path / "trials")
    msg = str(err.value)
    assert "arm 'typo'" in msg and "objective.bta: unknown field; did you mean 'objective.beta'?" in msg
    bad_value = load_spec(write_spec(tmp_path, {"base": str(base_config), "grid": {"objective.form": ["dpo", "dpx"]}}))
    with pytest.raises(SpecError, match=r"(?s)arm 'form=dpx', seed 0: .*objective.form: Input should be"):
        validate(bad_value, expand(bad_value), tmp_path / "trials")


def test_expansion_order_ids_and_precedence(tmp_path, base_config):
    spec = load_spec(write_spec(tmp_path, {
        "base": str(base_config),
        "overrides": {"objective.beta": 0.3, "learner.lr": 1e-3},
        "grid": {"task.names": [["reverse"], ["sorting"]]},
        "arms": {"dpo": {"objective.form": "dpo"}, "ipo": {"objective.form": "ipo", "objective.beta": 0.05}},
        "seeds": [3, 4],
    }))
    trials = expand(spec)
    assert len(trials) == 8
    assert [t.seed for t in trials] == [3] * 4 + [4] * 4  # seeds outermost
    assert [t.trial_id for t in trials[:4]] == [
        "dpo__names=_reverse__s3", "ipo__names=_reverse__s3", "dpo__names=_sorting__s3", "ipo__names=_sorting__s3"]
    assert len({t.trial_id for t in trials}) == 8
    assert [t.trial_id for t in expand(spec)] == [t.trial_id for t in trials]  # stable
    ipo = trials[1]
    assert (ipo.arm, ipo.condition) == ("ipo", "names=[reverse]")
    assert ipo.overrides == {"objective.beta": 0.05, "learner.lr": 1e-3, "task.names": ["reverse"],
                             "objective.form": "ipo", "seed": 3}
    configs = validate(spec, trials, tmp_path / "trials")
    cfg = configs[ipo.trial_id]
    assert cfg["objective"]["beta"] == 0.05 and cfg["objective"]["form"] == "ipo" and cfg["seed"] == 3
    assert cfg["name"] == ipo.trial_id and Path(cfg["output_dir"]) == (tmp_path / "trials").resolve()
    assert configs[trials[0].trial_id]["objective"]["beta"] == 0.3  # common override where no arm sets it
    # without arms the grid points are the arms; the digest follows the base file's contents
    grid_only = load_spec(write_spec(tmp_path, {"base": str(base_config), "grid": {"objective.form": ["dpo"]}}))
    (t,) = expand(grid_only)
    assert (t.arm, t.condition, t.trial_id) == ("form=dpo", "", "form=dpo__s0")
    base_config.write_text(base_config.read_text().replace("total_steps: 3", "total_steps: 4"))
    assert expand(grid_only)[0].digest != t.digest


def test_conditions_pair_fields_that_a_grid_would_cross(tmp_path, base_config, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, {
        "base": str(base_config),
        "conditions": {"rev": {"task.names": ["reverse"], "model.path": str(tiny_model_dir)},
                       "sort": {"task.names": ["sorting"], "task.num_eval": 16}},
        "grid": {"learner.lr": [0.001]},
        "arms": {"dpo": {"objective.form": "dpo"}, "sft": {"objective.form": "sft"}},
    }))
    assert spec.name == "spec"  # the file's name, not an arm's or a condition's
    trials = expand(spec)
    assert [(t.trial_id, t.condition) for t in trials] == [
        ("dpo__rev__lr=0.001__s0", "rev,lr=0.001"), ("sft__rev__lr=0.001__s0", "rev,lr=0.001"),
        ("dpo__sort__lr=0.001__s0", "sort,lr=0.001"), ("sft__sort__lr=0.001__s0", "sort,lr=0.001")]
    assert trials[2].overrides == {"task.names": ["sorting"], "task.num_eval": 16, "learner.lr": 0.001,
                                   "objective.form": "dpo", "seed": 0}
    configs = validate(spec, trials, tmp_path / "trials")
    assert configs[trials[3].trial_id]["task"]["names"] == ["sorting"]
    with pytest.raises(SpecError, match=r"arm 'x' sets 'task.names', which a condition sets too"):
        spec_from_dict({"base": "b.yaml", "conditions": {"c": {"task.names": ["reverse"]}},
                        "arms": {"x": {"task.names": ["sorting"]}}})
    with pytest.raises(SpecError, match=r"condition 'c' sets 'learner.lr', which is also a grid field"):
        spec_from_dict({"base": "b.yaml", "conditions": {"c": {"learner.lr": 0.1}}, "grid": {"learner.lr": [0.2]}})


# ---------------------------------------------------------------------------------------------
# results.jsonl


def row(trial_id: str, status: str = "ok", arm: str = "a", seed: int = 0, before: float = 0.8,
        after: float = 0.4, kl: float = 0.1, history: list[EvalPoint] | None = None, digest: str = "d") -> TrialResult:
    return TrialResult(
        trial_id=trial_id, arm=arm, condition="", seed=seed, overrides={"seed": seed}, digest=digest,
        status=status, wall_s=1.0, error=None if status == "ok" else "error: boom",
        teacher_calls=100.0, before={"greedy/correction_rate": before, "sampled/kl": 0.0},
        after={"greedy/correction_rate": after, "sampled/kl": kl}, history=history or [])


def test_torn_last_line_is_tolerated_reported_and_repaired(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, row("t1"))
    append_row(path, row("t2"))
    full = json.dumps(row("t3").to_json())
    with open(path, "a") as fh:
        fh.write(full[: len(full) // 2])  # a write cut short by a crash
    found = read_results(path)
    assert [r.trial_id for r in found.rows] == ["t1", "t2"]
    assert found.torn is not None and "torn last line" in found.notes[0]
    aside = repair_tail(path)
    assert aside is not None and aside.read_text() == full[: len(full) // 2]
    append_row(path, row("t3"))
    again = read_results(path)
    assert [r.trial_id for r in again.rows] == ["t1", "t2", "t3"] and again.torn is None and not again.notes
    assert repair_tail(path) is None


def test_bad_middle_lines_and_duplicates_are_reported(tmp_path):
    path = tmp_path / "results.jsonl"
    append_row(path, row("t1"))
    with open(path, "a") as fh:
        fh.write("not json\n")
    append_row(path, row("t1", after=0.1))
    found = read_results(path)
    assert [r.trial_id for r in found.rows] == ["t1"] and found.rows[0].after["greedy/correction_rate"] == 0.4
    assert found.bad_lines == [2] and found.duplicates == ["t1"]


def test_plan_resume_and_retry_failed(tmp_path, base_config):
    spec = load_spec(write_spec(tmp_path, {"base": str(base_config), "grid": {"learner.lr": [0.001, 0.01, 0.1]}}))
    a, b, c = expand(spec)
    sweep = SweepDir(tmp_path / "sweep")
    sweep.root.mkdir()
    append_row(sweep.results, row(a.trial_id, digest=a.digest))
    append_row(sweep.results, row(b.trial_id, status="failed", digest=b.digest))
    (sweep.run_dir(c.trial_id)).mkdir(parents=True)  # c was running when the sweep was killed
    (sweep.run_dir(c.trial_id) / "metrics.jsonl").write_text("{}\n")
    first = plan(sweep, [a, b, c])
    assert [t.trial_id for t in first.todo] == [c.trial_id] and len(first.done) == 2
    assert first.moved and first.moved[0][0] == c.trial_id and (first.moved[0][1] / "metrics.jsonl").exists()
    assert not sweep.run_dir(c.trial_id).exists()
    retry = plan(sweep, [a, b, c], retry_failed=True)
    assert {t.trial_id for t in retry.todo} == {b.trial_id, c.trial_id} and retry.retried == [b.trial_id]
    assert [r.trial_id for r in read_results(sweep.results).rows] == [a.trial_id]  # rewritten without b
    assert [r.trial_id for r in read_results(sweep.root / "failed_attempts.jsonl").rows] == [b.trial_id]
    with open(sweep.results, "a") as fh:
        fh.write('{"trial_id": "x", "sta')  # a torn row: moved aside before anything is appended
    again = plan(sweep, [a, b, c])
    assert any("torn" in n for n in again.notes) and sweep.results.read_bytes().endswith(b"\n")
    append_row(sweep.results, row(c.trial_id, digest="changed"))
    with pytest.raises(SpecError, match=f"trial {c.trial_id} finished with other settings"):
        plan(sweep, [a, b, c])


def test_a_sweep_dir_keeps_its_spec_unless_resume_says_to_extend_it(tmp_path, base_config):
    from correction_rl.sweep.command import resolve_spec
    from correction_rl.sweep.spec import dump_spec

    body = {"name": "x", "base": str(base_config), "grid": {"learner.lr": [0.1]}, "max_concurrent": 1}
    first, sweep = resolve_spec(str(write_spec(tmp_path, body)), str(tmp_path / "sw"), resume=False)
    sweep.root.mkdir()
    dump_spec(first, sweep.spec)
    resolve_spec(str(write_spec(tmp_path, {**body, "max_concurrent": 2})), str(sweep.root), resume=False)  # ok
    more_seeds = str(write_spec(tmp_path, {**body, "seeds": [0, 1]}))
    with pytest.raises(SpecError, match=r"holds a sweep of a different spec \(seeds differ\): pass --resume"):
        resolve_spec(more_seeds, str(sweep.root), resume=False)
    assert resolve_spec(more_seeds, str(sweep.root), resume=True)[0].seeds == [0, 1]
    assert resolve_spec(None, str(sweep.root), resume=True)[0].grid == {"learner.lr": [0.1]}
    with pytest.raises(SpecError, match="give a sweep spec, or --resume --sweep-dir DIR"):
        resolve_spec(None, None, resume=True)


def test_a_failing_run_is_recorded_with_its_error(tmp_path, base_config, tiny_model_dir):
    """No Ray here: the worker-side function. The run fails at start (no such model): the row
    says failed, with train's one-line error first."""
    spec = load_spec(write_spec(tmp_path, {"base": str(base_config), "check_paths": False,
                                           "overrides": {"model.path": str(tmp_path / "no-model")}}))
    (trial,) = expand(spec)
    config = validate(spec, [trial], tmp_path / "trials")[trial.trial_id]
    result = execute_trial(TrialJob(trial, yaml.safe_dump(config), str(tmp_path / "trials" / trial.trial_id),
                                    str(tmp_path / "logs" / "t.log"), str(tmp_path)))
    assert result.status == "failed" and result.exit_code == 2
    assert result.error.splitlines()[1].startswith("error:") and "no-model" in result.error.splitlines()[1]
    assert result.before == {} and result.history == []


def test_collect_reads_evals_history_and_teacher_calls(tmp_path):
    from correction_rl.sweep.collect import collect, teacher_calls

    assert teacher_calls({"buffer/added": 40.0, "teacher/skipped/rejected": 2.0}) == 42.0  # in-process
    ray_row = {"teacher/worker0/pairs": 30.0, "teacher/worker1/pairs": 20.0, "teacher/skipped/error": 1.0,
               "buffer/added": 7.0}
    assert teacher_calls(ray_row) == 51.0  # the Ray drivers: workers' pairs, not the buffer's view
    assert teacher_calls({**ray_row, "teacher/rollouts": 60.0}) == 60.0 and teacher_calls({"step": 1}) is None
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "time": 1, "eval/greedy/correction_rate": 0.9, "eval/sampled/kl": 0.0},
            {"step": 1, "time": 2, "buffer/added": 8.0},
            {"step": 2, "time": 3, "buffer/added": 16.0, "teacher/skipped/x": 1.0,
             "eval/greedy/correction_rate": 0.7, "eval/greedy/reverse/correction_rate": 0.7},
            {"step": 2, "time": 4, "eval/greedy/correction_rate": 0.6, "eval/sampled/kl": float("nan")}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n" + '{"step": 3, "ti')
    modes = {"greedy": {"correction_rate": 0.6, "accuracy": 0.5, "kl": None}, "sampled": {"kl": 0.2}}
    (run / "eval_after.json").write_text(json.dumps({"modes": modes, "by_task": {"greedy": {
        "reverse": {"accuracy": 0.4}, "sorting": {"accuracy": 0.6}}}}))
    found = collect(run)
    assert found["after"] == {"greedy/correction_rate": 0.6, "greedy/accuracy": 0.5, "sampled/kl": 0.2,
                              "greedy/reverse/accuracy": 0.4, "greedy/sorting/accuracy": 0.6}
    assert found["before"] == {} and found["teacher_calls"] == 17.0  # torn last line skipped
    assert [(p.step, p.teacher_calls) for p in found["history"]] == [(0, 0.0), (2, 17.0), (2, 17.0)]
    assert found["history"][1].metrics == {"greedy/correction_rate": 0.7}  # one task: totals only
    assert found["history"][2].metrics == {"greedy/correction_rate": 0.6}  # NaN left out


# ---------------------------------------------------------------------------------------------
# Statistics and the report


def curve(points: list[tuple[float, float, float]]) -> list[EvalPoint]:
    """(teacher calls, greedy correction rate, KL) -> eval history."""
    return [EvalPoint(step=i, teacher_calls=c, metrics={"greedy/correction_rate": r, "sampled/kl": k})
            for i, (c, r, k) in enumerate(points)]


def test_stats_and_matched_gain_on_hand_made_rows():
    assert Stat.of([1.0, 3.0]).mean == 2.0 and Stat.of([1.0, 3.0]).std == pytest.approx(2 ** 0.5)
    assert Stat.of([2.0]).std is None and within_noise(Stat.of([2.0]), Stat.of([1.0])) is None
    assert within_noise(Stat.of([1.0, 3.0]), Stat.of([2.0, 4.0])) is True  # diff 1 < pooled std 1.41
    assert within_noise(Stat.of([1.0, 1.1]), Stat.of([2.0, 2.1])) is False
    # arm a: reaches gain 0.4 (0.8 -> 0.4) at KL 0.2; arm b reaches gain 0.2 at most
    rows = [
        row("a0", arm="a", after=0.4, kl=0.2, history=curve([(0, 0.8, 0.0), (50, 0.6, 0.1), (100, 0.4, 0.2)])),
        row("a1", arm="a", seed=1, after=0.4, kl=0.4, history=curve([(0, 0.8, 0.0), (50, 0.7, 0.2), (100, 0.4, 0.4)])),
        row("b0", arm="b", after=0.6, kl=0.5, history=curve([(0, 0.8, 0.0), (50, 0.6, 0.5), (100, 0.6, 0.5)])),
        row("b1", status="failed", arm="b", seed=1),
        row("c0", arm="c", after=0.9, kl=0.1, history=curve([(0, 0.8, 0.0), (50, 0.9, 0.1)])),  # never improves
    ]
    arms = summarize(rows, ["greedy/correction_rate", "sampled/kl"])
    a, b, _ = arms
    assert (len(a.ok), a.failed, len(b.ok), b.failed) == (2, 0, 1, 1)
    assert a.gain["greedy/correction_rate"].mean == pytest.approx(0.4)
    assert a.after["sampled/kl"].mean == pytest.approx(0.3)
    assert read_at(gain_curve(rows[1], "greedy/correction_rate", "sampled/kl"), 0.2) == pytest.approx(0.2 + 0.2 / 3)
    match = matched_gain(arms)
    assert match.level == pytest.approx(0.2)
    # a0 reaches 0.2 at its 2nd eval (KL 0.1); a1 between 2nd (gain 0.1, KL 0.2) and 3rd (0.4, 0.4)
    assert match.kl["a"].mean == pytest.approx((0.1 + (0.2 + (0.1 / 0.3) * 0.2)) / 2)
    assert match.kl["b"].mean == pytest.approx(0.5) and match.teacher_calls["b"].mean == pytest.approx(50)
    assert match.excluded == ["c"] and "c" not in match.kl  # left out, not dragging the level to 0


def test_report_writes_table_and_plots(tmp_path):
    from correction_rl.cli import main
    from correction_rl.sweep.report import write_report

    sweep = SweepDir(tmp_path / "sweep")
    sweep.root.mkdir()
    sweep.spec.write_text("base: b.yaml\n")
    with pytest.raises(UserError, match="no finished trial yet"):
        sweep.results.touch()
        write_report(sweep.root)
    for seed, (after, hist) in enumerate([(0.4, [(0, 0.8, 0.0), (60, 0.5, 0.1), (120, 0.4, 0.2)]),
                                          (0.5, [(0, 0.8, 0.0), (60, 0.6, 0.1), (120, 0.5, 0.3)])]):
        append_row(sweep.results, row(f"logistic__s{seed}", arm="logistic", seed=seed, after=after, history=curve(hist)))
        append_row(sweep.results, row(f"dpo__s{seed}", arm="dpo", seed=seed, after=after + 0.05, kl=0.6,
                                      history=curve([(c, r + 0.05, 3 * k) for c, r, k in hist])))
    append_row(sweep.results, row("dpo__s2", status="timeout", arm="dpo", seed=2))
    assert main(["report", str(sweep.root)]) == 0  # the CLI dispatches a sweep directory here
    text = (sweep.root / "report.md").read_text()
    lines: dict[str, str] = {}
    for ln in text.splitlines():
        if ln.startswith(("| logistic", "| dpo")):
            lines.setdefault(ln.split("|")[1].strip(), ln)  # the main table comes first
    assert "| 2 | 0 |" in lines["logistic"] and "| 2 | 1 |" in lines["dpo"]
    assert "0.350 ± 0.071 **best**" in lines["logistic"] and "0.300 ± 0.071 ≈" in lines["dpo"]
    assert "At greedy/correction_rate gain = 0.300" in text and "| dpo | 0.600 ± 0.424 |" in text and "dpo__s2` (timeout)" in text
    for name in ("correction_vs_teacher_calls.png", "kl_vs_gain.png"):
        data = (sweep.root / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ---------------------------------------------------------------------------------------------
# End to end on a real local Ray cluster


def sweep_cmd(spec: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "correction_rl.cli", "sweep", str(spec), "--sweep-dir", str(sweep_dir),
            "--max-concurrent", "2", *extra]


@pytest.mark.slow
def test_sweep_killed_then_resumed_records_every_trial_once(tmp_path, base_config):
    spec = write_spec(tmp_path, {
        "name": "e2e", "base": str(base_config),
        "grid": {"objective.form": ["logistic", "dpo"], "learner.lr": [0.001, 0.01]},
        "seeds": [0], "resources": {"num_cpus": 1}, "timeout_s": 300, "start_timeout_s": 300,
    })
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(sweep_cmd(spec, sweep_dir), cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while not read_results(sweep_dir / "results.jsonl").rows:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no trial finished in 240 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the Ray processes it started
        proc.wait(timeout=30)
    before = read_results(sweep_dir / "results.jsonl").rows
    assert 1 <= len(before) < 4, "the sweep must be cut short"
    done = subprocess.run(sweep_cmd(spec, sweep_dir), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(ln) for ln in (sweep_dir / "results.jsonl").read_text().splitlines()]
    ids = [ln["trial_id"] for ln in lines]
    assert sorted(ids) == sorted(t.trial_id for t in expand(load_spec(spec))) and len(set(ids)) == 4
    assert {r.trial_id for r in before} <= set(ids)
    for ln in lines:
        assert ln["status"] == "ok", ln
        assert 0.0 <= ln["after"]["greedy/correction_rate"] <= 1.0 and ln["before"]["sampled/kl"] == 0.0
        assert ln["after"]["sampled/kl"] is not None and ln["teacher_calls"] >= 3 * 8
        assert [p["step"] for p in ln["history"]] == [0, 2, 3] and ln["wall_s"] > 0
        assert (sweep_dir / "trials" / ln["trial_id"] / "eval_after.json").exists()
    moved = sorted(p.name for p in (sweep_dir / "stale").iterdir()) if (sweep_dir / "stale").exists() else []
    assert not [m for m in moved for b in before if m.startswith(b.trial_id + "-")]  # only rowless trials rerun
    assert "4 of 4 trials ok" in done.stdout
    again = subprocess.run(sweep_cmd(spec, sweep_dir), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "4 done, 0 to run" in again.stdout
    assert len((sweep_dir / "results.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_failed_trial_is_recorded_and_retry_replaces_its_row(tmp_path, base_config):
    spec = write_spec(tmp_path, {
        "name": "fails", "base": str(base_config), "check_paths": False, "seeds": [0],
        "arms": {"broken": {"model.path": str(tmp_path / "no-model")}}, "timeout_s": 120,
    })
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "RAY_ADDRESS": ""}
    for attempt in (1, 2):
        extra = ("--retry-failed",) if attempt == 2 else ()
        out = subprocess.run(sweep_cmd(spec, sweep_dir, *extra), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "not ok: broken__s0" in out.stderr
        (only,) = read_results(sweep_dir / "results.jsonl").rows
        assert only.status == "failed" and "no-model" in only.error and only.exit_code == 2
    assert len(read_results(sweep_dir / "failed_attempts.jsonl").rows) == 1
