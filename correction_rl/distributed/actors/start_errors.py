"""Bad input found while an actor is being built reaches the user as the error it is.

Ray turns an exception raised in an actor's constructor into an ``ActorDiedError`` that holds
only the traceback as text, so a user's mistake found there -- a LoRA target that matches no
layer, a vLLM build without LoRA kernels, a model directory that is not one -- would end the
run as a page of Ray traceback around the one line that says what to fix (docs/reliability.md,
"Errors"). ``reporting_start_errors`` gives an actor class a constructor that keeps such an
*expected* error (``errors.is_expected``) instead of dying, and a ``pid`` -- the call
``start_cluster`` waits on -- that raises it: Ray delivers an error raised in a method as a
``RayTaskError`` whose ``cause`` is the original exception, which ``run_cli`` prints as one
line. Anything else (a bug, an out-of-memory kill) still kills the actor, with its traceback.
"""

from __future__ import annotations

import functools

from correction_rl.errors import is_expected


@functools.cache
def reporting_start_errors(actor_cls: type) -> type:
    """A subclass of ``actor_cls`` (same name) whose expected constructor errors surface from
    ``pid()``; cached, so every actor of a class shares one Ray class."""

    class Actor(actor_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            self._start_error: BaseException | None = None
            try:
                super().__init__(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - only expected ones are kept, see below
                if not is_expected(exc):
                    raise
                self._start_error = exc

        def pid(self) -> int:
            if self._start_error is not None:
                raise self._start_error
            return super().pid()

    Actor.__name__ = actor_cls.__name__
    Actor.__qualname__ = actor_cls.__qualname__
    Actor.__doc__ = actor_cls.__doc__
    return Actor
