"""Every format, level normalisation, unparseable lines, multiline entries."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import msgspec
import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import MultilineConfig, SourceConfig
from agent.multiline import MultilineJoiner
from agent.parsers import _COMBINED, _SD_ELEMENT, _SYSLOG_5424, LineParser, normalise_level, parse_syslog


def parser(fmt: str = "json", **kw: Any) -> LineParser:
    return LineParser(SourceConfig(path="/x/*.log", source="api", format=fmt, tags=["prod"], **kw), "host-1")


def one(p: LineParser, line: str) -> Any:
    records = p.parse_lines([line.encode()], [100], "/x/a.log")
    assert len(records) == 1
    return records[0]


def test_json_maps_common_field_names_and_keeps_the_rest_in_context() -> None:
    r = one(parser(), '{"@timestamp":"2026-11-25T04:00:00.123Z","severity":"warning","msg":"slow",'
                      '"request_id":"r1","user_id":42,"duration_ms":12,"ip":"10.0.0.1","extra":{"a":[1]}}')
    assert (r.timestamp, r.level, r.message, r.source) == ("2026-11-25T04:00:00.123Z", "WARN", "slow", "api")
    assert (r.request_id, r.user_id, r.duration_ms, r.ip_address) == ("r1", "42", 12, "10.0.0.1")
    assert r.context == {"extra": {"a": [1]}}
    assert (r.host, r.file, r.offset, r.tags) == ("host-1", "/x/a.log", 100, ["prod"])


def test_json_lines_of_a_chunk_are_parsed_together_with_their_offsets() -> None:
    p = parser()
    lines = [b'{"ts":"2026-11-25T04:00:00Z","level":"info","msg":"a"}', b"",
             b'{"ts":"2026-11-25T04:00:01Z","lvl":"ERR","message":"b","tags":["x"]}', b"not json {"]
    records = p.parse_lines(lines, [0, 50, 51, 120], "/x/a.log")
    assert [(r.message, r.level, r.offset) for r in records] == [
        ("a", "INFO", 0), ("b", "ERROR", 51), ("not json {", "INFO", 120)]
    assert records[1].tags == ["prod", "x"]
    assert records[2].tags == ["prod", "parse_error"]


def test_typed_chunk_path_gives_the_same_records_as_the_general_path() -> None:
    good = '{"ts":"2026-11-25T04:00:%02d.5Z","level":"info","msg":"m%d","user_id":"u","duration_ms":%s,"k":[%d]}'
    chunk = [(good % (i, i, "1.5" if i % 2 else "2", i)).encode() for i in range(40)]
    odd = [
        b'{"ts":"2026-02-30T00:00:00Z","level":"info","msg":"bad day","user_id":"u","duration_ms":1,"k":1}',
        b'{"ts":"2026-11-25T04:00:00Z","level":"loud","msg":"odd level","user_id":"u","duration_ms":1,"k":1}',
        b'{"ts":"2026-11-25T04:00:00Z","level":"info","msg":"no user","duration_ms":1,"k":1}',
        b'{"ts":"2026-11-25T04:00:00Z","level":"info","msg":"int user","user_id":7,"duration_ms":1,"k":1}',
        b'{"ts":"2026-11-25T04:00:00Z","level":"info","msg":"more","user_id":"u","duration_ms":1,"k":1,"z":2}',
        b'{"ts":"2026-11-25T04:00:00Z","level":"info","msg":"bool","user_id":"u","duration_ms":true,"k":1}',
        b"",
    ]
    typed, general = parser(), parser()
    general._typed_wait = 10**9  # never learns the typed decoder
    for p in (typed, general):
        p.parse_lines(chunk, list(range(0, 4000, 100)), "/x/a.log")  # learns the key set
    assert typed._typed is not None and general._typed is None
    for line in [chunk[0], *odd]:
        lines = [*chunk[:5], line, *chunk[5:10]]
        starts = list(range(0, 1100, 100))
        body = b"\n".join(lines) + b"\n"
        got = typed.parse_lines(lines, starts, "/x/a.log", body)
        want = general.parse_lines(lines, starts, "/x/a.log")
        for a, b in zip(got, want, strict=True):
            if "bad_timestamp" not in (a.tags or []) and a.timestamp is not None:
                assert a == b
            else:
                assert (a.message, a.context, a.tags) == (b.message, b.context, b.tags)
        typed._typed = typed._typed_for(tuple(msgspec.json.decode(chunk[0])))  # learn again at once
    r = typed.parse_lines(chunk[:2], [0, 100], "/x/a.log")
    assert (r[0].duration_ms, type(r[0].duration_ms), r[1].duration_ms) == (2, int, 1.5)
    assert (r[0].context, r[0].user_id, r[0].level, r[0].tags) == ({"k": [0]}, "u", "INFO", ["prod"])


def test_json_field_of_unexpected_type_or_bad_timestamp_is_coerced_not_lost() -> None:
    p = parser()
    r = one(p, '{"ts":"yesterday","level":{"x":1},"msg":{"k":"v"},"session_id":7,"duration_ms":"1.5"}')
    assert r.message == '{"k":"v"}' and r.level == "INFO" and r.session_id == "7" and r.duration_ms == 1.5
    assert r.context == {"timestamp_raw": "yesterday"} and "bad_timestamp" in r.tags
    r = one(p, '{"time":1764043200.5,"msg":"epoch"}')
    assert r.timestamp == 1764043200.5
    r = one(p, '["an", "array"]')
    assert "parse_error" in r.tags and r.message == '["an", "array"]'


def test_custom_field_names_take_precedence() -> None:
    p = parser(fields={"message": "text_body", "level": "sev"})
    r = one(p, '{"text_body":"hi","sev":"crit","msg":"other"}')
    assert (r.message, r.level, r.context) == ("hi", "CRITICAL", {"msg": "other"})


def test_oversized_message_is_cut_with_a_marker() -> None:
    r = one(parser(), '{"msg":"' + "x" * 20000 + '"}')
    assert len(r.message.encode()) <= 10_000 and "truncated" in r.message and "truncated" in r.tags


def test_levels_are_normalised() -> None:
    assert [normalise_level(v) for v in ("warning", "err", "fatal", "panic", "Trace", "notice", "bogus", 3)] == [
        "WARN", "ERROR", "CRITICAL", "CRITICAL", "DEBUG", "INFO", "INFO", "ERROR"]


def test_logfmt() -> None:
    r = one(parser("logfmt"), 'time=2026-11-25T04:00:00Z level=error msg="db down" user_id=u1 retry=3 dry')
    assert (r.level, r.message, r.user_id) == ("ERROR", "db down", "u1")
    assert r.context == {"retry": "3", "dry": True}
    assert "parse_error" in one(parser("logfmt"), "just words").tags


def test_regex_named_groups() -> None:
    p = parser("regex",
               pattern=r"^(?P<timestamp>\S+) \[(?P<level>\w+)\] (?P<message>.*?)(?: rid=(?P<request_id>\S+))?$")
    r = one(p, "2026-11-25T04:00:00Z [fatal] boom rid=abc")
    assert (r.level, r.message, r.request_id) == ("CRITICAL", "boom", "abc")
    assert "parse_error" in one(p, "no match").tags


def test_plain_recognises_leading_timestamp_and_level() -> None:
    r = one(parser("plain"), "2026-11-25 04:00:00,123 ERROR worker: crashed")
    assert (r.timestamp, r.level, r.message) == ("2026-11-25T04:00:00.123", "ERROR", "worker: crashed")
    r = one(parser("plain"), "just a line")
    assert (r.level, r.message) == ("INFO", "just a line") and r.tags == ["prod"]


def test_syslog_rfc5424() -> None:
    r = one(parser("syslog"), '<165>1 2003-10-11T22:14:15.003Z mymachine evntslog - ID47 '
                              '[exampleSDID@32473 iut="3" eventSource="Application"] An application event')
    assert (r.timestamp, r.level, r.message) == ("2003-10-11T22:14:15.003Z", "INFO", "An application event")
    assert r.context["appname"] == "evntslog" and r.context["structured_data"]["exampleSDID@32473"]["iut"] == "3"


def test_syslog_rfc3164_with_and_without_pri() -> None:
    now = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    fields = parse_syslog("<34>Dec 31 22:14:15 mymachine su[123]: 'su root' failed", now)
    assert fields is not None
    assert fields["level"] == "CRITICAL" and fields["timestamp"].startswith("2025-12-31T22:14:15")
    assert fields["context"]["procid"] == "123" and fields["message"] == "'su root' failed"
    r = one(parser("syslog"), "Nov 25 04:00:00 web1 sshd[99]: Accepted publickey")
    assert r.context["appname"] == "sshd" and r.message == "Accepted publickey"


def test_combined_access_log_fills_ip_user_agent_and_duration() -> None:
    line = ('203.0.113.9 - alice [25/Nov/2026:04:00:00 +0100] "GET /api/x?y=1 HTTP/1.1" 503 512 '
            '"https://ref/" "Mozilla/5.0 (X11)" 0.250')
    r = one(parser("nginx"), line)
    assert (r.ip_address, r.user_agent, r.duration_ms, r.level) == ("203.0.113.9", "Mozilla/5.0 (X11)", 250.0,
                                                                   "ERROR")
    assert r.timestamp == "2026-11-25T04:00:00+01:00" and r.context["path"] == "/api/x?y=1"
    r = one(parser("apache"), '::1 - - [25/Nov/2026:04:00:00 +0000] "POST /f HTTP/1.0" 404 - "-" "curl" 1500')
    assert (r.duration_ms, r.level) == (1.5, "WARN")


def test_combined_quoted_fields_keep_escaped_quotes_and_a_bad_time_is_a_parse_error() -> None:
    line = ('10.0.0.1 - - [01/Dec/2026:23:59:59 -0500] "GET /q?s=\\"x\\" HTTP/1.1" 200 5 '
            '"-" "bot \\"quoted\\" 1.0"')
    r = one(parser("nginx"), line)
    assert r.context["path"] == '/q?s=\\"x\\"' and r.user_agent == 'bot \\"quoted\\" 1.0'
    assert r.timestamp == "2026-12-01T23:59:59-05:00"
    bad = one(parser("nginx"), line.replace("01/Dec/2026", "31/Feb/2026"))
    assert bad.tags is not None and "parse_error" in bad.tags


_OLD_COMBINED = re.compile(  # the pattern before its quoted fields were unrolled
    r'^(?P<ip>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?'
    r'(?P<extra>.*)$'
)


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.sampled_from(['"', '\\', '\\"', "a", " ", "GET /", "200", "-", "\n", "é"]), max_size=12),
       tail=st.sampled_from(["", " 0.25", ' "-" "curl"', ' "x\\"" "y" 12']))
def test_combined_pattern_matches_as_before(parts: list[str], tail: str) -> None:
    quoted = "".join(parts)
    line = f'1.2.3.4 - - [01/Dec/2026:00:00:00 +0000] "{quoted}" 200 5{tail}'
    old, new = _OLD_COMBINED.match(line), _COMBINED.match(line)
    assert (old.groupdict() if old else None) == (new.groupdict() if new else None)


# The syslog patterns before their bracketed and quoted parts were unrolled, and the unescaping then.
_OLD_SYSLOG_5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    r"(?P<sd>-|(?:\[(?:[^\]\\]|\\.)*\])+)(?: (?P<msg>.*))?$",
    re.DOTALL,
)
_OLD_SD_ELEMENT = re.compile(r"\[(\S+?)((?: \S+?=\"(?:[^\"\\]|\\.)*\")*)\]")
_OLD_SD_PARAM = re.compile(r" (\S+?)=\"((?:[^\"\\]|\\.)*)\"")


@settings(max_examples=500, deadline=None)
@given(parts=st.lists(st.sampled_from(["[", "]", '"', "\\", '\\"', "\\]", "\\\\", "a", " ", "=", "x@1", ' k="v"',
                                       ' n="4111\\ 1"', "-", "é", "\n"]), max_size=14),
       msg=st.sampled_from(["", " hello", " \ufeffbom", " a\nb"]))
def test_syslog_patterns_and_structured_data_read_as_before(parts: list[str], msg: str) -> None:
    line = f"<165>1 2026-12-01T00:00:00Z web app 7 ID47 {''.join(parts)}{msg}"
    old, new = _OLD_SYSLOG_5424.match(line), _SYSLOG_5424.match(line)
    assert (old.groupdict() if old else None) == (new.groupdict() if new else None)
    if old is None:
        return
    sd = old.group("sd")
    assert _OLD_SD_ELEMENT.findall(sd) == _SD_ELEMENT.findall(sd)
    fields = parse_syslog(line)
    assert fields is not None
    if sd == "-":
        assert "structured_data" not in fields["context"]
    else:
        assert fields["context"]["structured_data"] == {
            sd_id: {k: re.sub(r"\\(.)", r"\1", v) for k, v in _OLD_SD_PARAM.findall(params)}
            for sd_id, params in _OLD_SD_ELEMENT.findall(sd)}


def test_syslog_levels_facilities_and_severities_from_every_pri() -> None:
    for pri in range(192):
        for text in (str(pri), f"{pri:03d}"):
            fields = parse_syslog(f"<{text}>1 - web app - - - hi")
            assert fields is not None
            assert fields["context"] == {"facility": pri >> 3, "severity": pri & 7, "hostname": "web",
                                         "appname": "app"}
            assert fields["level"] == ["CRITICAL", "CRITICAL", "CRITICAL", "ERROR", "WARN", "INFO", "INFO",
                                       "DEBUG"][pri & 7]


_REGEX_PATTERNS = [r"(?P<level>[A-Z]+) (?P<message>.*)", r"(?:(?P<a>é+)|(?P<b>\d+))(?P<rest>.*?)(?P<end>x)?$",
                   r"(?P<z>)", r"(?P<user>\w+)@(?P<host>[^ ]+)", r"no groups \d"]


@settings(max_examples=400, deadline=None)
@given(pattern=st.sampled_from(_REGEX_PATTERNS),
       text=st.text(alphabet=st.sampled_from(list("aAZé€ 1@x.\t😀")), max_size=24))
def test_regex_groups_are_read_as_the_re2_binding_reads_them(pattern: str, text: str) -> None:
    # The parser calls RE2's Match on UTF-8 bytes; the binding's search and
    # groupdict are the reference (offsets in characters, unmatched groups left out).
    p = parser("regex", pattern=pattern)
    m = re2.compile(pattern).search(text)
    expected = None if m is None else {k: v for k, v in m.groupdict().items() if v is not None}
    got = p._parse_regex(text)
    assert got == expected
    assert got is None or list(got) == list(expected)  # same key order: context keys keep it


def test_python_traceback_becomes_one_record_with_error_stack() -> None:
    p = parser("plain", multiline=MultilineConfig())
    joiner = MultilineJoiner(MultilineConfig())
    lines = ["2026-11-25 04:00:00 ERROR request failed", "Traceback (most recent call last):",
             '  File "app.py", line 3, in <module>', "    main()", "ValueError: bad", "",
             "During handling of the above exception, another exception occurred:", "",
             "Traceback (most recent call last):", '  File "x.py", line 1', "KeyError: 'k'",
             "2026-11-25 04:00:01 INFO next"]
    entries = []
    offset = 0
    for line in lines:
        entries += joiner.feed(line, offset, offset + len(line) + 1, 0.0)
        offset += len(line) + 1
    assert len(entries) == 1 and joiner.pending_start == offset - len(lines[-1]) - 1
    first, rest, start, _ = entries[0]
    record = p.parse_entry(first, rest, start, "/x")
    assert record.message == "request failed" and record.level == "ERROR"
    assert record.error_stack is not None and record.error_stack.startswith("Traceback")
    assert record.error_stack.endswith("KeyError: 'k'")
    assert joiner.flush()[0][0] == "2026-11-25 04:00:01 INFO next"


def test_java_stack_trace_in_start_mode_and_max_lines() -> None:
    joiner = MultilineJoiner(MultilineConfig(mode="start", pattern=r"^\d{4}-", max_lines=3))
    lines = ["2026-11-25 ERROR x", "java.lang.IllegalStateException: boom", "\tat a.B.c(B.java:1)",
             "\tat a.B.d(B.java:2)", "Caused by: java.io.IOException", "2026-11-25 INFO y"]
    entries = []
    for i, line in enumerate(lines):
        entries += joiner.feed(line, i * 100, i * 100 + 100, 0.0)
    assert [len(e[1]) for e in entries] == [2, 1]  # cut at 3 lines, the rest is an entry of its own
    assert joiner.due(5.0) and not joiner.due(0.5)


@pytest.mark.parametrize("card", ["4111 1111 1111 1111", "4111+1111+1111+1111", "4111%201111%201111%201111",
                                  "4111%2D1111%2D1111%2D1111", "4111%2b1111%2b1111%2b1111"])
def test_a_message_cut_at_its_limit_never_keeps_half_a_card_number(card: str) -> None:
    from agent.config import RedactConfig, SourceConfig
    from agent.parsers import MAX_MESSAGE_BYTES, LineParser
    from agent.redact import Redactor

    parser = LineParser(SourceConfig(path="x", source="app", format="json"), "h")
    redactor = Redactor(RedactConfig())
    for shift in range(0, 60, 1):  # the cut falls before, inside and after the card
        filler = "x" * (MAX_MESSAGE_BYTES - 60 + shift)
        line = json.dumps({"msg": f"{filler} {card} and more text after it {'y' * 200}"}).encode()
        [record] = parser.parse_lines([line], [0], "/f")
        message = redactor.redact_record(record).message
        assert "truncated" in message
        kept = message.split("…[")[0][len(filler):]
        # Whatever of the card survived the cut is either all of it (then redacted) or nothing.
        assert not any(c.isdigit() for c in kept), (shift, kept)
