"""The sweep spec: one YAML file that says which runs make up an experiment (docs/sweeps.md).

```yaml
name: objectives            # optional (default: the file name); the default sweep dir is runs/sweeps/<name>
base: configs/demo.yaml     # a run config, exactly as for `correction-rl train --config`
overrides:                  # dotted fields set in every trial
  total_steps: 40
conditions:                 # named bundles of overrides the arms are compared under
  reverse: {task.names: [reverse], model.path: artifacts/policy-reverse}
  sorting: {task.names: [sorting], model.path: artifacts/policy-sorting}
grid:                       # a Cartesian product over dotted fields (more conditions)
  learner.lr: [1.0e-4, 3.0e-4]
arms:                       # named bundles of dotted overrides (what is compared)
  logistic: {objective.form: logistic}
  dpo: {objective.form: dpo, objective.beta: 0.1}
seeds: [0, 1, 2]
resources: {num_cpus: 1, num_gpus: 0}   # what one trial's driver process holds on the cluster
timeout_s: 3600             # per trial, from its start
```

Why a spec of its own rather than more fields in ``RunConfig``: a sweep is many runs, and what
it adds (the grid, arms, seeds, per-trial resources) means nothing to one run. The values of the
dotted fields are checked against the real run-config schema in ``trials.py``; this module checks
the spec's own shape, and names the offending key (with a close match) when it is wrong.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from correction_rl.config import ConfigError
from correction_rl.config.loading import read_yaml_file

RESERVED = {"name": "the sweep names each trial's run itself",
            "output_dir": "trials run under SWEEP_DIR/trials",
            "seed": "list the seeds under `seeds:`"}
"""Run-config fields a spec may not override, and why."""


class SpecError(ConfigError):
    """A sweep spec problem, naming the spec file, the key and (where one is involved) the arm."""


@dataclass(frozen=True)
class TrialResources:
    """Ray resources of one trial's task: the ``correction-rl train`` driver process. An
    async/sync-mode trial's own actors ask the cluster for theirs separately (docs/sweeps.md)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class SweepSpec:
    """A validated spec. Overrides map dotted run-config fields to values."""

    name: str
    base: str
    """The base run config (path as given, resolved against the current directory)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named bundles of overrides, crossed with the grid: the settings arms are compared under
    when one field alone cannot say it (each task with its own starting policy)."""
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    resources: TrialResources = field(default_factory=TrialResources)
    timeout_s: float = 3600.0
    """A trial still running this long after it started is stopped (SIGTERM, then SIGKILL) and
    recorded with status ``timeout``."""
    start_timeout_s: float = 1800.0
    """How long a submitted trial may wait for cluster resources before it counts as timed out
    (on top of ``timeout_s``): a trial asking more than the cluster can give fails instead of
    waiting forever."""
    max_concurrent: int | None = None
    """At most this many trials at once (default: as many as the cluster's resources allow)."""
    check_paths: bool = True
    """Check path fields (``model.path`` ...) exist on this machine when validating. Turn off
    when the driver runs where the trials' files are not (a remote cluster without shared disk)."""
    source: str = "sweep spec"

    def to_dict(self) -> dict[str, Any]:
        """The spec as written back to ``SWEEP_DIR/spec.yaml`` (``source`` left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        out["resources"] = {"num_cpus": self.resources.num_cpus, "num_gpus": self.resources.num_gpus}
        return out


_KEYS = [f.name for f in fields(SweepSpec) if f.name != "source"]


def _unknown(key: str, allowed: list[str], where: str) -> str:
    hint = difflib.get_close_matches(key, allowed, n=1)
    did = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"{where}: unknown key {key!r}{did} (allowed: {', '.join(allowed)})"


def _dotted_map(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping of dotted fields to values, got {type(value).__name__}")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
            raise SpecError(f"{where}: {key!r} is not a dotted field name")
        top = key.split(".")[0]
        if top in RESERVED:
            raise SpecError(f"{where}: {key!r} cannot be set in a sweep ({RESERVED[top]})")
        out[key] = v
    return out


def _number(raw: dict[str, Any], key: str, default: float, where: str, positive: bool = True) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        need = "a positive number" if positive else "a number >= 0"
        raise SpecError(f"{where}{key}: expected {need}, got {value!r}")
    return float(value)


def _bundles(raw: dict[str, Any], key: str, source: str) -> dict[str, dict[str, Any]]:
    """``arms`` / ``conditions``: name -> dotted overrides."""
    value = raw.get(key) or {}
    kind = key[:-1]
    if not isinstance(value, dict):
        raise SpecError(f"{source}: {key}: expected a mapping of {kind} name to overrides, got {type(value).__name__}")
    out = {}
    for name, over in value.items():
        if not isinstance(name, str) or not name:
            raise SpecError(f"{source}: {key}: {kind} names must be non-empty strings, got {name!r}")
        out[name] = _dotted_map(over, f"{source}: {kind} {name!r}")
    return out


def spec_from_dict(raw: Any, source: str = "sweep spec", default_name: str = "sweep") -> SweepSpec:
    """Validate a parsed spec (``load_spec``'s last step); raises ``SpecError``."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in _KEYS:
            raise SpecError(_unknown(str(key), _KEYS, source))
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise SpecError(f"{source}: base: the base run config path is required (as for `train --config`)")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name:
        raise SpecError(f"{source}: name: expected a non-empty name without '/', got {name!r}")
    overrides = _dotted_map(raw.get("overrides"), f"{source}: overrides")
    grid = _dotted_map(raw.get("grid"), f"{source}: grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{source}: grid.{key}: expected a non-empty list of values, got {values!r}")
    conditions = _bundles(raw, "conditions", source)
    arms = _bundles(raw, "arms", source)
    for kind, bundles in (("condition", conditions), ("arm", arms)):
        for label, over in bundles.items():
            clash = sorted(set(over) & set(grid))
            if clash:
                raise SpecError(f"{source}: {kind} {label!r} sets {clash[0]!r}, which is also a grid field "
                                "(a field is either compared across arms or swept in the grid)")
    for label, over in arms.items():
        clash = sorted(set(over) & {k for c in conditions.values() for k in c})
        if clash:
            raise SpecError(f"{source}: arm {label!r} sets {clash[0]!r}, which a condition sets too "
                            "(say it in one place)")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise SpecError(f"{source}: seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"{source}: seeds: {seeds!r} lists a seed twice")
    res_raw = raw.get("resources") or {}
    if not isinstance(res_raw, dict):
        raise SpecError(f"{source}: resources: expected a mapping (num_cpus, num_gpus), got {res_raw!r}")
    for key in res_raw:
        if key not in ("num_cpus", "num_gpus"):
            raise SpecError(_unknown(str(key), ["num_cpus", "num_gpus"], f"{source}: resources"))
    where = f"{source}: resources."
    resources = TrialResources(_number(res_raw, "num_cpus", 1.0, where, positive=False),
                               _number(res_raw, "num_gpus", 0.0, where, positive=False))
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                       or max_concurrent < 1):
        raise SpecError(f"{source}: max_concurrent: expected an integer >= 1, got {max_concurrent!r}")
    check_paths = raw.get("check_paths", True)
    if not isinstance(check_paths, bool):
        raise SpecError(f"{source}: check_paths: expected true or false, got {check_paths!r}")
    return SweepSpec(
        name=name, base=base, overrides=overrides, grid=grid, conditions=conditions, arms=arms, seeds=list(seeds),
        resources=resources, timeout_s=_number(raw, "timeout_s", 3600.0, f"{source}: "),
        start_timeout_s=_number(raw, "start_timeout_s", 1800.0, f"{source}: "),
        max_concurrent=max_concurrent, check_paths=check_paths, source=source,
    )


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a spec file (duplicate keys refused, as for run configs)."""
    path = Path(path)
    raw = read_yaml_file(path, SpecError, "sweep spec")
    return spec_from_dict(raw, source=str(path), default_name=path.stem)


def dump_spec(spec: SweepSpec, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False), encoding="utf-8")
