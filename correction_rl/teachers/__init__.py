"""Teachers: anything that turns rollouts (x, y) into corrections y'."""

from correction_rl.teachers.base import Teacher

__all__ = ["Teacher"]
