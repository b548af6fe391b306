"""Loading a config: YAML (duplicate keys refused) -> dict, dotted overrides -> dict, then one
validation pass whose errors name every offending dotted field.

Validation is delegated to pydantic's ``TypeAdapter`` over the plain dataclasses (docs/config.md
compares it with OmegaConf, draccus and hand-written parsing): it gives the full dotted location,
the bad value and the allowed values for free, and leaves the config classes ordinary stdlib
dataclasses that the rest of the code can construct directly.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from correction_rl.config.rules import SECRET_ERRORS
from correction_rl.config.run import RunConfig
from correction_rl.errors import UserError


class ConfigError(ValueError, UserError):
    """A config problem, with every offending dotted field named in the message."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"line {line}: duplicate key {key!r} (first set on line {first})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's last-wins duplicate keys hide a typo'd second setting; refuse them instead."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (``yaml.YAMLError`` naming key and line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: Path, error: type[Exception], what: str) -> Any:
    """``parse_yaml`` of a file, every way it can fail raised as one readable ``error`` naming
    ``what`` and the path (run configs and sweep specs share it)."""
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise error(f"{path}: not a readable YAML text file ({exc})") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--learner.lr", "1e-5", "--seed=3"]`` -> ``{"learner": {"lr": 1e-5}, "seed": 3}``.

    Values are parsed as YAML (so lists, booleans and null work) and numeric strings YAML 1.1
    leaves alone (``1e-5``) become numbers.
    """
    tree: dict[str, Any] = {}
    items = list(argv)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--") or flag == "--":
            raise ConfigError(f"expected --dotted.field VALUE, got {flag!r}")
        key, eq, raw = flag[2:].partition("=")
        if not eq:
            if not items or items[0].startswith("--"):
                raise ConfigError(f"--{key}: missing value")
            raw = items.pop(0)
        try:
            value = _parse_value(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--{key}: not a valid value: {exc}") from None
        _set_dotted(tree, key, value)
    return tree


def _parse_value(raw: str) -> Any:
    value = parse_yaml(raw) if raw.strip() else raw
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{key}: {part!r} is set to a value and used as a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    check_paths: bool = False,
) -> RunConfig:
    """Defaults <- YAML file <- overrides, validated once; raises ``ConfigError``.

    ``check_paths``: also refuse a path field (``model.path``, ``task.prompts_file``, ...) that
    does not exist on this machine; ``train`` and ``config`` ask for it, while a library caller
    may build a config for another machine.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = read_yaml_file(path, ConfigError, "config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        tree = _merge(tree, extra)
    return config_from_dict(tree, source=str(path) if path else "config", check_paths=check_paths)


_ADAPTER: TypeAdapter[RunConfig] | None = None


def config_from_dict(tree: dict[str, Any], source: str = "config", check_paths: bool = False) -> RunConfig:
    """Validate a nested dict (``load_config``'s last step); ``check_paths`` as there."""
    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(RunConfig)
    try:
        return _ADAPTER.validate_python(tree, context={"check_paths": check_paths})
    except ValidationError as exc:
        problems = [describe_error(err) for err in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(problems)) from None


def describe_error(err: Any) -> str:
    """One pydantic error as ``dotted.field: what is wrong (got VALUE)``; the value is left out
    where it may be a secret."""
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "union["))]
    dotted = ".".join(p for p in loc if not p.startswith(("str", "int", "float", "none", "list[")))
    dotted = dotted or "<root>"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        parent, _, name = dotted.rpartition(".")
        allowed = sorted(field_names(_section_at(parent)))
        hint = [".".join(filter(None, [parent, h])) for h in difflib.get_close_matches(name, allowed, n=1)]
        hint = _moved_to(parent, name) or hint
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"{dotted}: unknown field{did_you_mean} (allowed: {', '.join(allowed)})"
    if err["type"] in SECRET_ERRORS or dotted.endswith("_env"):
        return f"{dotted}: {err['msg']}"
    return f"{dotted}: {err['msg']} (got {err.get('input')!r})"


def _moved_to(parent: str, name: str) -> list[str]:
    """Where a flat field went when its section grew sub-sections (``teacher.human_wait_s`` ->
    ``teacher.human.wait_s``, ``teacher.max_retries`` -> ``teacher.retry.max_retries``)."""
    cls = _section_at(parent)
    out = []
    for f in dataclasses.fields(cls):
        if f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            continue
        child = type(f.default_factory())  # type: ignore[misc]
        if not dataclasses.is_dataclass(child):
            continue
        for leaf in field_names(child):
            if name in (leaf, f"{f.name}_{leaf}"):
                out.append(".".join(filter(None, [parent, f.name, leaf])))
    return out


def _section_at(dotted: str) -> type:
    cls: type = RunConfig
    for part in filter(None, dotted.split(".")):
        hints = {f.name: f for f in dataclasses.fields(cls)}
        if part not in hints or hints[part].default_factory is dataclasses.MISSING:  # type: ignore[misc]
            break
        cls = type(hints[part].default_factory())  # type: ignore[misc]
    return cls


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config (what actually ran) as YAML; ``load_config`` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a kill mid-write must not tear the file a resume reads
    partial.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    os.replace(partial, path)
    return path
