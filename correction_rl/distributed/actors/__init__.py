"""The actor classes, one file per actor: thin shells around the plain components, made remote
in ``distributed/cluster.py``.

Each shell owns one component and adds only what being an actor needs: a lock where a method may
run concurrently with another (threaded actors), the long-running producer loop of async mode,
busy-time accounting for the idle fraction of each role, and the process id (fault tests).

Data never goes through the driver in async mode: rollout workers hand batches of rollouts to
teacher workers, which push pairs straight into the buffer actor.
"""

from correction_rl.distributed.actors.buffer import BufferActor
from correction_rl.distributed.actors.clock import BusyClock
from correction_rl.distributed.actors.drills import DRILL_LOAD_DELAY_ENV, DRILL_TEACHER_DELAY_ENV
from correction_rl.distributed.actors.learner import LearnerRank
from correction_rl.distributed.actors.rollout import RestartedWorker, RolloutWorker
from correction_rl.distributed.actors.teacher import TeacherWorker

__all__ = [
    "BufferActor",
    "BusyClock",
    "DRILL_LOAD_DELAY_ENV",
    "DRILL_TEACHER_DELAY_ENV",
    "LearnerRank",
    "RestartedWorker",
    "RolloutWorker",
    "TeacherWorker",
]
