"""The one JSON parser for request bodies (OIP REST, ``/v1/tokenize``, pipeline over HTTP).

Python's ``json`` recurses once per nesting level, so ``"[" * 100000`` raises
RecursionError (an HTTP 500) and a merely deep document costs stack and time. Here the
nesting depth is measured before parsing and anything deeper than ``server.max_json_depth``
is refused as ``invalid_argument`` naming the limit; RecursionError never escapes.

The depth check stays cheap for large flat bodies (a 32 MiB OIP tensor as JSON): strings
are removed by one C-level regex (a bracket inside a string does not nest), the rest is
reduced to its brackets with ``bytes.translate``, and the running depth is a numpy cumsum,
so no Python loop runs per byte. A body of at most ``max_depth`` brackets skips the sum.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from serving.errors import ServingError

__all__ = ["json_depth", "parse_json"]

# A JSON string: a quote, runs of plain bytes and escapes, a quote ("unrolled loop": no
# per-character alternation, so the regex engine moves over long strings in C).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = b"[]{}"
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _BRACKETS)
_OPEN = (ord("["), ord("{"))


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in UTF-8 JSON ``data`` (0 for a scalar).

    Brackets inside strings do not count. For invalid JSON (say an unterminated string)
    the figure may be too high, never too low: such a body is refused either way.
    """
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == _OPEN[0]) | (codes == _OPEN[1]), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _utf8(data: bytes | str) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8", "surrogatepass")
    encoding = json.detect_encoding(data)
    if encoding.startswith("utf-8"):
        return data
    # UTF-16/32 (json.loads accepts them): measure the same text as UTF-8.
    return data.decode(encoding).encode("utf-8", "surrogatepass")


def parse_json(data: bytes | str, *, max_depth: int, what: str = "request body") -> Any:
    """Parse JSON ``data``; raises ServingError (``invalid_argument``) for anything bad.

    ``what`` names the document in messages ("request body", "the JSON header").
    """
    try:
        raw = _utf8(data)
        if len(raw) > max_depth and json_depth(raw) > max_depth:
            raise ServingError(
                "invalid_argument",
                f"{what} nests JSON deeper than the server's limit of {max_depth} levels "
                "(server.max_json_depth)",
            )
        return json.loads(raw)
    except ServingError:
        raise
    except RecursionError:  # a limit above what this interpreter's stack allows
        raise ServingError(
            "invalid_argument",
            f"{what} nests JSON too deeply to parse; the server's limit is {max_depth} levels "
            "(server.max_json_depth)",
        ) from None
    except (UnicodeError, ValueError) as exc:
        raise ServingError("invalid_argument", f"{what} is not valid JSON: {exc}") from None
