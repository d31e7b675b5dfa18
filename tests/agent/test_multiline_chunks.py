"""MultilineJoiner.feed_chunk, the whole-chunk path, joins exactly as the
per-line joiner does: the same entries, offsets and pending state, whatever
the lines, the pattern, the limits and where the chunks are cut."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import MultilineConfig
from agent.configfile import convert
from agent.multiline import Entry, MultilineJoiner, drop_trailing_blanks


def decode(line: bytes) -> str:  # what the parser's decode does for UTF-8
    text = line.decode("utf-8", "replace")
    return text[:-1] if text.endswith("\r") else text


def joiner(**settings_: object) -> MultilineJoiner:
    return MultilineJoiner(convert(settings_, MultilineConfig))


def split(lines: list[bytes], cuts: list[int], base: int = 7) -> list[tuple[bytes, list[bytes], list[int], int]]:
    """The lines as chunks (data, lines, starts, end) ending after the line numbers in ``cuts``."""
    out = []
    first = 0
    for stop in [*sorted({c for c in cuts if 0 < c < len(lines)}), len(lines)]:
        part = lines[first:stop]
        starts = []
        pos = base
        for line in part:
            starts.append(pos)
            pos += len(line) + 1
        out.append((b"".join(line + b"\n" for line in part), part, starts, pos))
        base = pos
        first = stop
    return out


def per_line(j: MultilineJoiner, chunks: list[tuple[bytes, list[bytes], list[int], int]]) -> list[Entry]:
    entries: list[Entry] = []
    for _, lines, starts, end in chunks:
        entries += j.feed_lines(lines, starts, end, decode, 0.0)
    return [*entries, *j.flush()]


def whole_chunks(j: MultilineJoiner, chunks: list[tuple[bytes, list[bytes], list[int], int]],
                 partial: bytes = b"") -> list[Entry]:
    """The entries as feed_chunk gives them (the per-line joiner where it declines), as text.
    ``partial``: bytes read after each chunk's last newline (a line not ended yet), not the chunk's."""
    entries: list[Entry] = []
    for data, lines, starts, end in chunks:
        joined = j.feed_chunk(data + partial, len(data), lines, starts, end, decode, 0.0)
        if joined is None:
            entries += j.feed_lines(lines, starts, end, decode, 0.0)
            continue
        entries += joined.before
        bounds = [*joined.starts, joined.stop]
        for at, stop in pairwise(bounds):
            rest = [decode(line) for line in lines[at + 1:stop]]
            drop_trailing_blanks(rest)
            entries.append((decode(lines[at]), rest, starts[at], starts[stop]))
        entries += joined.after
    return [*entries, *j.flush()]


LINES = [
    b"2026-11-30 10:00:01 INFO request done",
    b"[main] starting",
    b"{\"msg\": \"json\"}",
    b"Nov 30 10:00:01 host app: syslog",
    b"Traceback (most recent call last):",
    b'  File "app.py", line 3, in <module>',
    b"\tat com.example.Foo.bar(Foo.java:12)",
    b"ValueError: bad value",
    b"java.lang.IllegalStateException",
    b"Caused by: java.io.IOException: gone",
    b"\t... 3 more",
    b"During handling of the above exception, another exception occurred:",
    b"",
    b"   ",
    b"\t",
    b"\x0b",
    b"\x0c ",
    b"\xc2\xa0",  # NO-BREAK SPACE: blank to str.strip, not to bytes.strip
    b"\xe2\x80\x83 x",
    b"caf\xc3\xa9 ouvert",
    b"\xff\xfe broken bytes",
    b"  \xff",
    b"\xff",
    b"\x1c",
    b"plain words here",
    b"2026-11-30 10:00:02 WARN windows line\r",
    b"x" * 700,
    b" " + b"y" * 700,
]
# RE2 reads an invalid byte as no character, the text's U+FFFD as one: "^.$",
# "^\PL" and "." tell a line with one from its bytes.
PATTERNS = [None, r"^\s", r"^\d{4}-\d{2}-\d{2}", r"^[^ ]+ (?:INFO|WARN)", r"^$", r".", r"\pL", r"^.$", r"^\PL"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(LINES), min_size=1, max_size=60), st.lists(st.integers(0, 60), max_size=5),
       st.sampled_from(["start", "continuation"]), st.sampled_from(PATTERNS),
       st.sampled_from([1, 2, 3, 5, 500]), st.sampled_from([1024, 1500, 1 << 20]),
       st.sampled_from([b"", b"\r", b"\x1c", b"\xff partial"]))
def test_whole_chunks_join_as_the_per_line_joiner_does(lines: list[bytes], cuts: list[int], mode: str,
                                                        pattern: str | None, max_lines: int, max_bytes: int,
                                                        partial: bytes) -> None:
    settings_ = {"mode": mode, "pattern": pattern, "max_lines": max_lines, "max_bytes": max_bytes}
    chunks = split(lines, cuts)
    expected = per_line(joiner(**settings_), chunks)
    got = whole_chunks(joiner(**settings_), chunks, partial)
    assert got == expected


@given(st.lists(st.sampled_from([line for line in LINES if line.isascii() and b"\r" not in line
                                 and b"\x1c" not in line and line.strip()]), min_size=2, max_size=40),
       st.sampled_from(["start", "continuation"]), st.sampled_from([None, r"^\s", r"^\d{4}-"]))
def test_ascii_chunks_take_the_whole_chunk_path(lines: list[bytes], mode: str, pattern: str | None) -> None:
    # A chunk with a line that cannot continue an entry, no carriage return
    # and no blank line is joined without a Python step per line.
    j = joiner(mode=mode, pattern=pattern)
    chunks = split(lines, [])
    if not any(j.feed_chunk(data, len(data), ls, ss, end, decode, 0.0) is not None for data, ls, ss, end in chunks):
        verdicts = [j._matches(decode(line)) for line in lines]
        assert all(verdicts) if mode == "continuation" else not any(verdicts)


def test_a_chunk_of_log_lines_and_traces_comes_back_by_line_number() -> None:
    lines = [b"2026-11-30 10:00:01 INFO one", b"2026-11-30 10:00:02 ERROR two", b"Traceback (most recent call last):",
             b'  File "a.py", line 1', b"ValueError: x", b"", b"2026-11-30 10:00:03 INFO three",
             b"2026-11-30 10:00:04 INFO four"]
    (data, ls, starts, end), = split(lines, [])
    j = joiner(mode="start")
    joined = j.feed_chunk(data, len(data), ls, starts, end, decode, 0.0)
    assert joined is not None
    assert joined.before == [] and joined.after == []
    assert joined.starts == [0, 1, 6] and joined.stop == 7
    # The last line waits for the line that ends its entry.
    assert j.pending_start == starts[7]
    assert j.flush() == [("2026-11-30 10:00:04 INFO four", [], starts[7], end)]


def test_an_entry_pending_from_the_last_chunk_ends_at_the_first_break_as_text() -> None:
    j = joiner(mode="continuation")
    first = split([b"2026-11-30 ERROR failed", b"Traceback (most recent call last):"], [], base=0)[0]
    assert j.feed_chunk(first[0], len(first[0]), first[1], first[2], first[3], decode, 0.0) is not None
    second = split([b'  File "a.py", line 1', b"KeyError: 'k'", b"2026-11-30 INFO next", b"2026-11-30 INFO last"],
                   [], base=first[3])[0]
    joined = j.feed_chunk(second[0], len(second[0]), second[1], second[2], second[3], decode, 0.0)
    assert joined is not None
    assert joined.before == [("2026-11-30 ERROR failed",
                              ["Traceback (most recent call last):", '  File "a.py", line 1', "KeyError: 'k'"],
                              0, second[2][2])]
    assert joined.starts == [2] and joined.stop == 3


def test_an_entry_over_max_lines_is_cut_by_the_per_line_joiner() -> None:
    lines = [b"2026-11-30 ERROR a", b"  1", b"  2", b"  3", b"  4", b"2026-11-30 INFO b", b"2026-11-30 INFO c"]
    (data, ls, starts, end), = split(lines, [])
    j = joiner(mode="continuation", max_lines=3)
    joined = j.feed_chunk(data, len(data), ls, starts, end, decode, 0.0)
    assert joined is not None
    # The first entry is where the limit is reached: from there on, line by line.
    assert joined.starts == [] and joined.stop == 0
    assert [(e[0], e[1]) for e in joined.after] == [("2026-11-30 ERROR a", ["  1", "  2"]), ("  3", ["  4"]),
                                                     ("2026-11-30 INFO b", [])]


def test_an_entry_over_max_bytes_is_cut_by_the_per_line_joiner() -> None:
    lines = [b"2026-11-30 INFO a", b"2026-11-30 ERROR b", b" " + b"x" * 600, b" " + b"y" * 600, b"2026-11-30 INFO c",
             b"2026-11-30 INFO d"]
    (data, ls, starts, end), = split(lines, [])
    j = joiner(mode="start", max_bytes=1024)
    joined = j.feed_chunk(data, len(data), ls, starts, end, decode, 0.0)
    assert joined is not None
    # Entry "a" goes by line number; "b" would pass 1 KiB with its second
    # continuation line, so from there on, line by line.
    assert joined.starts == [0] and joined.stop == 1
    assert [(e[0][:18], len(e[1])) for e in joined.after] == [("2026-11-30 ERROR b", 1), (" " + "y" * 17, 0),
                                                               ("2026-11-30 INFO c", 0)]


def test_a_custom_pattern_takes_the_whole_chunk_path_on_valid_utf8_only() -> None:
    lines = [b"2026-11-30 INFO caf\xc3\xa9 ouvert", b"  \xe2\x86\x92 next step", b"2026-11-30 INFO done"]
    j = joiner(mode="start", pattern=r"^\d{4}-")
    (data, ls, starts, end), = split(lines, [])
    joined = j.feed_chunk(data, len(data), ls, starts, end, decode, 0.0)
    assert joined is not None and joined.starts == [0] and joined.stop == 2
    # An invalid byte is U+FFFD to the pattern, which its bytes cannot show.
    (data, ls, starts, end), = split([*lines, b"\xff"], [], base=end)
    assert j.feed_chunk(data, len(data), ls, starts, end, decode, 0.0) is None
