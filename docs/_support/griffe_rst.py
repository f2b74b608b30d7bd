"""Griffe extension: render the reST idioms of snapjax's docstrings as Markdown.

snapjax's docstrings are Google style (``Args:``/``Returns:``/``Raises:``) but use a few reST
idioms that Markdown does not know:

* cross-reference roles (``:class:`OnlineMethod```, ``:func:`~snapjax.online_method```): a
  role whose target is a public name (``snapjax.__all__``) becomes a link to its API entry, any
  other one a code span;
* simple tables (rows between ``====  ====`` rules): converted to Markdown tables;
* a paragraph ending in ``::`` (reST's literal-block marker): the second colon is dropped;
* compact Google sections: a section title (``Args:``, ``Returns:``...) right under the previous
  text gets the blank line griffe needs to see it, and an ``Args:``/``Attributes:`` line holding
  several entries (``x_t: ...  y_t: ...``, two spaces after the end of a description) is split
  into one line per entry.

Only the rendered text changes; the docstrings in the package stay as they are.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

_INIT = Path(__file__).resolve().parents[2] / "snapjax" / "__init__.py"
_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|obj|exc):`(~?)([^`<]+?)`")
_RULE = re.compile(r"^( *)(=+)((?: +=+)+) *$")


def public_names() -> set[str]:
    """``snapjax.__all__``, read from the source without importing the package."""
    tree = ast.parse(_INIT.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise RuntimeError(f"no __all__ in {_INIT}")


_PUBLIC = public_names()


def _role(match: re.Match) -> str:
    tilde, target = match.group(2), match.group(3).strip()
    short = target[len("snapjax."):] if target.startswith("snapjax.") else target
    shown = target.rsplit(".", 1)[-1] if tilde else target
    if short in _PUBLIC:
        return f"[`{shown}`][snapjax.{short}]"
    return f"`{shown}`"


def _columns(line: str) -> list[tuple[int, int]]:
    """Column spans ``(start, end)`` of a reST simple-table rule line."""
    return [(m.start(), m.end()) for m in re.finditer(r"=+", line)]


def _tables(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _RULE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        spans = _columns(lines[i])
        rules = [j for j in range(i, len(lines)) if _RULE.match(lines[j])]
        # a simple table: top rule, header, rule, body, bottom rule (three rules in a row)
        if len(rules) < 3:
            out.append(lines[i])
            i += 1
            continue
        top, mid, bottom = rules[:3]
        rows: list[list[str]] = []
        for j in range(top + 1, bottom):
            if j == mid:
                continue
            line = lines[j]
            cells = [line[a:(spans[k + 1][0] if k + 1 < len(spans) else len(line))].strip() for k, (a, _) in enumerate(spans)]
            if rows and not cells[0] and j != mid + 1 and j != top + 1:
                rows[-1] = [f"{p} {c}".strip() for p, c in zip(rows[-1], cells)]
            else:
                rows.append(cells)
        header, body = rows[0], rows[1:]
        indent = m.group(1)
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + "---|" * len(header))
        out.extend(indent + "| " + " | ".join(r) + " |" for r in body)
        i = bottom + 1
    return "\n".join(out)


_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Attributes|Returns|Yields|Raises|Examples?|Notes?|Warnings?):\s*$"
)
_ENTRIES = ("Args", "Arguments", "Parameters", "Attributes")
_NEXT_ENTRY = re.compile(r"(?<=[.)`\]])\s{2,}(?=\*{0,2}[A-Za-z_]\w*(?:, \*{0,2}[A-Za-z_]\w*)*: )")


def _sections(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    section, entry_indent = None, None
    for line in lines:
        m = _SECTION.match(line)
        if m:
            if out and out[-1].strip():
                out.append("")
            section, entry_indent = m.group(1), None
            out.append(line)
            continue
        indent = len(line) - len(line.lstrip())
        if section in _ENTRIES and line.strip():
            if entry_indent is None:
                entry_indent = indent
            if indent < entry_indent:
                section = None
            else:
                parts = _NEXT_ENTRY.split(line.strip())
                out.append(line[:indent] + parts[0])
                out.extend(" " * entry_indent + p for p in parts[1:])
                continue
        elif not line.strip() and section in _ENTRIES:
            section = None
        out.append(line)
    return "\n".join(out)


def markdown(text: str) -> str:
    """The Markdown rendering of one docstring's text."""
    text = _ROLE.sub(_role, text)
    text = _tables(text)
    text = re.sub(r"(?m)(\S):(:)$", r"\1:", text)
    text = _sections(text)
    return text


class ReSTIdioms(griffe.Extension):
    """Rewrite every docstring before it is parsed (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
