"""The package's import graph: no cycles, imports one way between the layers, and function-local
imports of the package's own modules only where an optional dependency needs them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_flash"

# layer -> the layers it may import (besides itself). The package root (`mlx_flash`, whose
# __init__ re-exports load) and `mlx_flash.__main__` are entry points, outside the layers.
ALLOWED = {
    "process": set(),
    "format": {"process"},
    "compute": {"format", "process"},
    "accel": {"format", "process"},
    "runtime": {"accel", "compute", "format", "process"},
    "spec": {"runtime", "accel", "compute", "format", "process"},
    "offline": {"spec", "runtime", "accel", "compute", "format", "process"},
    "bench": {"offline", "spec", "runtime", "accel", "compute", "format", "process"},
    "cli": {"bench", "offline", "spec", "runtime", "accel", "compute", "format", "process"},
}
OPTIONAL_MARK = "optional dependency"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(node: ast.ImportFrom | ast.Import, module: str, is_package: bool,
             known: dict[str, Path]) -> list[str]:
    """The package's own modules an import statement names (a `from x import y` names x.y
    when y is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [target] + [f"{target}.{a.name}" for a in node.names]
    return [n for n in names if n in known]


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """(edges: module -> own modules it imports, function-local imports not marked optional)."""
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    unmarked: list[str] = []
    for module, path in known.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[module].update(t for t in imported(node, module, is_package, known)
                                     if t != module)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                if not imported(node, module, is_package, known):
                    continue
                around = " ".join(lines[max(0, node.lineno - 2): node.end_lineno])
                if OPTIONAL_MARK not in around:
                    unmarked.append(f"{module}:{node.lineno}")
    return edges, unmarked


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else None


def test_the_package_has_no_import_cycle():
    edges, _ = graph()
    assert cycles(edges) == []


def test_function_local_imports_of_own_modules_are_for_optional_dependencies_only():
    _, unmarked = graph()
    assert unmarked == [], f"move these imports to the module's top (or mark why): {unmarked}"


def test_imports_run_one_way_between_the_layers():
    edges, _ = graph()
    wrong = []
    for module, targets in edges.items():
        source = layer(module)
        if source is None:
            continue
        assert source in ALLOWED, f"{module}: layer {source!r} is not in the table above"
        for target in targets:
            dest = layer(target)
            if dest is not None and dest != source and dest not in ALLOWED[source]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_checker_finds_a_cycle_and_a_wrong_way_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert "format" not in ALLOWED["process"] and "runtime" not in ALLOWED["format"]
