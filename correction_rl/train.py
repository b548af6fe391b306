"""``correction-rl train --config configs/<run>.yaml [--dotted.overrides]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from correction_rl.config import ConfigError, RunConfig, load_config


def run_training(cfg: RunConfig):
    """``inprocess`` runs the reference loop here; ``async``/``sync`` start the Ray system."""
    if cfg.mode == "inprocess":
        from correction_rl.run.inprocess import run
    else:
        from correction_rl.distributed.driver import run
    return run(cfg)


def resume_config_path(run_dir: str, config: str | None) -> str:
    """The base config of ``--resume RUN_DIR``; refuses a directory without a checkpoint."""
    from correction_rl.run.checkpoint import list_checkpoints

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    if not list_checkpoints(path):
        raise ConfigError(f"--resume {run_dir}: no checkpoints under {path / 'checkpoints'}")
    if config is not None:
        return config
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml (pass --config)")
    return str(path / "config.yaml")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="correction-rl train",
        description="Run correction optimization. Any config field can be overridden as "
        "--section.field VALUE (see `correction-rl config --describe`).",
    )
    parser.add_argument("--config", help="YAML run config (defaults apply where it is silent)")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else start one)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest valid checkpoint (its "
                        "config.yaml is the base config unless --config is given; docs/reliability.md)")
    args, overrides = parser.parse_known_args(argv)
    config_path = args.config
    if args.ray_address:
        overrides += ["--resources.ray_address", args.ray_address]
    if args.resume:
        config_path = resume_config_path(args.resume, args.config)
        run_dir = Path(args.resume).resolve()
        overrides += ["--output_dir", str(run_dir.parent), "--name", run_dir.name,
                      "--checkpoint.resume", "auto"]
    cfg = load_config(config_path, overrides, check_paths=True)
    from correction_rl.run.lifecycle import RunInterrupted

    # Expected failures (a bad setting, a run directory in use, no restorable checkpoint, a
    # buffer that never fills) derive from ``errors.UserError``: correction_rl/cli.py reports
    # them as one line with exit code 2, as for every command.
    try:
        result = run_training(cfg)
    except RunInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 128 + (15 if exc.signame == "SIGTERM" else 2)
    print(result.comparison_table())
    print(f"run directory: {result.run_dir}")
    return 0
