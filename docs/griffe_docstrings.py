"""Griffe extension for the API reference: render the project's docstrings as they are meant to be read.

The docstrings are written for Python's ``help()`` and for doctests: Google-style sections with a singular
``Example:`` heading, Sphinx cross-reference roles (``:class:`~lightning_metaif.MetaInfluence```) and the odd
reStructuredText table. Before griffe parses a docstring this extension

* renames ``Example:`` headings to ``Examples:`` (griffe parses only the plural as a doctest section and renders
  other headings as Markdown, where doctest output such as ``[(7, 3), (8, 1)]`` reads as a broken link);
* turns Sphinx roles into inline code (``:class:`~a.b.C``` -> ``C``, ``:func:`a.b.f``` -> ``a.b.f``);
* wraps reStructuredText simple tables (rows framed by ``====  ====`` lines) in a preformatted block.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", flags=re.M)
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|py:\w+):`(~?)([^`]+)`")
_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _tables(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if _BORDER.match(lines[i]):
            borders = [j for j in range(i, len(lines)) if _BORDER.match(lines[j])][:3]
            if len(borders) == 3:
                indent = re.match(r"\s*", lines[i]).group(0)
                table = [_ROLE.sub(lambda m: _role(m).strip("`"), line) for line in lines[i : borders[2] + 1]]
                out += [f"{indent}```text", *table, f"{indent}```"]
                i = borders[2] + 1
                continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


class DocstringStyle(griffe.Extension):
    """Apply the rewrites of the module docstring to every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        value = _HEADING.sub(r"\1Examples:", docstring.value)
        if "==" in value:
            value = _tables(value)
        docstring.value = _ROLE.sub(_role, value)
