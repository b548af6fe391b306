"""``correction-rl config --describe``: every field with its default, its rule and its doc, read
from the schema itself so the listing can never drift from what validation enforces."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
import warnings

from correction_rl.config.rules import constraint_text, is_loopback
from correction_rl.config.run import RunConfig


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_rules(cls: type) -> dict[str, str]:
    """The constraint of each field in words (``>= 1``, ``must exist``), '' where there is none."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, str] = {}
    for name, hint in hints.items():
        metadata: tuple = ()
        for arg in (hint, *typing.get_args(hint)):  # ``Count | None`` holds the Annotated inside
            if typing.get_origin(arg) is typing.Annotated:
                metadata += tuple(arg.__metadata__)
        out[name] = constraint_text(metadata)
    return out


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field: ``dotted.name = default  [rule]  # doc`` (``config --describe``)."""
    lines: list[str] = []
    docs = field_docs(cls)
    rules = field_rules(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.extend(describe(type(value), f"{prefix}{f.name}."))
        else:
            rule = f"  [{rules[f.name]}]" if rules.get(f.name) else ""
            lines.append(f"{prefix}{f.name} = {value!r}{rule}  # {docs.get(f.name, '')}")
    return lines


def config_warnings(cfg: RunConfig) -> list[str]:
    """Settings that are valid but probably not meant (printed by ``config``, warned at build)."""
    out: list[str] = []
    human = cfg.teacher.human
    if cfg.teacher.kind == "human" and human.serve and not is_loopback(human.host):
        out.append(
            f"teacher.human.host={human.host}: the web app is reachable from other machines over "
            "plain HTTP, so annotator tokens travel in clear text; bind 127.0.0.1 behind an "
            "authenticating TLS reverse proxy instead (docs/human-teachers.md)"
        )
    return out


def warn_config(cfg: RunConfig) -> None:
    """``config_warnings`` as Python warnings (shown once per process)."""
    for message in config_warnings(cfg):
        warnings.warn(message, UserWarning, stacklevel=2)
