"""Multiline sources ship their entries as read: the collector joins the lines
again and stores the records the agent's own joiner and parser would have made."""

from __future__ import annotations

import types
from typing import Any

import msgspec
import pytest
import re2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import MultilineConfig, RedactConfig, SourceConfig
from agent.configfile import ConfigInvalid, convert
from agent.metrics import AgentMetrics
from agent.multiline import DEFAULT_START, TRACEBACK_CONTINUATION, _compiled
from agent.parsers import parse_shipped_lines
from agent.redact import Redactor
from agent.runner import RawRun, SourcePipeline, _split_items, _wire_items
from agent.tailer import Chunk
from agent.wire import Lines, LinesMultiline, Record
from tests.agent.conftest import agent_config, eventually, write_lines

CARD = "4111 1111 1111 1111"
UUIDS = ["41111111-1111-1111-1111-111111111111", "40000000-0000-0000-0000-000000000002",
         "12345678-9012-3456-7890-123456789012"]
READ_AT = "2026-12-01T00:00:00.000Z"


def pipeline(ship_lines: bool, fmt: str = "plain", **multiline: Any) -> SourcePipeline:
    source: dict[str, Any] = {"path": "x", "source": "app", "format": fmt, "multiline": multiline}
    if fmt == "regex":
        source["pattern"] = r"(?P<timestamp>\S+ \S+) (?P<level>[A-Z]+) (?P<message>.*)"
    cfg = convert(source, SourceConfig)
    p = SourcePipeline(cfg, "host-1", Redactor(RedactConfig()), AgentMetrics())
    p.ship_lines = ship_lines
    return p


def chunks_of(lines: list[str], cuts: list[int], base: int = 100) -> list[Chunk]:
    """The lines read in chunks that end after the line numbers in ``cuts``."""
    chunks = []
    start = 0
    for stop in [*sorted({c for c in cuts if 0 < c < len(lines)}), len(lines)]:
        data = "".join(line + "\n" for line in lines[start:stop]).encode()
        chunks.append(Chunk.of_body(data, base, base + len(data)))
        base += len(data)
        start = stop
    return chunks


def stored(items: list[Any]) -> list[Record]:
    """What the collector stores from a pipeline's items."""
    records, groups = _wire_items(items)
    out = list(records)
    for group in groups:
        out.extend(r for _, r in parse_shipped_lines(group, "host-1")[0])
    return out


def run(p: SourcePipeline, chunks: list[Chunk]) -> tuple[list[Record], list[int], int]:
    """Every chunk through the pipeline, then the pending entry flushed:
    the records stored, the line counts and the last covered offset."""
    tracked = types.SimpleNamespace()
    records: list[Record] = []
    counts = []
    end = 0
    for chunk in chunks:
        items, count, end = p.process(tracked, chunk, "/f.log", 0.0)
        assert all(item.entries is not None for item in items if type(item) is RawRun)
        records.extend(stored(items))
        counts.append(count)
    records.extend(p.flush(tracked, "/f.log"))
    return records, counts, end


def _same_stamps(records: list[Record]) -> dict[int | None, Record]:
    # An entry whose first line has no timestamp of its own gets its read time.
    return {r.offset: r if r.timestamp.startswith("2026-11-30") else msgspec.structs.replace(r, timestamp=READ_AT)
            for r in records}


kinds = st.sampled_from(["start", "start", "frame", "caused", "error", "blank", "secret", "secret-frame", "cr",
                         "long", "uuid", "uuid-frame"])


def _line(i: int, kind: str) -> str:
    stamp = f"2026-11-30 10:00:{i % 60:02d},{i % 1000:03d}"
    return {"start": f"{stamp} INFO request {i} done",
            "frame": f"\tat com.example.Foo.bar{i}(Foo.java:{i})",
            "caused": "Caused by: java.io.IOException: gone",
            "error": f"java.lang.IllegalStateException: state {i}",
            "blank": "",
            "secret": f"{stamp} WARN paid with card {CARD}",
            "secret-frame": f"\tat Pay.charge(card={CARD}, ssn=123-45-6789)",
            "cr": f"{stamp} INFO windows line {i}\r",
            # Digit runs in a UUID (card-shaped, Luhn-valid or not) are not cards to the rules.
            "uuid": f"{stamp} INFO order request_id={UUIDS[i % len(UUIDS)]} done",
            "uuid-frame": f'\tat Orders.place(id="{UUIDS[i % len(UUIDS)]}")',
            "long": f"\tat com.example.{'Deep' * 150}.call{i}(Deep.java:{i})"}[kind]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(kinds, min_size=1, max_size=40), st.lists(st.integers(0, 40), max_size=6),
       st.sampled_from(["start", "continuation"]), st.integers(1, 6), st.sampled_from(["plain", "regex"]),
       st.sampled_from([1024, 2000, 1 << 20]), st.booleans())
def test_entries_shipped_as_read_are_stored_as_the_records_path_stores_them(
        kinds_: list[str], cuts: list[int], mode: str, max_lines: int, fmt: str, max_bytes: int,
        carriage_returns: bool) -> None:
    # A chunk with a carriage return is joined line by line; one without, as a whole (feed_chunk).
    lines = [_line(i, kind if carriage_returns or kind != "cr" else "start") for i, kind in enumerate(kinds_)]
    records_path = pipeline(False, fmt, mode=mode, max_lines=max_lines, max_bytes=max_bytes)
    lines_path = pipeline(True, fmt, mode=mode, max_lines=max_lines, max_bytes=max_bytes)
    records_path.parser.fixed_now = READ_AT
    expected, expected_counts, expected_end = run(records_path, chunks_of(lines, cuts))
    got, counts, end = run(lines_path, chunks_of(lines, cuts))
    assert _same_stamps(got) == _same_stamps(expected)
    assert len(got) == len(expected) and end == expected_end
    text = repr([(r.message, r.error_stack) for r in got])
    assert CARD not in text and "123-45-6789" not in text
    # A chunk's count is its records plus the lines of its runs.
    assert all(c >= e for c, e in zip(counts, expected_counts, strict=True))


@pytest.mark.parametrize("mode", ["start", "continuation"])
def test_a_hit_entry_joined_by_line_number_keeps_its_trailing_blank_lines_out_of_its_stack(mode: str) -> None:
    lines = [_line(0, "start"), _line(1, "secret"), _line(2, "frame"), _line(3, "blank"), _line(4, "blank"),
             _line(5, "start"), _line(6, "start")]
    records_path, lines_path = pipeline(False, mode=mode), pipeline(True, mode=mode)
    records_path.parser.fixed_now = READ_AT
    expected, _, _ = run(records_path, chunks_of(lines, []))
    got, _, _ = run(lines_path, chunks_of(lines, []))
    assert _same_stamps(got) == _same_stamps(expected)
    card = next(r for r in got if "card" in r.message)
    assert card.error_stack == "\tat com.example.Foo.bar2(Foo.java:2)"


def test_a_chunk_of_whole_entries_goes_as_one_run_and_the_pending_entry_waits() -> None:
    p = pipeline(True, mode="start")
    lines = [_line(0, "start"), _line(1, "error"), _line(2, "frame"), _line(3, "start"), _line(4, "secret"),
             _line(5, "frame"), _line(6, "start"), _line(7, "frame"), _line(8, "start")]
    chunk = chunks_of(lines, [])[0]
    tracked = types.SimpleNamespace()
    items, count, end = p.process(tracked, chunk, "/f.log", 0.0)
    runs = [i for i in items if type(i) is RawRun]
    records = [i for i in items if type(i) is Record]
    # Entries 0-2 and 3 go as read; the card's entry (4-5) is a record; 6-7 as
    # read; 8 waits for the line that ends it.
    assert [(r.count, r.entries) for r in runs] == [(4, [0, 3]), (2, [0])]
    assert [r.message for r in records] == ["paid with card [REDACTED:credit_card]"]
    assert count == 4 + 1 + 2
    assert end == chunk.base + sum(len(line) + 1 for line in lines[:8])
    assert [r.message for r in p.flush(tracked, "/f.log")] == ["request 8 done"]


def test_a_multiline_run_splits_only_where_an_entry_starts() -> None:
    run = RawRun(pipeline(True, mode="start"), b"a\n b\n c\nd\ne\n f\n", 0, 16, 500, 6, "/f.log", 0.0, [0, 3, 4])
    head, rest, taken = _split_items([run], 5)
    assert taken == 4 and [(r.count, r.entries, r.offset) for r in head] == [(4, [0, 3], 500)]  # type: ignore[union-attr]
    assert [(r.count, r.entries, r.offset) for r in rest] == [(2, [0], 510)]  # type: ignore[union-attr]
    # Room for less than the first entry: the batch that holds something closes without it…
    record = Record("2026-12-01T00:00:00.000Z", "INFO", "app", "r")
    head, rest, taken = _split_items([record, run], 2)
    assert (head, rest, taken) == ([record], [record, run][1:], 1)
    # …and one that holds nothing takes the first entry whole.
    head, rest, taken = _split_items([run], 2)
    assert taken == 3 and [r.count for r in head] == [3] and [r.count for r in rest] == [3]  # type: ignore[union-attr]
    single = RawRun(run.pipeline, b"a\n b\n c\n", 0, 8, 500, 3, "/f.log", 0.0, [0])
    assert _split_items([single], 2) == ([single], [], 3)


def test_wire_groups_carry_the_joiner_settings() -> None:
    p = pipeline(True, mode="continuation", pattern=r"^\s", max_lines=7)
    run = RawRun(p, b"a\n b\n", 0, 5, 0, 2, "/f.log", 1.0, [0])
    _, groups = _wire_items([run])
    assert groups[0].multiline == LinesMultiline("continuation", r"^\s", 7, 1 << 20)
    numbered, count, _ = parse_shipped_lines(groups[0], "h")
    assert count == 2 and [(i, r.message, r.error_stack) for i, r in numbered] == [(0, "a", " b")]


@pytest.mark.parametrize(("multiline", "error"), [
    (LinesMultiline("both"), "lines.multiline.mode: must be start or continuation, not 'both'"),
    (LinesMultiline("start", max_lines=0), "lines.multiline.max_lines: must be 1 to 100000"),
    (LinesMultiline("start", max_lines=100_001), "lines.multiline.max_lines: must be 1 to 100000"),
    (LinesMultiline("start", pattern="x" * 4097), "lines.multiline.pattern: must be 1 to 4096 characters"),
    (LinesMultiline("start", max_bytes=1023), "lines.multiline.max_bytes: must be 1024 to 67108864"),
    (LinesMultiline("start", pattern="(unclosed"), "lines.multiline.pattern is not a valid RE2 regular expression"),
])
def test_invalid_multiline_settings_are_named(multiline: LinesMultiline, error: str) -> None:
    group = Lines("app", b"a\n b\n", 1.0, "plain", multiline=multiline)
    with pytest.raises(ValueError, match="^" + error.replace("(", r"\(").replace(".", r"\.")):
        parse_shipped_lines(group, "h")


def test_with_custom_rules_a_carriage_return_sends_the_chunk_as_records() -> None:
    # Joined lines lose the "\r" before their newline: a custom rule can find
    # "a\n\tat" in an error_stack that no raw line ("a\r\n\tat") holds.
    cfg = msgspec.convert({"path": "x", "source": "app", "format": "plain", "multiline": {"mode": "start"}},
                          SourceConfig)
    redact = msgspec.convert({"custom": [{"name": "frame", "pattern": r"hidden\n\tat"}]}, RedactConfig)
    lines = ["2026-11-30 10:00:00,000 ERROR failed", "\tat one(hidden\r", "\tat two", "2026-11-30 10:00:01,000 INFO"]
    for ship in (True, False):
        p = SourcePipeline(cfg, "host-1", Redactor(redact), AgentMetrics())
        p.ship_lines = ship
        records, _, _ = run(p, chunks_of(lines, []))
        assert [r.error_stack for r in records if r.error_stack] == ["\tat one([REDACTED:frame] two"]
    # Without custom rules such a chunk still goes as read.
    p = pipeline(True, mode="start")
    items, _, _ = p.process(types.SimpleNamespace(), chunks_of(lines, [])[0], "/f.log", 0.0)
    assert [type(i) for i in items] == [RawRun]


async def test_an_agent_ships_entries_as_read_in_batches_that_split_between_entries(
        tmp_path, stub, start_agent) -> None:
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "app.log"
    source = {"path": str(log), "source": "app", "format": "plain", "multiline": {"mode": "start", "timeout": "200ms"}}
    expected: list[tuple[str, str | None]] = []

    def entries(start: int, stop: int) -> list[str]:
        lines = []
        for i in range(start, stop):
            stack = [f"java.lang.Error: e{i}", *(f"\tat f{k}(F.java:{k})" for k in range(i % 4))] if i % 2 else []
            lines += [f"2026-11-30 10:00:00,{i:03d} ERROR entry {i}", *stack]
            expected.append((f"entry {i}", "\n".join(stack) or None))
        return lines

    write_lines(log, entries(0, 3))
    running = await start_agent(agent_config(tmp_path, stub.url, [source], batch={"max_records": 7}))
    await eventually(lambda: len(stub.records) == 3, what="the first entries")
    write_lines(log, entries(3, 80))
    await eventually(lambda: len(stub.records) == 80, what="every entry")
    assert sorted((r.message, r.error_stack) for r in stub.records) == sorted(expected)
    assert stub.lines_posts > 5, "entries went as read, in several batches"
    assert len(stub.batches) > 10
    assert running.agent.metrics.lines_read == len(log.read_text().splitlines())
    # Records are entries, not lines (counted when acknowledged, which may follow storing).
    await eventually(lambda: running.agent.metrics.records_shipped == 80, what="80 records shipped")


# The built-in patterns as they were written for RE2 (\s, \d, \w): the
# reference for the spelled-out ones that Python's re now runs.
RE2_TRACEBACK_CONTINUATION = (
    r"^(?:\s+\S|\s*$|Traceback \(most recent call last\)|During handling of the above exception"
    r"|The above exception was the direct cause|Caused by:|Suppressed:|\.\.\. \d+ more"
    r"|[A-Za-z_][\w.$]*(?:Error|Exception|Exit|Interrupt|Warning|Throwable|Iteration)(?::|$))"
)
RE2_DEFAULT_START = r"^(?:\d{4}-\d{2}-\d{2}|\[|\{|[A-Z][a-z]{2} [ \d]\d )"
_TRICKY = ["\t", " ", "\x0b", "\x0c", "\r", "\xa0", "\u2003", "a", "Z", "K", "\u212a", "\u017f", "_", "$", ".",
           "0", "9", "\u0663", "\uff11", "-", ":", "é", "€", "\U0001f600", "[", "{", "(", "\x00", "\ufffd", "Error",
           "Exception:", "Caused by:", "... 12 more", "Traceback (most recent call last)", "Dec", " 1 ", "2026-12-01"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_TRICKY), max_size=12).map("".join),
       st.sampled_from([(TRACEBACK_CONTINUATION, RE2_TRACEBACK_CONTINUATION), (DEFAULT_START, RE2_DEFAULT_START),
                        (r"^\s", r"^\s"), (r"€\d", r"€\d"), (r"(?i)caused", r"(?i)caused"), (r"^$", r"^$"),
                        (r"é$", r"é$")]))
def test_the_joiners_matcher_agrees_with_re2_search(text: str, patterns: tuple[str, str]) -> None:
    # The joiner asks RE2 about the line's UTF-8 directly, or Python's re
    # for the built-in patterns; the binding's search (on the str) with the
    # pattern as first written is the reference.
    pattern, reference = patterns
    assert _compiled(pattern)(text) == (re2.compile(reference).search(text) is not None)


def test_an_entry_ends_before_a_line_that_would_take_it_past_max_bytes() -> None:
    # 1 KiB: the first line (any length) and the frames after it while the
    # entry, newlines included, stays within it; the next frame opens an entry.
    p = pipeline(False, mode="start", max_bytes=1024)
    frame = "\tat " + "x" * 295  # 300 bytes with its newline
    lines = ["2026-11-30 10:00:00,000 ERROR " + "y" * 1100, frame, "2026-11-30 10:00:01,000 ERROR boom",
             frame, frame, frame, frame, "2026-11-30 10:00:02,000 INFO end"]
    records, _, _ = run(p, chunks_of(lines, []))
    assert [(r.message[:6], (r.error_stack or "").count("\tat ")) for r in records] == [
        ("y" * 6, 0), ("\tat xx", 0), ("boom", 3), ("\tat xx", 0), ("end", 0)]
    with pytest.raises(ConfigInvalid, match="max_bytes` must be at least 1KiB"):
        convert({"mode": "start", "max_bytes": 1000}, MultilineConfig)


@pytest.mark.parametrize("ship", [True, False])
@pytest.mark.parametrize("after", [{"mode": "start", "max_lines": 2}, None])
def test_the_entry_in_progress_ends_where_reloaded_settings_take_over(after: dict[str, Any] | None,
                                                                      ship: bool) -> None:
    # A SIGHUP gives the file's lines a new pipeline: the entry the old joiner
    # holds is a record, and the new settings (or none) join what follows. The
    # old joiner kept joining before, with entries shipped as read joined again
    # with the new settings; with multiline turned off, its entry was lost.
    tracked = types.SimpleNamespace()
    chunks = chunks_of([_line(0, "start"), _line(1, "error"), _line(2, "frame"), _line(3, "frame"),
                        _line(4, "start"), _line(5, "frame"), _line(6, "frame"), _line(7, "frame"),
                        _line(8, "start")], [4])
    before = pipeline(True, mode="start")
    first = stored(before.process(tracked, chunks[0], "/f.log", 0.0)[0])
    assert first == [] and tracked.joiner.pending_start == chunks[0].base, "lines 0-3: pending"
    if after is None:
        reloaded = SourcePipeline(convert({"path": "x", "source": "app", "format": "plain"}, SourceConfig),
                                  "host-1", Redactor(RedactConfig()), AgentMetrics())
        reloaded.ship_lines = ship
    else:
        reloaded = pipeline(ship, **after)
    items, count, _ = reloaded.process(tracked, chunks[1], "/f.log", 0.0)
    records = stored(items) + reloaded.flush(tracked, "/f.log")
    ended = ("request 0 done", "java.lang.IllegalStateException: state 1\n\tat com.example.Foo.bar2(Foo.java:2)\n"
                               "\tat com.example.Foo.bar3(Foo.java:3)")
    if after is None:  # one record a line from here on
        expected = [ended, ("request 4 done", None), *[(_line(i, "frame"), None) for i in (5, 6, 7)],
                    ("request 8 done", None)]
    else:  # at most 2 lines an entry
        expected = [ended, ("request 4 done", "\tat com.example.Foo.bar5(Foo.java:5)"),
                    (_line(6, "frame"), "\tat com.example.Foo.bar7(Foo.java:7)"), ("request 8 done", None)]
    assert [(r.message, r.error_stack) for r in records] == expected
    assert count >= 1
