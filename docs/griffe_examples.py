"""Griffe extension for the API reference: the project's ``Example:`` sections are doctests.

The docstrings use Google style with a singular ``Example:`` heading (their doctests run under pytest). Griffe
parses only ``Examples:`` as a doctest section and renders other headings as Markdown admonitions, where a
doctest output such as ``[(7, 3), (8, 1)]`` reads as a broken link. This renames the heading before parsing.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class ExampleSections(griffe.Extension):
    """Rewrite ``Example:`` section headings to ``Examples:`` in every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "Example:" in obj.docstring.value:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
