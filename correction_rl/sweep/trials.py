"""Spec -> trials: the grid crossed with the arms and the seeds, each a ``Trial`` with a stable id.

Order of precedence of a trial's settings (later wins): the base config file, the spec's
``overrides``, the condition, the grid point, the arm, the seed. Every trial's config is built with
``config.load_config`` (the same validation as ``correction-rl train``) before anything runs, so
a typo in a dotted field stops the sweep at once with the field, the arm and the grid point named.

Ids are derived from the spec's content only (arm, grid point, seed), so the same spec gives the
same ids on every invocation: that is what lets an interrupted sweep find its finished trials.
``Trial.digest`` additionally fingerprints what the trial would run (the base file's contents and
the overrides), so a changed spec or base config is not mistaken for a finished trial.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from correction_rl.config import ConfigError, load_config
from correction_rl.config.loading import parse_yaml, to_dict
from correction_rl.sweep.spec import SpecError, SweepSpec, TrialResources

MAX_ID_LEN = 96


@dataclass(frozen=True)
class Trial:
    """One run of the sweep."""

    trial_id: str
    arm: str
    """What the report compares: the named arm, or the grid point when the spec has no arms."""
    condition: str
    """The grid point the arm ran under ("" when the grid points are themselves the arms)."""
    seed: int
    overrides: dict[str, Any]
    """The config diff from the base file: dotted field -> value, seed included."""
    resources: TrialResources
    timeout_s: float
    digest: str
    """sha256 (12 hex digits) of the base file's parsed contents and ``overrides``."""


def format_value(value: Any) -> str:
    """A compact, readable rendering of an override value for labels (``[reverse]``, ``0.1``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return json.dumps(value, sort_keys=True)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's last part where that is unambiguous among ``keys``, else the whole key
    (``objective.form`` -> ``form``; two ``*.beta`` keys stay whole)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def point_label(point: dict[str, Any], short: dict[str, str] | None = None) -> str:
    """``form=logistic,lr=0.001``: a grid point as the report shows it."""
    short = short or {}
    return ",".join(f"{short.get(k, k)}={format_value(v)}" for k, v in point.items())


def slug(text: str) -> str:
    """A file-name-safe rendering of a label; long ones keep a hash so they stay unique."""
    out = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text.replace(",", "__")).strip("_") or "x"
    if len(out) > MAX_ID_LEN:
        out = out[: MAX_ID_LEN - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return out


def dotted_tree(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (what ``load_config`` merges over the file)."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part!r} is set to a value and used as a section")
            node = child
        node[parts[-1]] = value
    return tree


def _base_contents(spec: SweepSpec) -> Any:
    path = Path(spec.base)
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{spec.source}: base: config file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable base is the spec's problem; load_config names it
        raise SpecError(f"{spec.source}: base: {path}: {exc}") from None


def digest(base: Any, overrides: dict[str, Any]) -> str:
    text = json.dumps({"base": base, "overrides": overrides}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def expand(spec: SweepSpec) -> list[Trial]:
    """Every trial of the spec, seeds outermost (a sweep cut short has every arm's first seed),
    then conditions, grid points and arms, in the spec's order. Raises ``SpecError`` on an id
    clash."""
    base = _base_contents(spec)
    keys = list(spec.grid)
    short = short_keys(keys)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))]
    conditions = spec.conditions or {"": {}}
    arms = spec.arms or {"": {}}
    trials: list[Trial] = []
    seen: dict[str, str] = {}
    for seed in spec.seeds:
        for (cond_name, cond), point in itertools.product(conditions.items(), points):
            for arm_name, arm in arms.items():
                label = point_label(point, short)
                if spec.arms:
                    arm_label, condition = arm_name, ",".join(filter(None, [cond_name, label]))
                else:
                    arm_label, condition = label or "base", cond_name
                overrides = {**spec.overrides, **cond, **point, **arm, "seed": seed}
                parts = [slug(arm_label)] + ([slug(condition)] if condition else []) + [f"s{seed}"]
                trial_id = "__".join(parts)
                where = f"arm {arm_label!r}" + (f" at {condition}" if condition else "")
                if trial_id in seen:
                    raise SpecError(f"{spec.source}: {where} and {seen[trial_id]} get the same trial id "
                                    f"{trial_id!r}: rename an arm or condition")
                seen[trial_id] = where
                trials.append(Trial(trial_id, arm_label, condition, seed, overrides, spec.resources,
                                    spec.timeout_s, digest(base, overrides)))
    return trials


def trial_config(spec: SweepSpec, trial: Trial, trials_dir: str | Path) -> dict[str, Any]:
    """The trial's resolved run config as a dict (validated; ``ConfigError`` as ``train`` gives)."""
    tree = dotted_tree({**trial.overrides, "output_dir": str(Path(trials_dir).resolve()), "name": trial.trial_id})
    return to_dict(load_config(spec.base, tree, check_paths=spec.check_paths))


def validate(spec: SweepSpec, trials: list[Trial], trials_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Build every trial's config before anything runs; the first bad one raises ``SpecError``
    naming the arm, grid point and seed next to the config's own message (the dotted field)."""
    configs = {}
    for trial in trials:
        try:
            configs[trial.trial_id] = trial_config(spec, trial, trials_dir)
        except ConfigError as exc:
            where = f"arm {trial.arm!r}" + (f" at {trial.condition}" if trial.condition else "")
            raise SpecError(f"{spec.source}: {where}, seed {trial.seed}: {exc}") from None
    return configs


def write_config(config: dict[str, Any], path: str | Path) -> Path:
    """Write a resolved trial config where a human (or ``train --config``) can rerun it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
