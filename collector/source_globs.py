"""Source globs (``payments-*``, ``web?``): one meaning in SQL and in Python.

Only ``*`` (any run of characters) and ``?`` (one character) are special;
everything else, including ``[``, ``%``, ``_`` and ``\\``, matches itself. The
SQL form escapes LIKE's own metacharacters, so a glob can never match more in
ClickHouse than it does here (tails filter in Python, queries in SQL).
"""

from __future__ import annotations

import functools
import re


def glob_to_like(pattern: str) -> str:
    """The glob as a LIKE pattern, LIKE's metacharacters escaped."""
    out = []
    for ch in pattern:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts), re.DOTALL)


def glob_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches ``pattern`` as a whole (case-sensitive, like LIKE)."""
    return _compiled(pattern).fullmatch(value) is not None
