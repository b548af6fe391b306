"""``correction-rl <command>``: one entry point, each command implemented by the module that owns it.

Commands are looked up lazily so that ``correction-rl config`` does not pay for importing torch,
vLLM or DeepSpeed.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "make-model": ("correction_rl.models", "Build and save a tiny offline model + tokenizer."),
    "warmstart": ("correction_rl.tools.warmstart", "Supervised warm start of an imperfect policy on a task."),
    "eval": ("correction_rl.run.evaluation", "Held-out correction metrics of a model."),
    "train": ("correction_rl.train", "Run correction optimization from a config."),
    "demo": ("correction_rl.tools.demo", "The README's demo: warm start, then a short real training run."),
    "config": ("correction_rl.config_cli", "Validate a config, print the resolved one or all fields."),
    "report": ("correction_rl.observe.report", "PNG plots and an HTML summary page from a run directory."),
}


def usage() -> str:
    lines = ["usage: correction-rl <command> [args]", "", "commands:"]
    lines += [f"  {name:<11} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"correction-rl: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.cli(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
