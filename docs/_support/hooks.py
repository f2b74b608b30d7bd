"""mkdocs hooks for the snapjax site (``hooks:`` in ``mkdocs.yml``).

* The API reference must cover the whole public API: every name in ``snapjax.__all__`` has a
  ``::: snapjax.NAME`` entry in ``docs/api/*.md``, else the build fails and names the missing
  ones.
* The tutorials are the notebooks' jupytext sources, ``notebooks/NN_*.py``, added to the site
  under the same path (pages ``notebooks/NN_*/``, executed and rendered by mkdocs-jupyter; ``make docs`` runs them in fast mode):
  the notebooks stay where they are, with no copies or links under ``docs/``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from griffe_rst import public_names  # noqa: E402


def on_config(config):
    documented: set[str] = set()
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        documented |= set(re.findall(r"^::: snapjax\.(\w+)\s*$", page.read_text(), flags=re.M))
    missing = sorted(public_names() - documented)
    if missing:
        raise PluginError(f"public names without an API reference entry in docs/api/: {missing}")
    return config


@event_priority(100)  # before mkdocs-jupyter turns notebook sources into pages
def on_files(files: Files, config) -> Files:
    for source in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        # a real file with its own source directory (mkdocs-jupyter needs ``abs_src_path``, which
        # a ``File.generated`` would not give through its wrapper)
        files.append(File(f"notebooks/{source.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
