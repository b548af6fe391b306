"""One trial: a ``correction-rl train`` subprocess with a deadline, reduced to a ``TrialResult``.

Why a subprocess rather than calling ``run_training`` in the Ray worker: a trial that crashes
(a segfault in a kernel, an out-of-memory kill, ``os._exit`` in a library) takes only its own
process down, the worker that waits for it records the failure with the output's last lines, and
every trial starts from a clean interpreter (no torch threads, CUDA context, Ray connection or
module state left by the previous trial on the same worker). It is also exactly what a user runs
by hand: the trial's ``config.yaml`` reproduces it with ``correction-rl train --config``.

The child is tied to this process: on Linux it gets ``PR_SET_PDEATHSIG`` = SIGKILL, so when the
sweep cancels the trial's Ray task (Ctrl-C, a timeout) or the worker dies, the run dies with it
instead of living on as an orphan that still writes into the trial's directory.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from correction_rl.sweep.collect import collect
from correction_rl.sweep.results import TrialResult
from correction_rl.sweep.trials import Trial

STOP_GRACE_S = 60.0
"""After a trial's timeout: SIGTERM (the run checkpoints and stops after its step), then SIGKILL."""
TAIL_LINES = 30


@dataclass(frozen=True)
class TrialJob:
    """Everything a worker needs to run one trial (plain data: it travels through Ray)."""

    trial: Trial
    config_yaml: str
    """The trial's resolved run config (``trials.trial_config``), as YAML text."""
    run_dir: str
    log_path: str
    cwd: str
    """The sweep driver's working directory: relative paths in the config resolve against it."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to the child's environment (``RAY_ADDRESS``: async-mode trials join the cluster)."""


def _pdeathsig():
    """A ``preexec_fn`` that asks Linux to SIGKILL the child when its parent dies (resolved
    before the fork, so the child only makes one system call)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the trial's task cancellation still applies
        return None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG == 1


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no output: {exc})"
    kept = [ln for ln in text.splitlines() if ln.strip() and "\r" not in ln][-lines:]
    errors = [ln for ln in kept if ln.startswith("error:")]
    return "\n".join(errors[-1:] + [ln for ln in kept if ln not in errors[-1:]])


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the trial's process group, SIGKILL it after ``STOP_GRACE_S``."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def train_command(config_path: str) -> list[str]:
    return [sys.executable, "-m", "correction_rl.cli", "train", "--config", config_path]


def execute_trial(job: TrialJob) -> TrialResult:
    """Run the trial to its end, its timeout or its failure; never raises for the run's sake."""
    trial = job.trial
    log_path = Path(job.log_path)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "wb")
    except OSError:  # the sweep directory is not on this node: keep the log locally
        log_path = Path(tempfile.mkstemp(prefix=f"{trial.trial_id}-", suffix=".log")[1])
        log = open(log_path, "wb")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **job.env}
    status, error, code = "ok", None, None
    start = time.time()
    with log, tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"{trial.trial_id}-") as cfg:
        cfg.write(job.config_yaml)
        cfg.flush()
        proc = subprocess.Popen(train_command(cfg.name), stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=job.cwd if os.path.isdir(job.cwd) else None, start_new_session=True,
                                preexec_fn=_pdeathsig())
        try:
            code = proc.wait(timeout=trial.timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = proc.returncode
            status = "timeout"
            error = f"still running after timeout_s={trial.timeout_s:g} s: stopped (SIGTERM, then SIGKILL)"
    wall = time.time() - start
    if status == "ok" and code != 0:
        status = "failed"
        error = f"train exited with code {code}\n{_tail(log_path)}"
    elif status == "timeout":
        error = f"{error}\n{_tail(log_path, 10)}"
    found = collect(job.run_dir) if Path(job.run_dir).is_dir() else {}
    return TrialResult(
        trial_id=trial.trial_id, arm=trial.arm, condition=trial.condition, seed=trial.seed,
        overrides=trial.overrides, digest=trial.digest, status=status, wall_s=round(wall, 3),
        error=error, exit_code=code, teacher_calls=found.get("teacher_calls"),
        before=found.get("before", {}), after=found.get("after", {}), history=found.get("history", []),
        run_dir=job.run_dir, host=socket.gethostname(), finished_at=round(time.time(), 3),
    )


def lost_trial(trial: Trial, status: str, error: str, wall_s: float, run_dir: str) -> TrialResult:
    """The row of a trial whose worker never reported (task lost, cancelled at its deadline)."""
    found = collect(run_dir) if Path(run_dir).is_dir() else {}
    return TrialResult(
        trial_id=trial.trial_id, arm=trial.arm, condition=trial.condition, seed=trial.seed,
        overrides=trial.overrides, digest=trial.digest, status=status, wall_s=round(wall_s, 3),  # type: ignore[arg-type]
        error=error, teacher_calls=found.get("teacher_calls"), before=found.get("before", {}),
        after=found.get("after", {}), history=found.get("history", []), run_dir=run_dir,
        host=socket.gethostname(), finished_at=round(time.time(), 3),
    )
