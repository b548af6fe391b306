"""Every command turns an expected failure into one ``error: ...`` line on stderr, exit code 2,
no traceback (``--debug`` / ``CORRECTION_RL_DEBUG=1`` add it); a programming error keeps its
traceback.

The repros of issue 16 item 5, each run as the real CLI in a subprocess
(``python -m correction_rl.cli``): bad prompt files, empty or unknown task lists, bad buffer
sizes and sampling values, bad or missing annotator tokens, a correction log another writer
holds, a missing ``model.path``, ``--rollout.batch_size -5`` and ``--learner.micro_batch_pairs
0`` (which used to blame ``buffer.min_fresh_pairs`` and "sample size" respectively)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from correction_rl.errors import UserError, is_expected, one_line, run_cli

QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
         "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
SHORT_TOKENS = "alice=s3cr3t"


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, tiny_model_dir) -> Path:
    """A run that would train (in-process, 2 steps) were it not for the override under test."""
    root = tmp_path_factory.mktemp("cli_errors")
    cfg = {
        "name": "ok", "output_dir": str(root / "runs"), "mode": "inprocess", "seed": 0, "total_steps": 2,
        "model": {"path": str(tiny_model_dir)},
        "task": {"names": ["addition"], "num_train": 50, "num_eval": 4},
        "rollout": {"engine": "hf", "batch_size": 8, "max_new_tokens": 6},
        "learner": {"backend": "torch", "lr": 1e-4, "micro_batch_pairs": 4},
        "buffer": {"min_fresh_pairs": 4, "max_staleness": 2},
        "eval": {"every_steps": 0, "num_prompts": 4, "sampled": False},
        "metrics": {"wandb_mode": "disabled", "progress": "lines"},
        "checkpoint": {"every_steps": 0},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (root / "not_json.jsonl").write_text('{"prompt_id": "a", "text": "1+1="\n')
    return path


def crl(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "WANDB_SERVICE", "CORRECTION_RL_DEBUG", "CORRECTION_RL_HUMAN_TOKENS")}
    return subprocess.run([sys.executable, "-m", "correction_rl.cli", *args], capture_output=True, text=True,
                          env={**base, **QUIET, **(env or {})}, cwd=cwd, timeout=timeout)


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of an expected failure (asserting that is what it was)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-4000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    return lines[0]


# -- train: the repros of the issue --------------------------------------------------------

TRAIN_CASES = [
    # id, overrides, env, fragments the error line must hold, fragments it must not
    ("prompts_not_json", ["--task.prompts_file", "{root}/not_json.jsonl"], {}, ["not_json.jsonl:1", "JSON"], []),
    ("prompts_missing", ["--task.prompts_file", "{root}/missing.jsonl"], {}, ["missing.jsonl"], []),
    ("task_unknown", ["--task.names", "[nosuch]"], {}, ["nosuch"], []),
    ("task_empty", ["--task.names", "[]"], {}, ["task.names"], []),
    ("buffer_capacity", ["--buffer.capacity", "0"], {}, ["buffer.capacity"], []),
    ("buffer_staleness", ["--buffer.max_staleness", "-1"], {}, ["buffer.max_staleness"], []),
    ("temperature", ["--rollout.temperature", "-1"], {}, ["rollout.temperature"], []),
    ("top_p", ["--rollout.top_p", "0"], {}, ["rollout.top_p"], []),
    ("tokens_bad", ["--teacher.kind", "human", "--teacher.human.port", "0"],
     {"CORRECTION_RL_HUMAN_TOKENS": SHORT_TOKENS}, ["shorter than 16"], ["s3cr3t"]),
    ("tokens_unset", ["--teacher.kind", "human", "--teacher.human.port", "0"], {},
     ["CORRECTION_RL_HUMAN_TOKENS", "not set"], []),
    ("model_path", ["--model.path", "{root}/no_such_model"], {}, ["model.path", "no_such_model"], ["Repo id"]),
    ("batch_size", ["--rollout.batch_size", "-5"], {}, ["rollout.batch_size"], ["min_fresh_pairs"]),
    ("micro_batch", ["--learner.micro_batch_pairs", "0"], {}, ["learner.micro_batch_pairs"], ["sample size"]),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_reports_bad_input_in_one_line(run_config, case):
    name, overrides, env, wanted, unwanted = case
    root = str(run_config.parent)
    args = [a.replace("{root}", root) for a in overrides]
    line = one_error(crl("train", "--config", str(run_config), "--name", name, *args, env=env))
    for fragment in wanted:
        assert fragment in line, line
    for fragment in unwanted:
        assert fragment not in line, line


def test_train_on_a_correction_log_another_writer_holds(run_config):
    """The log lock: a second writer (here this test, holding the run's log open) makes the
    run fail in one line naming the log, not with a traceback."""
    from correction_rl.buffer.correction_log import CorrectionLog

    cfg = yaml.safe_load(run_config.read_text())
    log_path = Path(cfg["output_dir"]) / "locked" / "corrections.jsonl"
    with CorrectionLog(log_path, meta={"name": "locked"}):
        line = one_error(crl("train", "--config", str(run_config), "--name", "locked"))
    assert "another writer holds this correction log" in line and str(log_path) in line


def test_debug_flag_and_variable_add_the_traceback(run_config):
    bad = ["--config", str(run_config), "--name", "debug",
           "--task.prompts_file", str(run_config.parent / "not_json.jsonl")]
    for proc in (crl("--debug", "train", *bad), crl("train", *bad, env={"CORRECTION_RL_DEBUG": "1"})):
        assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "not_json.jsonl:1" in last


# -- the other commands ----------------------------------------------------------------------


def test_every_other_command_reports_bad_input_in_one_line(tmp_path, tiny_model_dir):
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["config", "--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["demo", "--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["report", str(tmp_path / "no_run")], "no_run"),
        (["make-model", str(tmp_path / "a_file" / "model")], "a_file"),
        (["warmstart", "--task", "nosuch", "--out", str(tmp_path / "ws")], "nosuch"),
        (["eval", "--model", str(tiny_model_dir), "--task", "nosuch"], "nosuch"),
        (["human-queue", "export", str(tmp_path / "out.jsonl"), "--db", str(tmp_path / "a_file")], "a_file"),
    ]
    for args, fragment in cases:
        line = one_error(crl(*args))
        assert fragment in line, (args, line)


def test_usage_errors_keep_argparse_and_unknown_commands_exit_2():
    proc = crl("nosuch")
    assert proc.returncode == 2 and "unknown command 'nosuch'" in proc.stderr
    proc = crl("report")  # argparse: missing RUN_DIR
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "usage:" in proc.stderr


# -- the classification itself (in-process) --------------------------------------------------


class _Ours(ValueError, UserError):
    pass


def test_expected_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    def failing(exc: BaseException):
        def command(argv: list[str]) -> int:
            raise exc
        return command

    assert run_cli(failing(_Ours("settings: bad\n  a: x\n  b: y")), [], debug=False) == 2
    assert capsys.readouterr().err == "error: settings: bad: a: x; b: y\n"
    assert run_cli(failing(FileNotFoundError(2, "No such file or directory", "/x/y")), [], debug=False) == 2
    assert capsys.readouterr().err == "error: /x/y: No such file or directory\n"
    for bug in (TypeError("unsupported operand"), ValueError("a plain ValueError from a library"),
                KeyError("k"), ZeroDivisionError()):
        with pytest.raises(type(bug)):
            run_cli(failing(bug), [], debug=False)
    assert run_cli(lambda argv: 7, []) == 7
    assert run_cli(failing(KeyboardInterrupt()), [], debug=False) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_known_error_classes_are_expected_and_a_ray_wrapped_one_is_unwrapped():
    from ray.exceptions import RayTaskError

    from correction_rl.buffer.correction_log import CorrectionLogError
    from correction_rl.prompts.files import PromptFileError
    from correction_rl.tasks.base import TaskError
    from correction_rl.teachers.human.app import TokenSpecError
    from correction_rl.teachers.human.queue import QueueError

    for cls in (CorrectionLogError, PromptFileError, TaskError, TokenSpecError, QueueError):
        assert is_expected(cls("x")), cls
    cause = TaskError("unknown task 'nosuch'")
    wrapped = RayTaskError("correct", "Traceback (most recent call last):\n  ...remote...", cause).as_instanceof_cause()
    assert is_expected(wrapped) and one_line(wrapped) == "unknown task 'nosuch'"
    assert not is_expected(RayTaskError("f", "tb", TypeError("bug")).as_instanceof_cause())
