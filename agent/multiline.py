"""Join physical lines into multiline entries (tracebacks, wrapped messages).

A :class:`MultilineJoiner` takes the decoded lines of one file in order and
hands back complete entries as ``(first_line, continuation_lines, start_offset,
end_offset)``. The entry still being collected stays pending until a line
shows it is complete, ``max_lines`` is reached, or :meth:`flush` is called
after ``timeout`` without new lines. The caller must not checkpoint past
:attr:`pending_start`: those bytes belong to no record yet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import re2

from agent.config import MultilineConfig

# Python and Java tracebacks: indented frames, the headers between chained
# exceptions, the final `SomeError: message`, Java's `Caused by:` and `... 3 more`.
TRACEBACK_CONTINUATION = (
    r"^(?:\s+\S|\s*$|Traceback \(most recent call last\)|During handling of the above exception"
    r"|The above exception was the direct cause|Caused by:|Suppressed:|\.\.\. \d+ more"
    r"|[A-Za-z_][\w.$]*(?:Error|Exception|Exit|Interrupt|Warning|Throwable|Iteration)(?::|$))"
)
# A line that begins with a date, `[` or `{` starts a new entry.
DEFAULT_START = r"^(?:\d{4}-\d{2}-\d{2}|\[|\{|[A-Z][a-z]{2} [ \d]\d )"

Entry = tuple[str, list[str], int, int]


_UNANCHORED: Any = getattr(getattr(getattr(getattr(re2, "_re2", None), "RE2", None), "Anchor", None),
                           "UNANCHORED", None)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> Callable[[str], bool]:
    """Whether ``pattern`` matches a line. Bounded: a collector compiles the
    patterns agents send with their lines.

    The binding's ``search`` on a str builds a generator, a Match object and
    offset conversions, ~3 µs a line, more than joining costs otherwise; this
    asks the compiled RE2 object underneath about the line's UTF-8 (what
    ``search`` does), falling back to ``search`` if the binding lacks it."""
    options = re2.Options()
    options.log_errors = False
    regex = re2.compile(pattern, options)
    match = getattr(getattr(regex, "_regexp", None), "Match", None)
    if match is None or _UNANCHORED is None:
        return lambda text: regex.search(text) is not None

    def matches(text: str) -> bool:
        data = text.encode()
        return match(_UNANCHORED, data, 0, len(data))[0][0] >= 0  # type: ignore[no-any-return]

    return matches


class MultilineJoiner:
    def __init__(self, cfg: MultilineConfig) -> None:
        self.cfg = cfg
        self.start_mode = cfg.mode == "start"
        pattern = cfg.pattern or (DEFAULT_START if self.start_mode else TRACEBACK_CONTINUATION)
        self._matches = _compiled(pattern)
        self._first: str | None = None
        self._rest: list[str] = []
        self._start = 0
        self._end = 0
        self.last_line_at = 0.0

    @property
    def pending_start(self) -> int | None:
        """File offset of the entry being collected, if any."""
        return self._start if self._first is not None else None

    def _take(self) -> Entry:
        assert self._first is not None
        while self._rest and not self._rest[-1].strip():
            self._rest.pop()
        entry = (self._first, self._rest, self._start, self._end)
        self._first, self._rest = None, []
        return entry

    def feed(self, line: str, start: int, end: int, now: float) -> list[Entry]:
        """Add one line (``start``/``end``: its file offsets, end after the
        newline); return the entries it completed."""
        self.last_line_at = now
        out: list[Entry] = []
        if self._first is None:
            if not line.strip():
                return out
            self._first, self._rest, self._start, self._end = line, [], start, end
            return out
        matched = self._matches(line)
        continues = not matched if self.start_mode else matched
        if continues and 1 + len(self._rest) < self.cfg.max_lines and end - self._start <= self.cfg.max_bytes:
            self._rest.append(line)
            self._end = end
            return out
        # A new entry starts here, or the current one reached max_lines or
        # max_bytes (this line then opens the next one).
        out.append(self._take())
        if line.strip():
            self._first, self._rest, self._start, self._end = line, [], start, end
        return out

    def due(self, now: float) -> bool:
        return self._first is not None and now - self.last_line_at >= self.cfg.timeout

    def flush(self) -> list[Entry]:
        """The pending entry, if any, as complete."""
        if self._first is None:
            return []
        return [self._take()]
