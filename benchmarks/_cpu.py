"""CPU time by role on this machine, from ``/proc`` (Linux): what a pipeline measurement spent,
so a missed efficiency target can be checked against the CPU the machine has per step.

Why: on a machine with few cores, "the pipeline is slower than its slowest stage" may simply
mean that the work of all roles together does not fit into the cores in one step. Ray actors
are found by their process titles (``ray::<Class>`` or ``ray::<Class>.<method>``); the driver is
this process; everything else on the machine (raylet, GCS, Ray's idle workers, the system) is
``other``, the machine's busy time minus the roles'.
"""

from __future__ import annotations

import os
from pathlib import Path

ROLES = {"LearnerRank": "learner", "RolloutWorker": "rollout", "TeacherWorker": "teacher",
         "BufferActor": "buffer"}
TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / TICK


def _role(pid: int) -> str | None:
    if pid == os.getpid():
        return "driver"
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return None
    if title.startswith("ray::"):
        return ROLES.get(title[5:].split(".", 1)[0].split(" ", 1)[0])
    return None


def snapshot() -> dict[str, float]:
    """CPU seconds so far of each role's processes (user + system), and of the machine."""
    out = {"machine": _machine_busy_s()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        role = _role(int(entry.name))
        if role is None:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per role between two snapshots, with ``other`` and ``total`` (the machine).
    A process that started or ended in between counts only what the later snapshot shows."""
    out = {role: max(0.0, after.get(role, 0.0) - before.get(role, 0.0))
           for role in ("learner", "rollout", "teacher", "buffer", "driver")}
    total = after["machine"] - before["machine"]
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out
