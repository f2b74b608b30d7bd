"""Run the Python examples of the documentation pages: ``python docs/_support/run_snippets.py``.

Every fenced block marked ```` ```python ```` in ``docs/**/*.md`` runs, page by page, in order,
in one namespace per page (blocks marked ```` ```py ```` are illustrations and are skipped).
Prints one line per page and exits non-zero if any block raised.
"""

from __future__ import annotations

import re
import sys
import time
import traceback
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]


def blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def main(pages: list[str]) -> int:
    failed = 0
    files = [Path(p).resolve() for p in pages] or sorted(DOCS.rglob("*.md"))
    for page in files:
        code = blocks(page.read_text())
        if not code:
            continue
        namespace: dict = {"__name__": "__main__"}  # classes defined in a block need a real module
        t0 = time.perf_counter()
        try:
            for i, block in enumerate(code):
                exec(compile(block, f"{page.relative_to(DOCS.parent)}[block {i}]", "exec"), namespace)
        except Exception:  # noqa: BLE001 - report every page
            failed += 1
            print(f"FAIL {page.relative_to(DOCS)}")
            traceback.print_exc()
            continue
        print(f"ok   {page.relative_to(DOCS)}: {len(code)} blocks, {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
