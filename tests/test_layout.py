"""The package's shape: imports flow one way through the layers, with no cycles and no import
hidden inside a function; modules stay small and say what they own.

Read from the source with ``ast`` (nothing is imported), so a violation is reported with the
file, the line and the import.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "snapjax"

#: Layer rank of each top-level part of the package: a module may import its own layer or the
#: ones below it, never one above.  ``checkpoint`` and ``data`` import nothing of the layers.
LAYERS = {"checkpoint": 0, "data": 0, "cells": 1, "engine": 2, "methods": 3, "parallel": 4, "training": 5}
TOP = 6  # snapjax/__init__.py: the public API
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = _modules()


def _rank(module: str) -> int:
    parts = module.split(".")
    return TOP if len(parts) == 1 else LAYERS[parts[1]]


def _resolve(module: str, f: pathlib.Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if f.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, f: pathlib.Path) -> list[tuple[str, int, bool]]:
    """``(imported snapjax module, line, inside a function)`` for every import in ``f``."""
    tree = ast.parse(f.read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                src = _resolve(module, f, child)
                # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in child.names]
            for t in targets:
                if t == "snapjax" or t.startswith("snapjax."):
                    found.append((t, child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return found


GRAPH = {m: _imports(m, f) for m, f in MODULES.items()}


def test_every_module_is_in_a_layer():
    unknown = sorted(m for m in MODULES if m != "snapjax" and m.split(".")[1] not in LAYERS)
    assert not unknown, f"modules outside the layers {sorted(LAYERS)}: {unknown}"


def test_no_import_runs_back_up():
    upward = [
        f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {t} (layer {_rank(t)} above {_rank(m)})"
        for m, imps in GRAPH.items() for t, line, _ in imps if _rank(t) > _rank(m)
    ]
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def test_no_import_inside_a_function():
    local = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {t} inside a function"
             for m, imps in GRAPH.items() for t, line, inside in imps if inside]
    assert not local, "\n".join(local)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in imps if t in MODULES and t != m} for m, imps in GRAPH.items()}
    assert not _cycles(graph)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small_and_says_what_it_owns(module):
    f = MODULES[module]
    lines = len(f.read_text().splitlines())
    assert lines <= MAX_LINES, f"{f.relative_to(ROOT.parent)} has {lines} lines (at most {MAX_LINES})"
    assert ast.get_docstring(ast.parse(f.read_text())), f"{f.relative_to(ROOT.parent)} has no module docstring"


def test_no_private_name_is_exported():
    import snapjax

    assert not [n for n in snapjax.__all__ if n.startswith("_")]
    for module in MODULES:
        tree = ast.parse(MODULES[module].read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                names = ast.literal_eval(node.value)
                assert not [n for n in names if n.startswith("_")], f"{module} exports private names"
