"""The tasks package imports one way: no import cycle among tasks.* modules (top-level or inside functions),
no private name imported across modules, and every module imports on its own in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tasks"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(TASKS.rglob("*.py"))}


def resolve(current: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute module a `from <level dots><module> import ...` in `current` refers to."""
    if level == 0:
        return module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str) -> list[tuple[str, str | None, int]]:
    """(target module, imported name or None, line) for every import in the module, in functions too."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("tasks")]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, path.name == "__init__.py", node.module, node.level)
            if not target.startswith("tasks"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                # `from . import launch` imports a module; `from .x import f` imports a name from x.
                out.append((sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (c := visit(t)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_checker_sees_a_cycle_and_the_engine_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert {"tasks.engine.launch", "tasks.engine.build", "tasks.train", "tasks.probe"} <= set(MODULES)
    assert "tasks.engine.build" in graph()["tasks.probe"] and "tasks.engine.build" in graph()["tasks.train"]


def test_tasks_import_graph_is_acyclic():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_engine_imports_no_stage():
    stages = {"tasks.train", "tasks.probe", "tasks.evaluate", "tasks.merge", "tasks.publish", "tasks.stages"}
    for m, targets in graph().items():
        if m.startswith("tasks.engine"):
            assert not targets & stages, f"{m} imports {targets & stages}: the engine must not depend on a stage"


def test_no_private_name_crosses_a_module():
    crossing = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {name} from {t}"
                for m in MODULES for t, name, line in imports_of(m)
                if name and name.startswith("_") and not name.startswith("__") and t != m]
    assert not crossing, "; ".join(crossing)


IMPORT_EACH = """
import importlib, sys
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "tasks" or m.startswith("tasks.")]:
        del sys.modules[m]  # each module is imported first, with no tasks.* module loaded before it
    try:
        importlib.import_module(name)
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}")
"""


def test_each_module_imports_first_in_a_fresh_interpreter():
    """A cycle that Python can resolve in one order fails in another: import each module first (third-party
    packages stay loaded between them; only tasks.* is dropped), in one fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", IMPORT_EACH, *sorted(MODULES)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr[-2000:]
