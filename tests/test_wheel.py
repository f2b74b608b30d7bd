"""The wheel is what users install: build it, install it into a fresh venv, run the notebooks there.

Marked ``slow`` (``make test-wheel``; CI runs it after ``make test``).  The wheel is built from a
clean copy of the package sources (``pip wheel --no-deps``), installed with its ``notebooks``
extra into a new virtual environment made with this interpreter (dependencies come from the
package index or pip's cache, so the index must be reachable), and the notebooks are executed
with nbmake from a temporary directory outside the repository, so ``import snapjax`` can only
find the installed wheel (a probe notebook checks that).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 1800) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{out[-6000:]}"
    return out


def _clean_env(tmp: Path) -> dict:
    """The environment without anything that would point Python or Jupyter at the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JUPYTER", "PIP_TARGET"))}
    env["JUPYTER_DATA_DIR"] = str(tmp / "jupyter-data")  # no user-level kernelspec overrides
    env["JUPYTER_CONFIG_DIR"] = str(tmp / "jupyter-config")
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "snapjax", src / "snapjax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--quiet", "-w", str(out)], cwd=src)
    wheels = sorted(out.glob("snapjax-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv_python(wheel: Path, tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    tmp = env_dir.parent
    _run([sys.executable, "-m", "venv", str(env_dir)], cwd=tmp)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = _clean_env(tmp)
    _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], cwd=tmp, env=env)
    _run([str(python), "-m", "pip", "install", "--quiet", f"{wheel}[notebooks]"], cwd=tmp, env=env)
    # the notebooks' "python3" kernel must be this environment's interpreter
    _run([str(python), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], cwd=tmp, env=env)
    return python


def test_wheel_ships_typing_marker_and_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    assert "snapjax/py.typed" in names
    assert {"snapjax/__init__.py", "snapjax/methods/base.py", "snapjax/data/copy_task.py"} <= names
    assert not any(n.startswith(("tests/", "notebooks/", "benchmarks/", "docs/")) for n in names), sorted(names)[:20]
    assert meta["License-Expression"] == "Apache-2.0"
    classifiers = set(meta.get_all("Classifier"))
    assert {"Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.12",
            "Operating System :: OS Independent", "Typing :: Typed"} <= classifiers, classifiers
    assert meta.get("Keywords"), "no keywords"


def test_installed_package_is_the_wheel(venv_python: Path, tmp_path: Path):
    code = "import pathlib, snapjax; p = pathlib.Path(snapjax.__file__).parent; print(p); print((p / 'py.typed').is_file())"
    out = _run([str(venv_python), "-c", code], cwd=tmp_path, env=_clean_env(tmp_path)).split()
    site = Path(out[0])
    assert ROOT not in site.parents and str(venv_python.parents[1]) in str(site), site
    assert out[1] == "True"


def _probe_notebook(path: Path) -> None:
    """A notebook that fails unless its kernel imports snapjax from the installed wheel."""
    source = (
        "import pathlib, sys, snapjax\n"
        "prefix = pathlib.Path(sys.prefix).resolve()\n"
        "where = pathlib.Path(snapjax.__file__).resolve()\n"
        "assert prefix in where.parents, (prefix, where)\n"
        "assert (where.parent / 'py.typed').is_file()\n"
    )
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "probe", "metadata": {}, "outputs": [],
                   "source": source}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb))


def test_notebooks_run_from_the_wheel(venv_python: Path, tmp_path: Path):
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_what_snap_keeps", "03_copy_task", "04_activity_sparsity",
                                         "05_streaming"]
    work = tmp_path / "notebooks"
    work.mkdir()
    _probe_notebook(work / "00_probe.ipynb")
    for nb in NOTEBOOKS:
        shutil.copy2(nb, work / nb.name)
    env = _clean_env(tmp_path)
    env["SNAPJAX_FAST"] = "1"
    out = _run([str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbmake", "--nbmake-timeout=900", "."],
               cwd=work, env=env, timeout=3600)
    assert f"{len(NOTEBOOKS) + 1} passed" in out, out[-3000:]
