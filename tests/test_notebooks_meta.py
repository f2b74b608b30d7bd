"""The notebooks are jupytext pairs: the .ipynb must match its .py source, with no outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NB_DIR.glob("[0-9][0-9]_*.py"))


def test_notebooks_exist():
    names = [p.stem for p in SOURCES]
    assert names == ["01_quickstart", "02_what_snap_keeps", "03_copy_task", "04_activity_sparsity", "05_streaming"]
    readme = (NB_DIR / "README.md").read_text()
    for name in names:
        assert name in readme


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_pair_in_sync_and_stripped(py: Path):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `jupytext --to ipynb {py}`"
    nb = nbformat.read(ipynb, as_version=4)
    src = jupytext.read(py)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    cells = [(c.cell_type, c.source.strip()) for c in nb.cells]
    expected = [(c.cell_type, c.source.strip()) for c in src.cells]
    assert cells == expected, f"{ipynb.name} is out of sync with {py.name}: run `jupytext --to ipynb {py}`"
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.get("outputs") and c.get("execution_count") is None, f"{ipynb.name}: outputs not stripped"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_fast_mode_and_import(py: Path):
    text = py.read_text()
    assert 'os.environ.get("SNAPJAX_FAST"' in text
    assert "import snapjax" in text
