"""JSON parsing that refuses absurd nesting with one clear error instead of a RecursionError.

Config files, safetensors headers and index files nest a few levels at most; a
hostile or broken file nested thousands of levels deep would otherwise raise a
RecursionError traceback in the parser, or later in code that walks the value.
"""
from __future__ import annotations

import json

MAX_DEPTH = 64  # far beyond any real config or header


class JSONNestingError(ValueError):
    """A JSON text nested deeper than MAX_DEPTH."""


def _depth(value) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                break
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def loads(text: str | bytes, what: str = "JSON"):
    """`json.loads(text)`, raising JSONNestingError (naming `what`) for nesting deeper than MAX_DEPTH."""
    too_deep = JSONNestingError(f"{what} is nested more than {MAX_DEPTH} levels deep (not a valid file of its kind)")
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    if _depth(value) > MAX_DEPTH:
        raise too_deep
    return value


def load(file, what: str = "JSON"):
    return loads(file.read(), what)
