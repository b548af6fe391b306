"""Expected failures: what the user can fix, reported as one ``error: ...`` line, exit code 2.

A command that fails because of what it was given (a bad config value, a prompt file that is
not JSON, a run directory another run holds, a checkpoint that does not match) should say so in
one line the user can act on; a 27-line traceback around a good message hides it, and makes a
user's mistake look like a crash of ours. A *programming* error (a ``TypeError``, a plain
``ValueError`` out of a library) is the opposite: its traceback is what a maintainer needs, so
it must not be swallowed. Hence an explicit set, not ``except Exception``:

* ``UserError``, the base class our own expected errors derive from (alongside the builtin
  they always were, ``ValueError`` or ``RuntimeError``, so existing ``except`` clauses hold):
  ``ConfigError``, ``CheckpointError``, ``RunDirectoryError``, ``NoBatchError``,
  ``PromptFileError``, ``TaskError``, ``CorrectionLogError``, ``BufferStateError``,
  ``TemplateError``, ``PlacementError``, ``TokenSpecError``, ...;
* ``OSError``s about a path (missing file, permission, directory vs file): in a command-line
  tool these are the user's paths.

``run_cli`` applies this around a command; ``--debug`` (or ``CORRECTION_RL_DEBUG=1``) prints
the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

DEBUG_ENV = "CORRECTION_RL_DEBUG"
EXIT_USAGE = 2
"""The exit code of an expected failure (argparse's for a usage error too)."""


class UserError(Exception):
    """Base of expected failures: the input (config, file, directory, flag) is wrong, and the
    message says what and where. Subclasses also derive from the builtin they replace."""


_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                NotADirectoryError)


def _cause(exc: BaseException) -> BaseException:
    """The original error of one a Ray worker raised (``RayTaskError`` keeps it as ``cause``
    and its own text carries the remote traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) and cause is not exc else exc


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a user-fixable failure (see the module docstring)."""
    exc = _cause(exc)
    if isinstance(exc, UserError):
        return True
    return isinstance(exc, _PATH_ERRORS)


def one_line(exc: BaseException) -> str:
    """The error's message on one line: a multi-line message (a config with several bad
    fields) has its lines joined with ``; `` after the first."""
    exc = _cause(exc)
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return head.rstrip(":") + ": " + "; ".join(rest)


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_cli(command: Callable[[list[str]], int | None], argv: Sequence[str],
            debug: bool | None = None) -> int:
    """Run ``command(argv)``; an expected failure becomes ``error: <one line>`` on stderr and
    exit code 2 (with the traceback before it when debugging), Ctrl-C exit code 130. Anything
    else propagates, so a bug keeps its traceback."""
    debug = debug_requested() if debug is None else debug
    try:
        return int(command(list(argv)) or 0)
    except KeyboardInterrupt:  # Ctrl-C outside a run's own signal handling: 130, as a shell says
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr, flush=True)
        return 128 + 2
    except Exception as exc:
        if not is_expected(exc):
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
