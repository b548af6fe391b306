"""``correction-rl config``: check a config without running anything."""

from __future__ import annotations

import argparse
import sys

import yaml

from correction_rl.config import ConfigError, describe, load_config, to_dict


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="correction-rl config",
        description="Validate a config (YAML + --dotted.overrides) and print the resolved result.",
    )
    parser.add_argument("--config", help="YAML file (defaults apply where it is silent)")
    parser.add_argument("--describe", action="store_true", help="list every field with its doc")
    args, overrides = parser.parse_known_args(argv)
    if args.describe:
        print("\n".join(describe()))
        return 0
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0
