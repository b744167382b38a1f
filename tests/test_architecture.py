"""The import graph of the packages (``visionft``, ``datamodules``), read from their source with ``ast``: every
module-level and in-function import between their modules is an edge, and the graph has no loop. The modules are
found by walking the packages, so a new module is covered without being listed."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

PACKAGES = ("visionft", "datamodules")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in root.rglob("*.py"):
            parts = (package, *path.relative_to(root).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (a ``from package import module`` names the module, not the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
            out |= subs if len(subs) == len(node.names) else subs | ({base} & modules.keys())
    return out - {name}


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def loops(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. the import loops."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_loop_finder_finds_a_loop_and_passes_a_tree():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert loops({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_packages_have_no_import_loop():
    edges = graph()
    assert {"visionft.train", "visionft.strategies.base", "datamodules.base"} <= edges.keys()  # the walk found them
    assert "visionft.compile" in edges["visionft.train"]  # in-function imports count too
    assert loops(edges) == []
