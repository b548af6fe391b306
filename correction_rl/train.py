"""``correction-rl train --config configs/<run>.yaml [--dotted.overrides]``."""

from __future__ import annotations

import argparse
import sys

from correction_rl.config import ConfigError, load_config


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="correction-rl train",
        description="Run correction optimization. Any config field can be overridden as "
        "--section.field VALUE (see `correction-rl config --describe`).",
    )
    parser.add_argument("--config", help="YAML run config (defaults apply where it is silent)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from correction_rl.loop import run

    result = run(cfg)
    print(result.comparison_table())
    print(f"run directory: {result.run_dir}")
    return 0
