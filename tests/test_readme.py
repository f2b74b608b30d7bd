"""Every Python block of the README runs as written (in order, one namespace).

``test_readme_python_blocks_run`` (marked slow) runs them all. The fast
``test_readme_quick_blocks_run`` runs them all but the slow ones (the hand-written loop over
every method, stepped eagerly: many small compiles) and the blocks that read a name only a
skipped block defines; what it skips is covered fast elsewhere (the OnlineMethod interface of
every method in tests/test_uoro.py, tests/test_chunked.py, ...; ``online_gradient`` ==
``bptt_gradient`` in tests/test_exactness.py and tests/test_every_cell.py).
"""

import ast
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# A block containing this text steps methods one call at a time outside jit (slow on CPU).
SLOW_BLOCK = "method.step(params, carry, state"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _names(block: str) -> tuple[set[str], set[str]]:
    """(names the block binds, names it reads), over all of its scopes."""
    bound, read = set(), set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else read).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return bound, read


def quick_blocks(blocks: list[str]) -> tuple[list[int], list[int]]:
    """Indices of the blocks to run and to skip: a block is skipped when it is slow or reads a
    name (not bound in itself) that only skipped blocks have bound so far."""
    run, skip, defined, skipped_defs = [], [], set(), set()
    for i, block in enumerate(blocks):
        bound, read = _names(block)
        if SLOW_BLOCK in block or ((read - bound) & (skipped_defs - defined)):
            skip.append(i)
            skipped_defs |= bound
        else:
            run.append(i)
            defined |= bound
    return run, skip


def _run(blocks: list[str], indices: list[int]) -> None:
    namespace: dict = {}
    for i in indices:
        exec(compile(blocks[i], f"README.md[python block {i}]", "exec"), namespace)


def test_quick_block_selection_follows_the_names():
    blocks = ["import math\nx = 1", f"for t in []:\n    {SLOW_BLOCK}, x)\ny = 2", "z = y + x",
              "def f(y):\n    return y\nprint(f(x))"]
    assert quick_blocks(blocks) == ([0, 3], [1, 2])


def test_readme_quick_blocks_run(capsys):
    blocks = python_blocks(README.read_text())
    run, skip = quick_blocks(blocks)
    assert len(blocks) >= 4 and len(run) >= 3, (run, skip)
    _run(blocks, run)
    out = capsys.readouterr().out
    assert "chunk 2: loss" in out and "rtrl DenseInfluence" in out


@pytest.mark.slow
def test_readme_python_blocks_run(capsys):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    _run(blocks, list(range(len(blocks))))
    out = capsys.readouterr().out
    assert "chunk 2: loss" in out and "RTRL vs BPTT" in out and "rtrl DenseInfluence" in out
