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
import re
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, count
from operator import methodcaller, not_, sub
from typing import NamedTuple

import re2

from agent.config import MultilineConfig
from agent.re2direct import UNANCHORED as _UNANCHORED

# The built-in patterns spell RE2's classes out (\s is [\t\n\f\r ], \d [0-9],
# \w [0-9A-Za-z_]) so that Python's re, which runs them (see _compiled), reads
# them as RE2 does. Python and Java tracebacks: indented frames, the headers
# between chained exceptions, the final `SomeError: message`, Java's `Caused
# by:` and `... 3 more`.
TRACEBACK_CONTINUATION = (
    r"^(?:[\t\n\f\r ]+[^\t\n\f\r ]|[\t\n\f\r ]*$|Traceback \(most recent call last\)"
    r"|During handling of the above exception|The above exception was the direct cause|Caused by:|Suppressed:"
    r"|\.\.\. [0-9]+ more"
    r"|[A-Za-z_][0-9A-Za-z_.$]*(?:Error|Exception|Exit|Interrupt|Warning|Throwable|Iteration)(?::|$))"
)
# A line that begins with a date, `[` or `{` starts a new entry.
DEFAULT_START = r"^(?:[0-9]{4}-[0-9]{2}-[0-9]{2}|\[|\{|[A-Z][a-z]{2} [ 0-9][0-9] )"

Entry = tuple[str, list[str], int, int]


class ChunkEntries(NamedTuple):
    """What :meth:`MultilineJoiner.feed_chunk` completed, in file order:
    ``before`` (entries begun in an earlier chunk, as text), then the
    entries beginning at lines ``starts`` of the chunk (by line number; each
    runs to the next one, the last to line ``stop``), then ``after`` (as text)."""

    before: list[Entry]
    starts: list[int]
    stop: int
    after: list[Entry]


@functools.lru_cache(maxsize=64)
def _compiled_bytes(pattern: str) -> tuple[Callable[[bytes], object], bool]:
    """Whether ``pattern`` matches a line's UTF-8 bytes (truthy), and whether
    that is exact for any line (True: the built-in patterns, whose classes
    and literals are ASCII, so a line's bytes match iff its text does,
    invalid bytes and all) or only for valid UTF-8 (RE2 patterns: ``.`` or
    ``\\PL`` take U+FFFD, what an invalid byte is decoded to, for a
    character, but not the byte)."""
    if pattern in (TRACEBACK_CONTINUATION, DEFAULT_START):
        return re.compile(pattern.encode()).match, True
    options = re2.Options()
    options.log_errors = False
    regex = re2.compile(pattern, options)
    match = getattr(getattr(regex, "_regexp", None), "Match", None)
    if match is None or _UNANCHORED is None:
        return lambda data: regex.search(data.decode("ascii")) is not None, False
    return lambda data: match(_UNANCHORED, data, 0, len(data))[0][0] >= 0, False


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> Callable[[str], bool]:
    """Whether ``pattern`` matches a line. Bounded: a collector compiles the
    patterns agents send with their lines.

    The binding's ``search`` on a str builds a generator, a Match object and
    offset conversions, ~3 µs a line, more than joining costs otherwise; this
    asks the compiled RE2 object underneath about the line's UTF-8 (what
    ``search`` does), falling back to ``search`` if the binding lacks it."""
    if pattern in (TRACEBACK_CONTINUATION, DEFAULT_START):
        # Ours, anchored and without nested repetition: Python's re is linear
        # on them too, and ~3x cheaper a line than a call into RE2's binding.
        search = re.compile(pattern).search
        return lambda text: search(text) is not None
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


def drop_trailing_blanks(rest: list[str]) -> None:
    """An entry's trailing blank lines are not its own (they stay in its byte range)."""
    while rest and not rest[-1].strip():
        rest.pop()


class MultilineJoiner:
    def __init__(self, cfg: MultilineConfig) -> None:
        self.cfg = cfg
        self.start_mode = cfg.mode == "start"
        pattern = cfg.pattern or (DEFAULT_START if self.start_mode else TRACEBACK_CONTINUATION)
        self._matches = _compiled(pattern)
        self._bytes_matches = _compiled_bytes(pattern)
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
        drop_trailing_blanks(self._rest)
        entry = (self._first, self._rest, self._start, self._end)
        self._first, self._rest = None, []
        return entry

    def feed(self, line: str, start: int, end: int, now: float) -> list[Entry]:
        """Add one line (``start``/``end``: its file offsets, end after the
        newline); return the entries it completed."""
        return self._feed((line,), (start,), end, now)

    def feed_lines(self, lines: Sequence[bytes], starts: Sequence[int], end: int,
                   decode: Callable[[bytes], str], now: float) -> list[Entry]:
        """Add consecutive lines as read (``starts``: their file offsets;
        ``end``: the offset after the last one's newline), each decoded with
        ``decode``; return the entries they completed. The same as
        :meth:`feed` a line at a time, without a call per line."""
        return self._feed(map(decode, lines), starts, end, now) if lines else []

    def _feed(self, texts: Iterable[str], starts: Sequence[int], end: int, now: float) -> list[Entry]:
        self.last_line_at = now
        out: list[Entry] = []
        matches = self._matches
        start_mode = self.start_mode
        max_lines = self.cfg.max_lines
        max_bytes = self.cfg.max_bytes
        first, rest, entry_start, entry_end = self._first, self._rest, self._start, self._end
        last = len(starts) - 1
        for i, line in enumerate(texts):
            line_start = starts[i]
            line_end = starts[i + 1] if i < last else end
            if first is None:
                if line.strip():
                    first, rest, entry_start, entry_end = line, [], line_start, line_end
                continue
            matched = matches(line)
            if (not matched if start_mode else matched) and 1 + len(rest) < max_lines \
                    and line_end - entry_start <= max_bytes:
                rest.append(line)
                entry_end = line_end
                continue
            # A new entry starts here, or the current one reached max_lines or
            # max_bytes (this line then opens the next one).
            drop_trailing_blanks(rest)
            out.append((first, rest, entry_start, entry_end))
            if line.strip():
                first, rest, entry_start, entry_end = line, [], line_start, line_end
            else:
                first, rest = None, []
        self._first, self._rest, self._start, self._end = first, rest, entry_start, entry_end
        return out

    def feed_chunk(self, data: bytes, size: int, lines: Sequence[bytes], starts: Sequence[int], end: int,
                   decode: Callable[[bytes], str], now: float) -> ChunkEntries | None:
        """:meth:`feed_lines` for a whole chunk of UTF-8 lines (``data[:size]``,
        split into ``lines`` at ``starts``), without a Python step per line
        where it can: each line's pattern verdict is taken in one pass of C
        calls, and the entries that begin in the chunk come back as line
        numbers, not text. ``None`` where that would not be exact; the caller
        then uses :meth:`feed_lines`.

        The verdicts give the lines that cannot continue an entry (the
        "breaks"): each entry from the first break on runs to the next break,
        unless a limit (``max_lines``, ``max_bytes``) or a blank break would
        have made the per-line joiner cut it otherwise. The lines before the
        first break (continuing an entry pending from the last chunk), and
        everything from such a cut on, go through the per-line joiner."""
        if not lines:
            return None
        for byte in b"\r\x1c\x1d\x1e\x1f":
            # \r is cut from a line's end when decoded; \x1c-\x1f are blank
            # to str.strip, not to bytes.strip.
            if data.find(byte, 0, size) >= 0:
                return None
        match, exact_utf8 = self._bytes_matches
        text = data if size == len(data) else data[:size]
        is_ascii = text.isascii()
        if not exact_utf8 and not is_ascii:
            # A pattern reads the lines' text; on valid UTF-8 that is their bytes.
            try:
                text.decode()
            except UnicodeDecodeError:
                return None
        n = len(lines)
        verdicts = map(match, lines)
        breaks = list(compress(range(n), verdicts if self.start_mode else map(not_, verdicts)))
        if not breaks:
            return None
        get = lines.__getitem__
        if is_ascii:
            blank_at = next(compress(count(), map(not_, map(bytes.strip, map(get, breaks)))), None)
        else:
            texts = map(methodcaller("decode", "utf-8", "replace"), map(get, breaks))
            blank_at = next(compress(count(), map(not_, map(str.strip, texts))), None)
        if blank_at == 0:
            return None
        # The entry whose text the per-line joiner takes from: the last one
        # (pending at the chunk's end), or one before a cut.
        last = len(breaks) - 1 if blank_at is None else blank_at - 1
        max_lines, max_bytes = self.cfg.max_lines, self.cfg.max_bytes
        line_counts = list(map(sub, [*breaks[1:], n], breaks))
        offsets = list(map(starts.__getitem__, breaks))
        spans = list(map(sub, [*offsets[1:], end], offsets))
        if max(line_counts) > max_lines or max(spans) > max_bytes:
            for k in range(last + 1):
                if line_counts[k] > max_lines or (line_counts[k] > 1 and spans[k] > max_bytes):
                    last = k
                    break
        first_break = breaks[0]
        before = self._feed(map(decode, lines[:first_break]), starts[:first_break], offsets[0], now) \
            if first_break else []
        if self._first is not None:
            before.append(self._take())
        at = breaks[last]
        self._first, self._rest = decode(lines[at]), []
        self._start, self._end = offsets[last], starts[at + 1] if at + 1 < n else end
        after = self._feed(map(decode, lines[at + 1:]), starts[at + 1:], end, now)
        return ChunkEntries(before, breaks[:last], at, after)

    def due(self, now: float) -> bool:
        return self._first is not None and now - self.last_line_at >= self.cfg.timeout

    def flush(self) -> list[Entry]:
        """The pending entry, if any, as complete."""
        if self._first is None:
            return []
        return [self._take()]
