"""The package's shape, checked from the code (docs/architecture.md).

These are the rules that keep the tree readable as it grows: few modules at the top, one
folder per role, small modules, imports that only run downwards through the layers, no import
cycles, and capabilities expressed as Protocols rather than ``getattr`` probes in the Ray wing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "correction_rl"

# Lower layers never import higher ones (function-level imports included). Modules of one layer
# may import each other (no cycles, checked below).
LAYERS: list[set[str]] = [
    {"types", "config", "edits", "models", "errors", "tasks", "timing"},  # records, config, models, tasks
    {"prompts", "weights"},  # where prompts come from; how weights travel
    {"rollout", "teachers"},  # who answers, who corrects
    {"pairs", "buffer", "learner"},  # corrections -> pairs -> buffer -> learner
    {"observe"},  # metrics, progress, report
    {"run"},  # the lifecycle and the in-process loop
    {"distributed", "sweep"},  # the Ray wing (the only package that imports ray); sweeps of runs
    {"tools", "train", "cli", "config_cli", "__init__", "__main__"},  # entry points
]


def _room(module: str) -> str:
    """``correction_rl.learner.objectives`` -> ``learner``; ``correction_rl.cli`` -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(room: str) -> int:
    for i, rooms in enumerate(LAYERS):
        if room in rooms:
            return i
    raise AssertionError(f"correction_rl.{room} is in no layer: add it to LAYERS and to docs/architecture.md")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    """Absolute ``correction_rl`` modules imported by ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("correction_rl"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("correction_rl"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_at_most_ten_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, f"{len(top)} modules directly in correction_rl/: {top}"


def test_no_module_over_450_lines():
    big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 450}
    assert not big, f"modules over 450 lines: {big}"


def test_no_class_over_300_lines():
    big = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                big[f"{path.relative_to(PACKAGE.parent)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not big, f"classes over 300 lines: {big}"


def test_capabilities_are_protocols_not_probes_in_the_ray_wing():
    calls = []
    for path in (PACKAGE / "distributed").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
                calls.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.func.id}")
    assert len(calls) <= 3, "getattr/hasattr in correction_rl/distributed/ (use a Protocol):\n" + "\n".join(calls)


def test_imports_only_run_downwards():
    modules = _modules()
    upward = set()
    for module, path in modules.items():
        src = _layer(_room(module))
        for name in _imports(path, module, top_level_only=False):
            target = _resolve(name, modules)
            if target is None or target == "correction_rl":
                continue
            if _layer(_room(target)) > src:
                upward.add(f"{module} (layer {src}) imports {target} (layer {_layer(_room(target))})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {t for n in _imports(p, m, top_level_only=True)
                 if (t := _resolve(n, modules)) and t != m and t != "correction_rl"}
             for m, p in modules.items()}
    # a package's __init__ importing its own submodules is the usual re-export, not a cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("room", sorted({r for layer in LAYERS for r in layer} - {"__init__", "__main__", "errors"}))
def test_every_room_exists_and_says_what_it_is_for(room):
    package = PACKAGE / room
    if package.is_dir():
        init = package / "__init__.py"
        assert init.exists() and ast.get_docstring(ast.parse(init.read_text())), f"{room}/__init__.py needs a docstring"
    else:
        assert (PACKAGE / f"{room}.py").exists(), f"correction_rl/{room} is listed in LAYERS but does not exist"
