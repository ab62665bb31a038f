"""The package's layout as a test: its modules import one another without a cycle (imports inside
functions counted), and each stage imports only the stages below it (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attnmask"

BELOW = {
    "errors": set(), "version": set(),
    "store": {"errors", "version"},
    "masks": {"store", "errors", "version"},
    "runtime": {"masks", "store", "errors", "version"},
    "models": {"runtime", "masks", "store", "errors", "version"},
    "analysis": {"masks", "store", "errors", "version"},
    "collect": {"models", "runtime", "masks", "store", "errors", "version"},
    "pruning": {"models", "runtime", "masks", "store", "errors", "version"},
    "tasks": {"analysis", "collect", "pruning", "models", "runtime", "masks", "store", "errors", "version"},
}
"""stage -> the stages it may import besides itself; the faces (cli, api, the package itself) may import any."""


def modules() -> dict[str, Path]:
    """{dotted name: file} for every module of the package (a package is its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its file (top level or in a function):
    `from a.b import c` counts a.b.c when that is a module, else a.b."""
    targets = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.update(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names)
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("attnmask") and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def stage(module: str) -> str | None:
    """The stage a module belongs to (its first package below attnmask), None for the faces."""
    part = module.split(".")[1] if "." in module else None
    return part if part in BELOW else None


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_each_stage_imports_only_the_stages_below_it():
    wrong = []
    for module, targets in sorted(import_graph().items()):
        own = stage(module)
        if own is None:
            continue
        for target in sorted(targets):
            other = stage(target)
            if other is None or (other != own and other not in BELOW[own]):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_every_module_belongs_to_a_stage_or_is_a_face():
    faces = {"attnmask", "attnmask.__main__", "attnmask.cli", "attnmask.api"}
    assert sorted(m for m in modules() if stage(m) is None and m not in faces) == []
