"""Bounded remote waits shared by the driver's parts: every wait on an actor has a deadline
and fails with a message naming what it waited for."""

from __future__ import annotations

import time

import ray


def get_within(refs, timeout: float, what: str):
    """``ray.get`` with a deadline; a ``TimeoutError`` names ``what``."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout:.0f} s") from None


def while_restarting(call, what: str, timeout: float):
    """``call()``, retried while an actor it touches is being restarted by Ray (calls to a
    restarting actor fail with ``ActorUnavailableError`` instead of waiting); bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: an actor was still restarting after {timeout:.0f} s") from None
            time.sleep(1.0)
