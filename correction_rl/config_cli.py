"""``correction-rl config``: check a config without running anything."""

from __future__ import annotations

import argparse
import sys

import yaml

from correction_rl.config import ConfigError, config_warnings, describe, load_config, to_dict
from correction_rl.errors import one_line


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="correction-rl config",
        description="Validate a config (YAML + --dotted.overrides) and print the resolved result.",
    )
    parser.add_argument("--config", help="YAML file (defaults apply where it is silent)")
    parser.add_argument("--describe", action="store_true",
                        help="list every field with its default, its rule and its doc")
    parser.add_argument("--no-path-checks", action="store_true",
                        help="do not require path fields (model.path, ...) to exist on this machine "
                        "(a recipe written for a cluster's shared paths)")
    args, overrides = parser.parse_known_args(argv)
    if args.describe:
        print("\n".join(describe()))
        return 0
    try:
        config = load_config(args.config, overrides, check_paths=not args.no_path_checks)
    except ConfigError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        if "on this machine" in str(exc):
            print("(a config written for another machine's paths: --no-path-checks)", file=sys.stderr)
        return 2
    for message in config_warnings(config):
        print(f"warning: {message}", file=sys.stderr)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0
