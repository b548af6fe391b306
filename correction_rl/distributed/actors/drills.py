"""Fault-drill hooks: environment variables, not config fields, that make an actor stall where
a real fault would, so the fault tests can hit a narrow window every time
(docs/reliability.md, "Drill hooks"). Set in the environment of ``correction-rl train``;
``cluster.py`` hands each to the actors it concerns; unset, they cost one lookup."""

from __future__ import annotations

import os
import time

DRILL_LOAD_DELAY_ENV = "CORRECTION_RL_DRILL_LOAD_DELAY_S"
"""Seconds a rollout worker sleeps in every weight load (a stalled engine)."""

DRILL_TEACHER_DELAY_ENV = "CORRECTION_RL_DRILL_TEACHER_DELAY_S"
"""Seconds a teacher worker sleeps in every correction call (a slow teacher): the window in
which a test kills a teacher holding a batch."""


def drill_delay(env: str) -> None:
    delay = float(os.environ.get(env) or 0.0)
    if delay > 0:
        time.sleep(delay)
