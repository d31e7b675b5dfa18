"""Lines shipped as read (agent.wire.Lines) parsed by ``parse_shipped_lines``
give the records the agent's own parser makes from the same lines, numbered by
line, with the agent's read time for lines that carry no timestamp."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import parsers
from agent.config import SourceConfig
from agent.parsers import FIELD_ALIASES, LineParser, parse_shipped_lines
from agent.wire import Lines, Record

HOST = "host-1"
FILE = "/var/log/app.json"
TS = "2026-11-30T10:00:00.123Z"
# read_at is exact in binary, so its ISO form is known without computing it.
READ_AT = 1_700_000_000.25
READ_AT_ISO = "2023-11-14T22:13:20.250Z"
# What ``now`` is while a parser runs in these tests (patched, so "now" is recognisable).
DIRECT_NOW = "NOW-OF-THE-DIRECT-PARSER"
SHIPPED_NOW = "NOW-OF-THE-SHIPPED-PARSER"


def starts_of(lines: Sequence[bytes], offset: int) -> list[int]:
    """The file offset of each line: offset + the lengths (with newline) of the lines before."""
    out, position = [], offset
    for line in lines:
        out.append(position)
        position += len(line) + 1
    return out


def body_of(lines: Sequence[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def direct(lines: Sequence[bytes], *, source: str = "app", tags: Sequence[str] = (),
           fields: dict[str, str] | None = None, offset: int = 0) -> tuple[list[Record], int]:
    """What the agent's own parser makes of the lines (a fresh parser), and its parse errors."""
    cfg = SourceConfig(path="x", source=source, format="json", tags=list(tags), fields=dict(fields or {}))
    parser = LineParser(cfg, HOST)
    with mock.patch.object(parsers, "now_iso", lambda: DIRECT_NOW):
        records = parser.parse_lines(lines, starts_of(lines, offset), FILE, body_of(lines))
    return records, parser.errors


def shipped(lines: Sequence[bytes], *, source: str = "app", tags: Sequence[str] = (),
            fields: dict[str, str] | None = None, offset: int | None = 0, read_at: float = READ_AT,
            data: bytes | None = None) -> tuple[list[tuple[int, Record]], int, int]:
    group = Lines(source=source, data=body_of(lines) if data is None else data, read_at=read_at, format="json",
                  file=FILE, offset=offset, tags=list(tags) or None, fields=fields or None)
    with mock.patch.object(parsers, "now_iso", lambda: SHIPPED_NOW):
        return parse_shipped_lines(group, HOST)


def nonblank(lines: Sequence[bytes]) -> list[int]:
    return [i for i, line in enumerate(lines) if line.strip()]


def assert_same_records(lines: Sequence[bytes], offset: int = 0, **settings_: Any) -> list[tuple[int, Record]]:
    """Shipped and direct records are equal, field by field, except that a line
    without a timestamp gets read_at (shipped) instead of now (direct).
    Returns the shipped pairs."""
    expected, expected_errors = direct(lines, offset=offset, **settings_)
    numbered, count, errors = shipped(lines, offset=offset, **settings_)
    starts = starts_of(lines, offset)
    assert count == len(lines)
    assert errors == expected_errors
    assert [n for n, _ in numbered] == nonblank(lines)
    assert len(expected) == len(numbered)
    for (number, record), want in zip(numbered, expected, strict=True):
        assert record.offset == starts[number], f"line {number}: offset does not map back to the line"
        assert record.timestamp != SHIPPED_NOW, f"line {number}: the shipped path used now, not read_at"
        if want.timestamp == DIRECT_NOW:
            assert record.timestamp == READ_AT_ISO, f"line {number}: no timestamp, so read_at expected"
            record = msgspec.structs.replace(record, timestamp=DIRECT_NOW)
        assert record == want, f"line {number}: {lines[number]!r}"
    return numbered


def obj(**kw: Any) -> bytes:
    return json.dumps(kw).encode()


def line(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- the corpus ------------------------------------------------------------------------------------

Check = Callable[[list[tuple[int, Record]]], None]
ALIAS_VALUES: dict[str, tuple[Any, Any]] = {  # record field -> (value in the line, value in the record)
    "level": ("warning", "WARN"),
    "message": ("hello there", "hello there"),
    "error_stack": ("Traceback: boom", "Traceback: boom"),
    "user_id": ("u-1", "u-1"),
    "session_id": ("s-1", "s-1"),
    "request_id": ("r-1", "r-1"),
    "ip_address": ("10.0.0.1", "10.0.0.1"),
    "user_agent": ("curl/8", "curl/8"),
    "duration_ms": (12.5, 12.5),
}


def _alias_case(field: str) -> tuple[list[bytes], Check]:
    if field == "timestamp":
        lines = [line({alias: TS, "msg": f"via {alias}"}) for alias in FIELD_ALIASES["timestamp"]]

        def check(pairs: list[tuple[int, Record]]) -> None:
            assert [r.timestamp for _, r in pairs] == [TS] * len(lines)
            assert all(r.context is None for _, r in pairs)
        return lines, check
    raw, mapped = ALIAS_VALUES[field]
    # The field's own key is first in its aliases; "ts" would collide with nothing but timestamp.
    lines = [line({"ts": TS, alias: raw}) for alias in FIELD_ALIASES[field]]

    def check_field(pairs: list[tuple[int, Record]]) -> None:
        assert [getattr(r, field) for _, r in pairs] == [mapped] * len(lines)
        assert all(r.context is None and r.timestamp == TS for _, r in pairs)
    return lines, check_field


def _tags(pairs: list[tuple[int, Record]]) -> list[list[str] | None]:
    return [r.tags for _, r in pairs]


def _check_custom_fields(pairs: list[tuple[int, Record]]) -> None:
    [(_, r), (_, other)] = pairs
    assert (r.timestamp, r.level, r.message, r.user_id) == (TS, "ERROR", "custom body", "acct-9")
    assert r.context == {"msg": "the usual key, kept in context"}
    assert other.message == "usual names still work" and other.level == "WARN"


def _check_tags(pairs: list[tuple[int, Record]]) -> None:
    assert _tags(pairs) == [["prod", "eu", "a", "b"], ["prod", "eu"], ["prod", "eu", "bad_timestamp"],
                            ["prod", "eu"], ["prod", "eu", "parse_error"]]
    assert pairs[3][1].context == {"tags": [1, 2]}  # not a list of strings: context


def _check_context_key(pairs: list[tuple[int, Record]]) -> None:
    assert pairs[0][1].context == {"context": {"k": 1}, "other": 2}
    assert pairs[1][1].context == {"context": "just a string"}


def _check_unknown_keys(pairs: list[tuple[int, Record]]) -> None:
    assert pairs[0][1].context == {"a": 1, "b": "two", "c": None, "d": [1, 2]}
    assert pairs[0][1].message == "m"


def _check_epoch(pairs: list[tuple[int, Record]]) -> None:
    assert [r.timestamp for _, r in pairs] == [1764590400, 1764590400123, 1764590400.5]
    assert all(r.tags is None for _, r in pairs)


def _check_bad_timestamps(pairs: list[tuple[int, Record]]) -> None:
    assert all(r.tags == ["bad_timestamp"] for _, r in pairs)
    assert [r.context for _, r in pairs] == [{"timestamp_raw": "yesterday"},
                                             {"timestamp_raw": "3000-01-01T00:00:00Z"},
                                             {"timestamp_raw": True}, {"timestamp_raw": "", "x": 1}]


LEVELS_IN = ["WARN", "Warning", "eRRor", "FATAL", "trace", "notice", "5", "3", 4, "loud", "", "Crit", "EMERG"]
LEVELS_OUT = ["WARN", "WARN", "ERROR", "CRITICAL", "DEBUG", "INFO", "INFO", "ERROR", "WARN", "INFO", "INFO",
              "CRITICAL", "CRITICAL"]


def _check_levels(pairs: list[tuple[int, Record]]) -> None:
    assert [r.level for _, r in pairs] == LEVELS_OUT


NON_OBJECTS = [b"[1,2]", b'"str"', b"42", b"null", b"true"]


def _check_non_objects(pairs: list[tuple[int, Record]]) -> None:
    assert [(r.message, r.tags) for _, r in pairs] == [(t.decode(), ["parse_error"]) for t in NON_OBJECTS]


def _check_invalid_json(pairs: list[tuple[int, Record]]) -> None:
    messages = {n: (r.message, r.tags, r.level) for n, r in pairs}
    assert messages[0] == ('{"msg": "unterminated', ["parse_error"], "INFO")
    assert messages[1] == ("not json {", ["parse_error"], "INFO")
    assert messages[3] == ("boom", ["parse_error"], "ERROR")  # a plain line: its timestamp and level kept
    assert pairs[3][1].timestamp == "2026-11-30T10:00:00Z"
    assert messages[4][0] == "valid"


def _check_utf8(pairs: list[tuple[int, Record]]) -> None:
    assert "\ufffd" in pairs[0][1].message
    assert pairs[1][1].tags == ["parse_error"] and "\ufffd" in pairs[1][1].message
    assert pairs[2][1].message == "fine"


def _check_crlf(pairs: list[tuple[int, Record]]) -> None:
    assert [(r.message, r.tags) for _, r in pairs] == [("crlf", None), ("not json", ["parse_error"])]


def _check_blank(pairs: list[tuple[int, Record]]) -> None:
    assert [(n, r.message) for n, r in pairs] == [(0, "first"), (4, "after blanks"), (6, "last")]


def _check_long(pairs: list[tuple[int, Record]]) -> None:
    for _, r in pairs:
        assert r.tags == ["truncated"]
        assert len(r.message.encode()) <= 10_000 and "truncated" in r.message


def _check_nested(pairs: list[tuple[int, Record]]) -> None:
    assert pairs[0][1].context == {"ctx": {"a": {"b": {"c": [1, {"d": "e"}]}}}, "list": [[1], [2]]}


def _check_mixed(pairs: list[tuple[int, Record]]) -> None:
    assert [r.message for _, r in pairs] == ["one", "two", "three", "", "five"]
    assert [r.level for _, r in pairs] == ["INFO", "ERROR", "DEBUG", "WARN", "INFO"]
    assert pairs[2][1].user_id == "u3" and pairs[3][1].context == {"only": "context"}


def _check_coerced(pairs: list[tuple[int, Record]]) -> None:
    r = pairs[0][1]
    assert (r.message, r.user_id, r.duration_ms, r.request_id, r.error_stack) == (
        '{"a":1}', "42", 12.0, '["r"]', "frame 1\nframe 2")
    assert pairs[1][1].duration_ms is None and pairs[1][1].context == {"duration_ms_raw": "slow"}


def _check_big_context(pairs: list[tuple[int, Record]]) -> None:
    r = pairs[0][1]
    assert r.tags == ["truncated"] and r.context is not None and r.context["truncated"] is True


CORPUS: list[Any] = [
    *[pytest.param(*_alias_case(field), {}, set(), id=f"aliases-{field}") for field in FIELD_ALIASES],
    pytest.param([obj(when=TS, sev="error", body="custom body", account="acct-9",
                      msg="the usual key, kept in context"),
                  obj(ts=TS, level="warn", msg="usual names still work")],
                 _check_custom_fields,
                 {"fields": {"timestamp": "when", "level": "sev", "message": "body", "user_id": "account"}},
                 set(), id="custom-fields"),
    pytest.param([obj(ts=TS, msg="line tags", tags=["a", "b"]), obj(ts=TS, msg="no line tags"),
                  obj(ts="never", msg="bad ts"), obj(ts=TS, msg="odd tags", tags=[1, 2]), b"not json"],
                 _check_tags, {"tags": ["prod", "eu"]}, {2, 4}, id="static-and-line-tags"),
    pytest.param([obj(ts=TS, msg="c", context={"k": 1}, other=2), obj(ts=TS, context="just a string")],
                 _check_context_key, {}, set(), id="context-key"),
    pytest.param([obj(ts=TS, msg="m", a=1, b="two", c=None, d=[1, 2])], _check_unknown_keys, {}, set(),
                 id="unknown-keys-to-context"),
    pytest.param([obj(ts=1764590400, msg="s"), obj(ts=1764590400123, msg="ms"), obj(time=1764590400.5, msg="f")],
                 _check_epoch, {}, set(), id="epoch-timestamps"),
    pytest.param([obj(ts="yesterday", msg="a"), obj(ts="3000-01-01T00:00:00Z", msg="b"), obj(ts=True, msg="c"),
                  obj(timestamp="", msg="d", x=1)],
                 _check_bad_timestamps, {}, {0, 1, 2, 3}, id="bad-timestamps"),
    pytest.param([obj(ts=TS, level=v, msg="lvl") for v in LEVELS_IN], _check_levels, {}, set(), id="levels"),
    pytest.param(NON_OBJECTS, _check_non_objects, {}, {0, 1, 2, 3, 4}, id="non-object-json"),
    pytest.param([b'{"msg": "unterminated', b"not json {", b'{"a": 1,}', b"2026-11-30T10:00:00Z ERROR boom",
                  obj(ts=TS, msg="valid")],
                 _check_invalid_json, {}, {0, 1, 2}, id="invalid-json"),
    pytest.param([b'{"ts": "' + TS.encode() + b'", "msg": "caf\xe9"}', b"\xff\xfe garbage", obj(ts=TS, msg="fine")],
                 _check_utf8, {}, {1}, id="invalid-utf8"),
    pytest.param([obj(ts=TS, msg="crlf") + b"\r", b"not json\r"], _check_crlf, {}, {1}, id="crlf"),
    pytest.param([obj(ts=TS, msg="first"), b"", b"   ", b"\t", obj(msg="after blanks"), b"", obj(ts=TS, msg="last")],
                 _check_blank, {}, {4}, id="blank-and-whitespace-lines"),
    pytest.param([obj(ts=TS, msg="x" * 12_000), obj(msg="\u00e9" * 6_000)], _check_long, {}, {1},
                 id="message-over-10000-bytes"),
    pytest.param([obj(ts=TS, msg="n", ctx={"a": {"b": {"c": [1, {"d": "e"}]}}}, list=[[1], [2]])],
                 _check_nested, {}, set(), id="nested-context"),
    pytest.param([obj(ts=TS, msg="one"), obj(time=TS, lvl="err", message="two"),
                  obj(msg="three", severity="debug", uid="u3"), obj(ts=TS, level="warn", only="context"),
                  obj(**{"@timestamp": TS, "@message": "five"})],
                 _check_mixed, {}, {2}, id="mixed-key-sets"),
    pytest.param([obj(ts=TS, msg={"a": 1}, user_id=42, duration_ms="12", request_id=["r"],
                      stack=["frame 1", "frame 2"]), obj(ts=TS, msg="d", took_ms="slow")],
                 _check_coerced, {}, set(), id="values-of-other-types"),
    pytest.param([line({"ts": TS, **{f"k{i}": "v" * 1000 for i in range(70)}})], _check_big_context, {}, set(),
                 id="context-over-50kb"),
]


@pytest.mark.parametrize(("lines", "check", "settings_", "no_timestamp"), CORPUS)
def test_shipped_lines_make_the_records_the_agent_parser_makes(lines: list[bytes], check: Check,
                                                             settings_: dict[str, Any],
                                                             no_timestamp: set[int]) -> None:
    pairs = assert_same_records(lines, offset=4096, **settings_)
    assert {n for n, r in pairs if r.timestamp == READ_AT_ISO} == no_timestamp
    assert all(r.source == "app" and r.host == HOST and r.file == FILE for _, r in pairs)
    check(pairs)


def test_a_chunk_of_one_key_set_goes_the_typed_way_and_still_matches() -> None:
    """Lines of one key set teach the cached parser a typed decoder; the next
    groups are decoded with it and must still match (read_at included)."""
    source = "typed-source"
    same = [obj(level="info", msg=f"m{i}", user_id=f"u{i}") for i in range(6)]
    for _ in range(3):  # the first call learns, the next ones use the typed decoder
        assert_same_records(same, source=source)
    [parser] = [p for key, p in parsers._SHIPPED_PARSERS.items() if key[0] == source]
    assert parser._typed is not None, "the typed path was not exercised"
    with_ts = [obj(ts=TS, level="info", msg=f"m{i}", user_id=f"u{i}") for i in range(6)]
    assert_same_records(with_ts, source=source)
    assert_same_records([*same[:3], b"", obj(ts="bad", level="info", msg="x", user_id="u")], source=source)


def test_data_without_a_final_newline_parses_like_data_with_one() -> None:
    lines = [obj(ts=TS, msg="a"), b"", obj(msg="b")]
    with_newline = shipped(lines)
    without = shipped(lines, data=body_of(lines)[:-1])
    assert with_newline == without
    assert [n for n, _ in without[0]] == [0, 2] and without[1] == 3


def test_a_group_without_an_offset_gives_records_without_an_offset() -> None:
    lines = [obj(ts=TS, msg="a"), b"", b"  ", obj(msg="b"), b"not json"]
    numbered, count, errors = shipped(lines, offset=None)
    assert count == 5 and errors == 1
    assert [n for n, _ in numbered] == [0, 3, 4]
    assert [r.offset for _, r in numbered] == [None, None, None]
    assert [r.message for _, r in numbered] == ["a", "b", "not json"]
    assert numbered[1][1].timestamp == READ_AT_ISO


def test_an_empty_group_has_no_lines() -> None:
    assert shipped([], data=b"") == ([], 0, 0)


@pytest.mark.parametrize("read_at", [0, -5, 1.7e12])
def test_a_read_at_that_is_not_unix_seconds_falls_back_to_now(read_at: float) -> None:
    numbered, _, _ = shipped([obj(msg="no ts")], read_at=read_at)
    assert numbered[0][1].timestamp == SHIPPED_NOW


def test_read_at_does_not_leak_between_groups_of_one_cached_parser() -> None:
    source = "leak-check"
    lines = [obj(level="info", msg="no ts"), obj(level="info", msg="no ts either")]
    first, _, _ = shipped(lines, source=source, read_at=READ_AT)
    second, _, _ = shipped(lines, source=source, read_at=READ_AT + 3600)
    assert {r.timestamp for _, r in first} == {READ_AT_ISO}
    assert {r.timestamp for _, r in second} == {"2023-11-14T23:13:20.250Z"}
    [parser] = [p for key, p in parsers._SHIPPED_PARSERS.items() if key[0] == source]
    assert parser.fixed_now is None
    # The cached parser, used directly afterwards, gives now again, not a stale read_at.
    with mock.patch.object(parsers, "now_iso", lambda: DIRECT_NOW):
        again = parser.parse_lines(lines, starts_of(lines, 0), FILE, body_of(lines))
    assert {r.timestamp for r in again} == {DIRECT_NOW}


def test_fixed_now_is_reset_when_parsing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    source = "raises"
    seen: list[tuple[LineParser, str | None]] = []

    def boom(self: LineParser, *args: Any, **kwargs: Any) -> list[Record]:
        seen.append((self, self.fixed_now))
        raise RuntimeError("parser failure")

    with monkeypatch.context() as patch:
        patch.setattr(LineParser, "parse_lines", boom)
        with pytest.raises(RuntimeError, match="parser failure"):
            shipped([obj(msg="x")], source=source)
    [(parser, during)] = seen
    assert during == READ_AT_ISO  # it was set for the call...
    assert parser.fixed_now is None  # ...and reset although the call raised
    numbered, _, _ = shipped([obj(msg="y")], source=source, read_at=READ_AT + 60)
    assert numbered[0][1].timestamp == "2023-11-14T22:14:20.250Z"


def test_a_line_that_is_not_json_on_its_own_is_a_parse_error() -> None:
    lines = [b'{"msg": "a", "x": [1', b"2]}", b"3,4"]
    numbered, _, errors = shipped(lines)
    first = numbered[0][1]
    assert first.tags == ["parse_error"] and first.message == lines[0].decode()
    assert errors == 3


@pytest.mark.parametrize("key", ['say "hi"', "C:\\temp", "tab\there"])
def test_a_key_with_a_quote_backslash_or_control_character_is_parsed(key: str) -> None:
    lines = [line({"ts": TS, "msg": "odd key", key: 1})]
    numbered, _, errors = shipped(lines, source="odd-keys")
    assert errors == 0
    assert numbered[0][1].context == {key: 1}


# --- property: any JSON lines --------------------------------------------------------------------

ALIAS_KEYS = sorted({k for names in FIELD_ALIASES.values() for k in names} | {"tags", "context"})
TIMESTAMPS = [TS, "2026-11-30 10:00:00.5+02:00", "2020-01-01", "2026-11-30T10:00:00", 1764590400, 1764590400123,
              1764590400.25, "yesterday", "3000-01-01T00:00:00Z", "", "0001-01-01T00:00:00Z", -1]
LEVEL_VALUES = ["warn", "ERROR", "Info", "debug", "5", 3, 9, "loud", "CRIT"]
_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
# Any key: quotes, backslashes and control characters included (they keep a line off the typed path).
_key_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | _text | st.sampled_from(TIMESTAMPS) | st.sampled_from(LEVEL_VALUES))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                      max_leaves=8)
keys = st.sampled_from(ALIAS_KEYS) | _key_text
objects = st.dictionaries(keys, values, max_size=6)


@st.composite
def json_lines(draw: st.DrawFn) -> list[bytes]:
    out = []
    for value in draw(st.lists(objects | st.sampled_from([None, "", "  ", "not json", "[1,2]"]), max_size=12)):
        if isinstance(value, dict):
            out.append(json.dumps(value, ensure_ascii=draw(st.booleans())).encode())
        elif value is None:  # the previous line again: runs of one key set
            out.append(out[-1] if out else b"{}")
        else:
            out.append(value.encode())
    return out


SETTINGS = [({}, ()), ({"message": "body", "user_id": "account"}, ("prod",)), ({"timestamp": "when"}, ("a", "b"))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=json_lines(), setting=st.sampled_from(SETTINGS), offset=st.integers(0, 10**12))
def test_property_shipped_lines_equal_the_agent_records(lines: list[bytes], setting: tuple[dict[str, str], Any],
                                                        offset: int) -> None:
    fields, tags = setting
    assert_same_records(lines, offset=offset, fields=fields, tags=tags, source="property")



# --- syslog ---------------------------------------------------------------------

# 2027-01-01T00:30:00Z: in UTC+05:30 (the agent's zone below) it is 06:00 on New Year's Day.
NEW_YEAR = 1_798_763_400.0
IST = 5 * 3600 + 1800


def syslog_group(lines: Sequence[bytes], utc_offset: int | None, read_at: float = NEW_YEAR) -> Lines:
    return Lines(source="sys", data=body_of(lines), read_at=read_at, format="syslog", file=FILE, offset=0,
                 utc_offset=utc_offset)


def test_syslog_lines_are_read_in_the_agents_zone_and_year() -> None:
    # RFC 3164 stamps have neither year nor zone: the agent that read them
    # would have taken its own zone and the year that does not put them in
    # the future; the collector, in another zone, must do the same.
    lines = [b"<34>Dec 31 23:59:00 web su[12]: last of the year",
             b"<34>Jan  1 05:59:59 web su[12]: first of the year",
             b"<165>1 2026-12-31T10:00:00.5+01:00 web app 7 ID47 [ex@1 k=\"v\"] five four two four",
             b"not syslog at all"]
    numbered, count, errors = parse_shipped_lines(syslog_group(lines, IST), HOST)
    assert (count, errors) == (4, 1)
    records = [r for _, r in numbered]
    assert [r.timestamp for r in records[:3]] == [
        "2026-12-31T23:59:00+05:30", "2027-01-01T05:59:59+05:30", "2026-12-31T10:00:00.5+01:00"]
    assert records[3].tags == ["parse_error"] and records[3].timestamp == "2027-01-01T00:30:00.000Z"
    # The same as the agent's parser at that moment, in that zone.
    cfg = SourceConfig(path="x", source="sys", format="syslog")
    direct_parser = LineParser(cfg, HOST)
    direct_parser.fixed_local_now = dt.datetime.fromtimestamp(NEW_YEAR, dt.timezone(dt.timedelta(seconds=IST)))
    direct_parser.fixed_now = "2027-01-01T00:30:00.000Z"
    assert direct_parser.parse_lines(lines, starts_of(lines, 0), FILE) == records
    # In UTC the first line would be read as this year's, hours ahead of its real time.
    in_utc = [r for _, r in parse_shipped_lines(syslog_group(lines[:1], 0), HOST)[0]]
    assert in_utc[0].timestamp == "2026-12-31T23:59:00+00:00"


@pytest.mark.parametrize("offset", [None, 18 * 3600 + 1, -(18 * 3600 + 1)])
def test_syslog_lines_without_a_sane_utc_offset_are_refused_by_name(offset: int | None) -> None:
    with pytest.raises(ValueError, match=r"^lines\.utc_offset: .* at most 64800 \(18 h\) either way; got"):
        parse_shipped_lines(syslog_group([b"<34>Dec 31 23:59:00 web su: x"], offset), HOST)


def test_the_local_time_of_one_syslog_group_does_not_leak_into_the_next() -> None:
    line = [b"<34>Jun  1 12:00:00 web su: x"]
    parsers._SHIPPED_PARSERS.clear()  # other tests in this process cached syslog parsers of their own
    parse_shipped_lines(syslog_group(line, IST), HOST)
    [parser] = [p for key, p in parsers._SHIPPED_PARSERS.items() if key[0] == "sys"]
    assert parser.fixed_local_now is None and parser.fixed_now is None
    later = [r for _, r in parse_shipped_lines(syslog_group(line, -5 * 3600), HOST)[0]]
    assert later[0].timestamp == "2026-06-01T12:00:00-05:00"


# --- regex --------------------------------------------------------------------

REGEX = (r"(?P<timestamp>\S+) (?P<level>[A-Z]+) (?P<message>.*?)(?: took (?P<duration_ms>[\d.]+)ms)?"
         r"(?: (?P<shard>s\d+))?$")


def regex_group(lines: Sequence[bytes], pattern: str | None = REGEX, source: str = "re") -> Lines:
    return Lines(source=source, data=body_of(lines), read_at=READ_AT, format="regex", file=FILE, offset=0,
                 pattern=pattern, fields={"request_id": "shard"})


def test_regex_lines_are_parsed_with_the_pattern_they_carry() -> None:
    lines = [b"2026-11-30T10:00:00Z WARN slow query took 12.5ms s3",
             b"2026-11-30T10:00:01Z INFO caf\xc3\xa9 ready", b"nothing like it"]
    numbered, count, errors = parse_shipped_lines(regex_group(lines), HOST)
    assert (count, errors) == (3, 1)
    cfg = SourceConfig(path="x", source="re", format="regex", pattern=REGEX, fields={"request_id": "shard"})
    direct_parser = LineParser(cfg, HOST)
    direct_parser.fixed_now = READ_AT_ISO
    assert [r for _, r in numbered] == direct_parser.parse_lines(lines, starts_of(lines, 0), FILE)
    slow = numbered[0][1]
    assert (slow.level, slow.message, slow.duration_ms, slow.request_id) == ("WARN", "slow query", 12.5, "s3")
    assert numbered[1][1].message == "café ready" and numbered[2][1].tags == ["parse_error"]


@pytest.mark.parametrize(("pattern", "error"), [
    (None, "lines.pattern: regex lines need their source's pattern, 1 to 4096 characters"),
    ("x" * 4097, "lines.pattern: regex lines need their source's pattern, 1 to 4096 characters"),
    ("(?P<message>.*", "lines.pattern is not a valid RE2 regular expression: "),
    ("(?<=x)(?P<message>.*)", "lines.pattern is not a valid RE2 regular expression: ")])
def test_a_regex_group_without_a_usable_pattern_is_refused_by_name(pattern: str | None, error: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_shipped_lines(regex_group([b"2026-11-30T10:00:00Z INFO x"], pattern, source="bad-pattern"), HOST)
    assert str(info.value).startswith(error)


def test_only_regex_lines_carry_a_pattern() -> None:
    group = Lines(source="app", data=b"{}\n", read_at=READ_AT, pattern="(?P<message>.*)")
    with pytest.raises(ValueError, match=r"^lines\.pattern: only regex lines carry a pattern$"):
        parse_shipped_lines(group, HOST)


def test_cached_regex_parsers_are_bounded() -> None:
    for i in range(3 * parsers._MAX_REGEX_PARSERS):
        parse_shipped_lines(regex_group([b"2026-11-30T10:00:00Z INFO x"], REGEX + f"(?P<g{i}>)?"), HOST)
    assert sum(1 for key in parsers._SHIPPED_PARSERS if key[-1] is not None) <= parsers._MAX_REGEX_PARSERS
