"""Request bodies as JSON, bounded: every way a body can fail to parse is a ``JSONDecodeError``.

``json.loads`` has failure modes besides ``JSONDecodeError``: bytes that are no UTF encoding raise
``UnicodeDecodeError``, and nesting deeper than the interpreter's recursion limit raises
``RecursionError`` (a body of 10,000 ``[``). Both are the client's malformed input, so each API
answers them like any other invalid JSON (422 in its own shape), never with a 500. Nesting is
also bounded well below the recursion limit: no request of this API needs more than a few levels.
"""

from __future__ import annotations

import json
from typing import Any

#: Deepest nesting of arrays and objects a request body may have.
MAX_JSON_DEPTH = 32


def loads(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(raw)``, raising ``json.JSONDecodeError`` for every malformed body."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) and _utf8(raw) else raw
    if isinstance(text, bytes):
        raise json.JSONDecodeError("the body is not UTF-8 text", "", 0)
    try:
        value = json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {max_depth} levels", "", 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError as error:  # e.g. an integer past Python's 4,300-digit conversion limit
        raise json.JSONDecodeError(str(error).split(";")[0][:200], "", 0) from None
    if _depth(value) > max_depth:
        raise json.JSONDecodeError(f"nested deeper than {max_depth} levels", "", 0)
    return value


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _depth(value: Any) -> int:
    """The deepest nesting of lists and objects in a parsed value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item if isinstance(child, (list, dict)))
    return deepest
