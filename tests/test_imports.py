"""Import hygiene: core modules never pull in ray, vllm, deepspeed or wandb at import time."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import correction_rl

HEAVY = ("ray", "vllm", "deepspeed", "wandb")


def core_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(correction_rl.__path__, "correction_rl."):
        if not info.name.startswith("correction_rl.distributed"):
            names.append(info.name)
    return sorted(names)


def test_core_modules_found():
    names = core_modules()
    assert "correction_rl.config" in names and "correction_rl.models" in names


def test_core_modules_do_not_import_heavy_dependencies():
    # One fresh interpreter per module: an earlier import must not hide a later one's.
    script = (
        "import importlib, sys\n"
        "importlib.import_module(sys.argv[1])\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    offenders = {}
    for name in core_modules():
        out = subprocess.run(
            [sys.executable, "-c", script, name], capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, f"{name} failed to import:\n{out.stderr[-2000:]}"
        loaded = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        if loaded:
            offenders[name] = loaded
    assert not offenders, f"heavy imports at module import time: {offenders}"
