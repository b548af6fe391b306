"""The value rules of the config schema: typed aliases whose constraints pydantic enforces.

Why here and not in the components: a rule in the schema is known to ``correction-rl config``
(refused before anything runs), to ``train`` (refused before a run directory exists) and to
``correction-rl config --describe`` (printed next to the field), and its error names the dotted
field. A component may still check what only it can see (a GPU, a server), but a value that is
wrong on every machine is refused here.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, TypeVar

from annotated_types import Ge, Gt, Interval, Le, Lt, MinLen
from pydantic import AfterValidator, AllowInfNan, ConfigDict, ValidationInfo
from pydantic_core import PydanticCustomError

T = TypeVar("T")

# Every config float is finite unless its field says otherwise (``AllowInfNan(True)``): a
# ``lr: .nan`` or ``timeout_s: .inf`` is a typo, never a setting.
_SECTION_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


def section(cls: type[T]) -> type[T]:
    """Make ``cls`` a config dataclass that rejects unknown keys and non-finite floats."""
    cls.__pydantic_config__ = _SECTION_CONFIG  # type: ignore[attr-defined]
    return dataclass(cls)


@dataclass(frozen=True)
class Rule:
    """A constraint that is not a plain bound, with the words ``--describe`` prints for it."""

    text: str | Callable[[], str]

    def describe(self) -> str:
        return self.text() if callable(self.text) else self.text


def _existing_path(value: str | None, info: ValidationInfo) -> str | None:
    """Only when the loader asks (``check_paths``): a recipe written for another machine (the
    cluster configs' shared paths) still validates with ``config --no-path-checks``."""
    if value is not None and info.context and info.context.get("check_paths") and not Path(value).exists():
        raise PydanticCustomError("path_missing", "no such file or directory on this machine")
    return value


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_var_name(value: str) -> str:
    """The field holds the NAME of a variable; anything else may be the secret itself, so the
    error never repeats the value (``describe_error`` leaves it out too)."""
    if not _ENV_NAME.match(value):
        raise PydanticCustomError(
            "env_var_name",
            "must be the NAME of an environment variable (letters, digits and _, not starting "
            "with a digit), not its value; the value given is not shown in case it is a secret",
        )
    return value


def _chat_template(value: str, info: ValidationInfo) -> str:
    """``auto``, ``none`` or a template file; the file must exist when paths are checked."""
    if value in ("auto", "none"):
        return value
    return _existing_path(value, info) or value


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _dataset_path(value: str | None, info: ValidationInfo) -> str | None:
    """A local dataset must exist (when paths are checked); a hub id ``owner/name`` (no file
    suffix) is only checked when it is opened."""
    if value is None or (_HUB_ID.match(value) and not value.endswith(_DATA_SUFFIXES) and not Path(value).exists()):
        return value
    return _existing_path(value, info)


def _known_tasks(names: list[str]) -> list[str]:
    from correction_rl.tasks.registry import task_names

    known = task_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PydanticCustomError(
            "unknown_task", "unknown task(s) {unknown}; known tasks: {known}",
            {"unknown": ", ".join(unknown), "known": ", ".join(known)},
        )
    return names


def _not_nan(value: float) -> float:
    if math.isnan(value):
        raise PydanticCustomError("finite_number", "Input should be a number, not NaN")
    return value


def _known_task_text() -> str:
    from correction_rl.tasks.registry import task_names

    return "non-empty; each one of: " + ", ".join(task_names())


Count = Annotated[int, Ge(1)]
"""A size or count where 0 is meaningless (batch sizes, steps, workers)."""
NonNegInt = Annotated[int, Ge(0)]
"""A count or period where 0 means something (none, off, only at the ends)."""
ObjectStoreMB = Annotated[int, Ge(80)]
"""Megabytes of a Ray object store (Ray refuses less than 75 MiB)."""
PosFloat = Annotated[float, Gt(0)]
"""A strictly positive finite number (timeouts, learning rates, ratios)."""
NonNegFloat = Annotated[float, Ge(0)]
"""A finite number >= 0 (weights, waits, CPU/GPU shares)."""
Probability = Annotated[float, Interval(ge=0, le=1)]
"""A probability or fraction in [0, 1]."""
Fraction = Annotated[float, Interval(gt=0, le=1)]
"""A share in (0, 1] where 0 would leave nothing (``top_p``, GPU memory fractions)."""
Port = Annotated[int, Interval(ge=0, le=65535)]
"""A TCP port; 0 asks the OS for a free one."""
PosFloatOrInf = Annotated[float, AllowInfNan(True), AfterValidator(_not_nan), Gt(0), Rule("may be .inf")]
"""A positive bound where ``.inf`` means unbounded."""
EnvVarName = Annotated[str, AfterValidator(_env_var_name), Rule(r"an environment variable name ^[A-Za-z_][A-Za-z0-9_]*$")]
"""The name of an environment variable holding a secret (never the secret)."""
ExistingPath = Annotated[str, AfterValidator(_existing_path), Rule("must exist")]
"""A file or directory this machine must have (checked by ``train`` and ``config``)."""
ChatTemplate = Annotated[str, AfterValidator(_chat_template), Rule("auto, none, or a Jinja template file that must exist")]
"""``model.chat_template``: the tokenizer's own template, none, or a template file."""
DatasetPath = Annotated[str, AfterValidator(_dataset_path), Rule("a local path that must exist, or a hub id owner/name")]
"""``task.dataset``: a JSONL / parquet file, a directory of them, a ``save_to_disk`` directory, or a hub id."""
TaskNames = Annotated[list[str], MinLen(1), AfterValidator(_known_tasks), Rule(_known_task_text)]
"""Registered task names (``correction_rl/tasks``), at least one."""

SECRET_ERRORS = frozenset({"env_var_name"})
"""Error types whose input must not be echoed (it may be a pasted secret)."""


def constraint_text(metadata: tuple[Any, ...]) -> str:
    """``Annotated`` metadata as the words ``--describe`` prints (``>= 1; may be .inf``)."""
    parts: list[str] = []
    for item in metadata:
        if isinstance(item, Interval):
            low = f">= {item.ge}" if item.ge is not None else f"> {item.gt}" if item.gt is not None else ""
            high = f"<= {item.le}" if item.le is not None else f"< {item.lt}" if item.lt is not None else ""
            parts.append(" and ".join(filter(None, [low, high])))
        elif isinstance(item, (Ge, Gt, Le, Lt)):
            op, attr = {Ge: (">=", "ge"), Gt: (">", "gt"), Le: ("<=", "le"), Lt: ("<", "lt")}[type(item)]
            parts.append(f"{op} {getattr(item, attr)}")
        elif isinstance(item, Rule):
            parts.append(item.describe())
    return "; ".join(parts)


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only this machine (tokens sent to it never cross a network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
