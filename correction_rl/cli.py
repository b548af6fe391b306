"""``correction-rl [--debug] <command>``: one entry point, each command implemented by the module that owns it.

Commands are looked up lazily so that ``correction-rl config`` does not pay for importing torch,
vLLM or DeepSpeed.

Failures the user can fix (a bad config value, a prompt file that is not JSON, a run directory
another run holds; ``correction_rl/errors.py`` says which) are reported here, for every command
alike, as one ``error: ...`` line on stderr with exit code 2; ``--debug`` (before the command)
or ``CORRECTION_RL_DEBUG=1`` adds the traceback. Any other exception is a bug and keeps its
traceback. Commands keep their own exit codes otherwise (``train`` stopped by SIGINT/SIGTERM:
130/143).
"""

from __future__ import annotations

import importlib
import os
import sys

from correction_rl.errors import DEBUG_ENV, EXIT_USAGE, debug_requested, run_cli

COMMANDS: dict[str, tuple[str, str]] = {
    "make-model": ("correction_rl.models", "Build and save an offline model (tiny..medium; char or BPE/chat tokenizer)."),
    "warmstart": ("correction_rl.tools.warmstart", "Supervised warm start of an imperfect policy on a task."),
    "eval": ("correction_rl.run.evaluation", "Held-out correction metrics of a model."),
    "train": ("correction_rl.train", "Run correction optimization from a config."),
    "demo": ("correction_rl.tools.demo", "The README's demo: warm start, then a short real training run."),
    "config": ("correction_rl.config_cli", "Validate a config, print the resolved one or all fields."),
    "report": ("correction_rl.observe.report",
               "PNG plots and an HTML summary page from a run directory (a sweep directory: its table)."),
    "sweep": ("correction_rl.sweep.command", "Run a sweep spec (arms x grid x seeds) on Ray; results.jsonl per sweep."),
    "prompts": ("correction_rl.prompts.files", "Export a task's prompts as a JSONL prompt file."),
    "human-queue": ("correction_rl.teachers.human.offline",
                    "Export open human-teacher items to JSONL / import corrections from JSONL."),
}


def _is_sweep_dir(path: str) -> bool:
    from correction_rl.sweep.plan import is_sweep_dir

    return is_sweep_dir(path)


def usage() -> str:
    lines = ["usage: correction-rl [--debug] <command> [args]", "", "commands:"]
    lines += [f"  {name:<11} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", f"--debug (or {DEBUG_ENV}=1): show the traceback of an error as well"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested()
    while argv and argv[0] == "--debug":
        debug = True
        argv = argv[1:]
    if debug:
        os.environ[DEBUG_ENV] = "1"  # commands and their child processes see it too
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"correction-rl: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE

    module = COMMANDS[command][0]
    if command == "report" and rest and not rest[0].startswith("-") and _is_sweep_dir(rest[0]):
        module = "correction_rl.sweep.report"  # `report SWEEP_DIR`: the sweep's comparison table

    def call(args: list[str]) -> int | None:
        return importlib.import_module(module).cli(args)

    return run_cli(call, rest, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
