"""``correction-rl train --config configs/<run>.yaml [--dotted.overrides]``."""

from __future__ import annotations

import argparse
import sys

from correction_rl.config import ConfigError, RunConfig, load_config


def run_training(cfg: RunConfig):
    """``inprocess`` runs the reference loop here; ``async``/``sync`` start the Ray system."""
    if cfg.mode == "inprocess":
        from correction_rl.loop import run
    else:
        from correction_rl.distributed.driver import run
    return run(cfg)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="correction-rl train",
        description="Run correction optimization. Any config field can be overridden as "
        "--section.field VALUE (see `correction-rl config --describe`).",
    )
    parser.add_argument("--config", help="YAML run config (defaults apply where it is silent)")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else start one)")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.ray_address:
            overrides += ["--resources.ray_address", args.ray_address]
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_training(cfg)
    print(result.comparison_table())
    print(f"run directory: {result.run_dir}")
    return 0
