"""``correction-rl sweep SPEC.yaml [--sweep-dir DIR] [--resume] [--retry-failed] [--max-concurrent N]
[--ray-address ADDR] [--dry-run]`` (docs/sweeps.md).

Everything that can be wrong with the spec is found here, before Ray starts: the spec's shape
(``spec.py``), every trial's run config (``trials.validate``), the sweep directory's lock and
its agreement with the spec (``plan.py``). Then the trials go to the Ray runner
(``distributed/sweep_runner.py``), which appends one row per finished trial.

Exit codes: 0 when every trial of the spec has an ``ok`` row; 1 when some trial failed or timed
out (its row holds the error); 2 for a bad spec or directory (one ``error:`` line); 130 / 143
when SIGINT / SIGTERM interrupted the sweep (rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import yaml

from correction_rl.sweep.execute import TrialJob
from correction_rl.sweep.plan import SweepDir, plan
from correction_rl.sweep.results import TrialResult, read_results
from correction_rl.sweep.spec import SpecError, SweepSpec, dump_spec, load_spec
from correction_rl.sweep.trials import Trial, expand, validate, write_config


TRIAL_KEYS = ("base", "overrides", "conditions", "grid", "arms", "seeds")
"""The spec keys that decide which trials exist and what they run; the others (resources,
timeouts, concurrency) may change between invocations on the same directory."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="correction-rl sweep",
        description="Run every trial of a sweep spec (arms x grid x seeds) as a normal run on a Ray "
        "cluster, one row per trial in SWEEP_DIR/results.jsonl; `correction-rl report SWEEP_DIR` "
        "renders the comparison. See docs/sweeps.md.")
    p.add_argument("spec", nargs="?", help="the sweep spec (YAML); optional with --resume (SWEEP_DIR/spec.yaml)")
    p.add_argument("--sweep-dir", help="where the sweep lives (default runs/sweeps/<spec name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in --sweep-dir: skip trials with a row, rerun interrupted ones; "
                   "with a SPEC that differs from the stored one, run that spec's missing trials there")
    p.add_argument("--retry-failed", action="store_true",
                   help="also rerun trials whose row says failed or timeout (the old row moves to "
                   "failed_attempts.jsonl, so each trial keeps exactly one row)")
    p.add_argument("--max-concurrent", type=int, default=None, help="at most N trials at once (default: "
                   "the spec's max_concurrent, else what the cluster's resources allow)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else start a local one)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray cluster the sweep starts (default: the machine's cores); "
                   "raise it for async/sync trials whose actors need more than the cores")
    p.add_argument("--dry-run", action="store_true", help="validate, list the trials and what would run, stop")
    return p


def resolve_spec(spec_path: str | None, sweep_dir: str | None, resume: bool) -> tuple[SweepSpec, SweepDir]:
    """The spec to run and its directory; refuses a directory that holds another spec's sweep
    unless ``--resume`` says to extend it."""
    if spec_path is None:
        if not (resume and sweep_dir):
            raise SpecError("give a sweep spec, or --resume --sweep-dir DIR to continue a sweep")
        stored = SweepDir(Path(sweep_dir)).spec
        if not stored.is_file():
            raise SpecError(f"--resume: {stored} not found: {sweep_dir} is not a sweep directory")
        spec = load_spec(stored)
    else:
        spec = load_spec(spec_path)
    spec = dataclasses.replace(spec, base=str(Path(spec.base).resolve()))
    sweep = SweepDir(Path(sweep_dir or Path("runs") / "sweeps" / spec.name))
    if spec_path is not None and sweep.spec.is_file() and not resume:
        old = load_spec(sweep.spec).to_dict()
        new = spec.to_dict()
        changed = sorted(k for k in TRIAL_KEYS if old.get(k) != new.get(k))
        if changed:
            raise SpecError(f"{sweep.root} holds a sweep of a different spec ({', '.join(changed)} differ): "
                            "pass --resume to run this spec's missing trials there, or choose another --sweep-dir")
    return spec, sweep


def _describe(trial: Trial) -> str:
    where = f" [{trial.condition}]" if trial.condition else ""
    return f"{trial.trial_id}: arm {trial.arm}{where}, seed {trial.seed}"


def _row_line(row: TrialResult) -> str:
    after = row.after.get("greedy/correction_rate")
    extra = f"greedy correction {row.before.get('greedy/correction_rate')} -> {after}" if row.status == "ok" \
        else (row.error or "").splitlines()[0] if row.error else ""
    return f"[{row.status}] {row.trial_id} ({row.wall_s:.1f} s) {extra}"


def cli(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    spec, sweep = resolve_spec(a.spec, a.sweep_dir, a.resume)
    trials = expand(spec)
    configs = validate(spec, trials, sweep.trials)
    if a.max_concurrent is not None and a.max_concurrent < 1:
        raise SpecError(f"--max-concurrent: expected an integer >= 1, got {a.max_concurrent}")
    max_concurrent = a.max_concurrent or spec.max_concurrent
    if a.dry_run:
        done = read_results(sweep.results).by_id()
        for trial in trials:
            state = done[trial.trial_id].status if trial.trial_id in done else "to run"
            print(f"{_describe(trial)}  ({state})")
        print(f"{len(trials)} trials; sweep dir {sweep.root}")
        return 0
    sweep.lock()  # held until this process exits
    todo = plan(sweep, trials, retry_failed=a.retry_failed)
    dump_spec(spec, sweep.spec)  # after plan: a spec whose trials clash with the rows is not recorded
    for note in todo.notes:
        print(f"note: {note}", file=sys.stderr)
    for trial_id, path in todo.moved:
        print(f"note: {trial_id} was running when the sweep stopped: its run directory moved to {path}",
              file=sys.stderr)
    print(f"sweep {spec.name}: {len(trials)} trials, {len(todo.done)} done, {len(todo.todo)} to run "
          f"({len(todo.retried)} failed ones retried); {sweep.root}", flush=True)
    jobs = []
    for trial in todo.todo:
        config = configs[trial.trial_id]
        write_config(config, sweep.config(trial.trial_id))
        jobs.append(TrialJob(trial, yaml.safe_dump(config, sort_keys=False),
                             str(sweep.run_dir(trial.trial_id).resolve()), str(sweep.log(trial.trial_id).resolve()),
                             os.getcwd()))
    from correction_rl.distributed.sweep_runner import run_trials

    outcome = run_trials(jobs, sweep.results, max_concurrent=max_concurrent, start_timeout_s=spec.start_timeout_s,
                         ray_address=a.ray_address, num_cpus=a.num_cpus,
                         on_result=lambda r: print(_row_line(r), flush=True),
                         on_start=lambda j: print(f"start {_describe(j.trial)}", flush=True))
    if outcome.interrupted:
        print(f"sweep interrupted by {outcome.interrupted}: {len(outcome.unfinished)} running trial(s) cancelled "
              f"({', '.join(outcome.unfinished)}); rerun with --resume to finish", file=sys.stderr)
        return 128 + (15 if outcome.interrupted == "SIGTERM" else 2)
    rows = read_results(sweep.results).by_id()
    bad = [t.trial_id for t in trials if rows.get(t.trial_id) is None or rows[t.trial_id].status != "ok"]
    print(f"{len(trials) - len(bad)} of {len(trials)} trials ok; results: {sweep.results}; "
          f"`correction-rl report {sweep.root}` renders the table")
    if bad:
        print(f"not ok: {', '.join(bad)} (their rows hold the error; --retry-failed reruns them)", file=sys.stderr)
        return 1
    return 0
