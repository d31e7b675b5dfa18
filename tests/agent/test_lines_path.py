"""Lines shipped as read: a JSON source's lines that the redaction prefilter
does not hit go to the collector unparsed (agent.wire.Lines), the rest as
redacted records. The records stored must be the ones the records-only path
makes, every line exactly once, also across batch boundaries, dead letters and
a collector that stops parsing lines."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import MultilineConfig, RedactConfig, SourceConfig
from agent.metrics import AgentMetrics
from agent.parsers import JOINED_FORMATS, parse_shipped_lines
from agent.redact import Redactor
from agent.runner import RawRun, SourcePipeline, _split_items, _wire_items
from agent.tailer import Chunk
from agent.wire import Record
from tests.agent.conftest import agent_config, eventually, write_lines
from tests.agent.ingest_stub import json_answer

CARD = "4111 1111 1111 1111"
SENSITIVE = [f"card {CARD}", "ssn 123-45-6789", "mail bob@example.com", "password=hunter2",
             "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc", "uuid 5d9dc9f8-1818-e811-892f-902bd23f0824",
             "order 1234567890123456789", "at 1764550000000"]


def pipeline(ship_lines: bool, fmt: str = "json", **source: Any) -> SourcePipeline:
    cfg = SourceConfig(path="x", source="app", format=fmt, **source)  # type: ignore[arg-type]
    p = SourcePipeline(cfg, "host-1", Redactor(RedactConfig()), AgentMetrics())
    p.ship_lines = ship_lines
    return p


def chunk_of(lines: list[str], base: int = 1000) -> Chunk:
    data = "".join(line + "\n" for line in lines).encode()
    return Chunk.of_body(data + b'{"partial', base, base + len(data))


def expand(items: list[Any]) -> list[Record]:
    """What the collector stores from a pipeline's items: records as they are,
    runs parsed as it parses them (and the records of JOINED_FORMATS redacted,
    as it does with the agent's rules)."""
    records, groups = _wire_items(items)
    out = list(records)
    redactor = Redactor(RedactConfig())
    for group in groups:
        parsed = [r for _, r in parse_shipped_lines(group, "host-1")[0]]
        out.extend(map(redactor.redact_record, parsed) if group.format in JOINED_FORMATS else parsed)
    return out


line_texts = st.lists(
    st.tuples(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=30),
              st.sampled_from(["", *SENSITIVE]), st.booleans()),
    min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line_texts)
def test_lines_path_stores_the_records_of_the_records_path(texts: list[tuple[str, str, bool]]) -> None:
    lines = []
    for i, (noise, secret, in_context) in enumerate(texts):
        obj: dict[str, Any] = {"ts": f"2026-12-01T00:00:{i % 60:02d}.000Z", "level": "info", "msg": f"{noise} {secret}"}
        if in_context:
            obj["context_field"] = secret
            obj["token"] = "abc" if secret else None
        lines.append(json.dumps(obj))
    chunk = chunk_of(lines)
    plain_items, plain_count, plain_end = pipeline(False).process(None, chunk_of(lines), "/f.log", 0.0)
    items, count, end = pipeline(True).process(None, chunk, "/f.log", 0.0)
    assert (count, end) == (plain_count, plain_end) == (len(lines), chunk.end)
    assert sum(i.count if isinstance(i, RawRun) else 1 for i in items) == len(lines)
    by_offset = {r.offset: r for r in expand(items)}
    assert by_offset == {r.offset: r for r in plain_items}  # type: ignore[union-attr]
    stored = json.dumps([msg for r in by_offset.values() for msg in (r.message, r.context)])
    assert CARD not in stored and "123-45-6789" not in stored and "hunter2" not in stored
    assert "bob@example.com" not in stored or "email" not in RedactConfig().rules


def test_a_chunk_without_hits_is_one_run_and_hits_become_redacted_records() -> None:
    lines = [json.dumps({"ts": "2026-12-01T00:00:00Z", "msg": f"line {i}"}) for i in range(10)]
    items, count, _ = pipeline(True).process(None, chunk_of(lines), "/f.log", 0.0)
    assert count == 10 and len(items) == 1 and isinstance(items[0], RawRun) and items[0].count == 10
    lines[3] = json.dumps({"ts": "2026-12-01T00:00:00Z", "msg": f"paid with {CARD}"})
    lines[9] = json.dumps({"ts": "2026-12-01T00:00:00Z", "msg": "x", "password": "p4ss"})
    items, count, _ = pipeline(True).process(None, chunk_of(lines), "/f.log", 0.0)
    kinds = [(type(i).__name__, i.count if isinstance(i, RawRun) else 1) for i in items]
    assert kinds == [("RawRun", 3), ("Record", 1), ("RawRun", 5), ("Record", 1)]
    assert items[1].message == "paid with [REDACTED:credit_card]"  # type: ignore[union-attr]
    assert items[3].context == {"password": "[REDACTED:key]"}  # type: ignore[union-attr]
    # Runs know where they start in the file.
    starts = [1000 + sum(len(x) + 1 for x in lines[:i]) for i in range(10)]
    assert [i.offset for i in items] == [starts[0], starts[3], starts[4], starts[9]]


def test_runs_split_at_a_line_boundary_and_adjacent_runs_join() -> None:
    lines = [json.dumps({"ts": "2026-12-01T00:00:00Z", "msg": f"line {i}"}) for i in range(10)]
    items, _, _ = pipeline(True).process(None, chunk_of(lines), "/f.log", 0.0)
    head, tail, taken = _split_items(items, 4)
    assert taken == 4 and [i.count for i in head] == [4] and [i.count for i in tail] == [6]  # type: ignore[union-attr]
    assert tail[0].offset == 1000 + sum(len(x) + 1 for x in lines[:4])
    _, groups = _wire_items([*head, *tail])
    assert len(groups) == 1 and groups[0].offset == 1000
    assert groups[0].data == "".join(x + "\n" for x in lines).encode()
    _, groups = _wire_items(list(tail))
    assert [r.message for _, r in parse_shipped_lines(groups[0], "h")[0]] == [f"line {i}" for i in range(4, 10)]


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.sampled_from([0, 1, 2, 7, 60, 400]), min_size=2, max_size=80), data=st.data())
def test_a_run_splits_after_exactly_the_lines_asked_for(lengths: list[int], data: st.DataObject) -> None:
    before = data.draw(st.sampled_from([b"", b"earlier line\n"]))
    body = before + b"".join(b"x" * n + b"\n" for n in lengths)
    run = RawRun(None, body + data.draw(st.sampled_from([b"", b'{"partial'])), len(before), len(body),  # type: ignore[arg-type]
                 500, len(lengths), "/f.log", 0.0)
    lines = data.draw(st.integers(1, len(lengths) - 1))
    head, tail = run.split(lines)
    boundary = len(before) + sum(n + 1 for n in lengths[:lines])
    assert (head.lo, head.hi, head.count, head.offset) == (len(before), boundary, lines, 500)
    assert (tail.lo, tail.hi, tail.count, tail.offset) == (boundary, len(body), len(lengths) - lines,
                                                          500 + boundary - len(before))


def test_which_sources_ship_lines() -> None:
    # JSON, logfmt, plain, syslog and regex lines: their records hold only text
    # of the line (syslog: unescaped, so a backslash makes a hit); nginx/apache
    # records join some (the collector redacts those; see SHIPPED_FORMATS).
    assert all(pipeline(True, fmt).can_ship_lines
               for fmt in ("json", "logfmt", "plain", "syslog", "combined", "nginx", "apache"))
    assert pipeline(True, "regex", pattern=r"(?P<message>.*) id=(?P<request_id>\S+) (?P<kind>\w+)").can_ship_lines
    # Not a regex source with a group that key-based redaction replaces whole:
    # the line holds its value but not its name, so the prefilter cannot tell.
    assert not pipeline(True, "regex", pattern=r"(?P<message>.*) (?P<api_key>\S+)").can_ship_lines
    # Unless it is renamed to a record field.
    assert pipeline(True, "regex", pattern=r"(?P<message>.*) (?P<token>\S+)",
                    fields={"user_id": "token"}).can_ship_lines
    # Nor a pattern longer than a collector takes (it would refuse the lines).
    assert not pipeline(True, "regex", pattern="(?P<message>.*)" + "x?" * 2100).can_ship_lines
    # Multiline entries of plain and regex sources go as read (their records'
    # text is the lines'), unless the first line can fill error_stack too.
    continuation = MultilineConfig(mode="continuation")
    assert pipeline(True, "plain", multiline=continuation).can_ship_lines
    assert pipeline(True, "regex", pattern=r"(?P<level>\S+) (?P<message>.*)", multiline=continuation).can_ship_lines
    assert not pipeline(True, "regex", pattern=r"(?P<message>.*) (?P<stack>.*)", multiline=continuation).can_ship_lines
    assert not pipeline(True, multiline=continuation).can_ship_lines  # JSON
    assert not pipeline(True, "logfmt", multiline=continuation).can_ship_lines
    # Nor encodings other than UTF-8.
    assert not pipeline(True, "plain", encoding="latin-1").can_ship_lines


def _logfmt_line(i: int, noise: str, secret: str, in_context: bool) -> str:
    # Quoted values are JSON strings (escapes included: json.dumps writes é as \u00e9).
    line = f"ts=2026-12-01T00:00:{i % 60:02d}.000Z level=warn msg={json.dumps(f'{noise} {secret}')}"
    if in_context:
        line += f" field={json.dumps(secret)} note={secret.split(' ')[-1] or 'x'}"
    return line


def _plain_line(i: int, noise: str, secret: str, in_context: bool) -> str:
    return f"2026-12-01 00:00:{i % 60:02d},{i % 1000:03d} {'ERROR' if in_context else 'INFO'} {noise} {secret}"


def _nginx_line(i: int, noise: str, secret: str, in_context: bool) -> str:
    # The request may end in digits, which the message joins to the status.
    target = (noise + secret).replace('"', "'").replace("\\", "/") or "/"
    protocol = "" if in_context else " HTTP/1.1"
    return (f'10.0.0.{i % 250} - - [01/Dec/2026:00:00:{i % 60:02d} +0000] "GET {target}{protocol}" '
            f'{100 + i % 500} {i} "-" "agent {secret}" 0.{i % 1000:03d}')


def _sd_escape(text: str) -> str:
    # RFC 5424 escapes '"', '\\' and ']' in parameter values; a backslash before
    # any other character (here, a separator) is dropped when read too.
    return "".join("\\" + c if c in '"\\] -' else c for c in text)


def _syslog_line(i: int, noise: str, secret: str, in_context: bool) -> str:
    if in_context:  # RFC 5424, the secret in structured data, its separators escaped
        return (f'<165>1 2026-12-01T00:00:{i % 60:02d}.5Z web app {i} ID47 '
                f'[ex@1 note="{_sd_escape(noise)}" v="{_sd_escape(secret)}"] {noise}')
    return f"<34>Dec  1 00:00:{i % 60:02d} web su[{i}]: {noise} {secret}"  # RFC 3164


# Groups that start and end mid-word ("user=" is cut in two), a group that
# may take no part, and one whose name is a record field.
_REGEX = r"(?P<timestamp>\S+ \S+) (?P<level>[A-Z]+) (?P<message>.*?)(?: us(?P<who>er=\S*))?(?: n(?P<n>\d+))?$"


def _regex_line(i: int, noise: str, secret: str, in_context: bool) -> str:
    tail = f" user={secret.replace(' ', '-')} n{i}" if in_context else ""
    return f"2026-12-01 00:00:{i % 60:02d},{i % 1000:03d} {'WARN' if i % 3 else 'INFO'} {noise} {secret}{tail}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line_texts, st.sampled_from([("logfmt", _logfmt_line), ("plain", _plain_line), ("nginx", _nginx_line),
                                    ("syslog", _syslog_line), ("regex", _regex_line)]))
def test_other_formats_lines_path_stores_the_records_of_the_records_path(
        texts: list[tuple[str, str, bool]], fmt: tuple[str, Any]) -> None:
    name, make = fmt
    lines = [make(i, noise, secret, flag) for i, (noise, secret, flag) in enumerate(texts)]
    source = {"pattern": _REGEX} if name == "regex" else {}
    records_path, lines_path = pipeline(False, name, **source), pipeline(True, name, **source)
    records_path.parser.fixed_now = "2026-12-01T00:00:00.000Z"  # lines whose own timestamp does not parse
    plain_items, plain_count, plain_end = records_path.process(None, chunk_of(lines), "/f.log", 0.0)
    chunk = chunk_of(lines)
    items, count, end = lines_path.process(None, chunk, "/f.log", 0.0)
    assert (count, end) == (plain_count, plain_end) == (len(lines), chunk.end)
    stored = expand(items)
    # Read times (UTC, "Z") stand in for timestamps that do not parse; RFC 3164
    # stamps (local, with an offset) are this year's on both paths.
    fixed = [msgspec.structs.replace(r, timestamp="2026-12-01T00:00:00.000Z") if r.timestamp.startswith("20")
             and r.timestamp.endswith("Z") and not r.timestamp.startswith("2026-12-01T00:00:") else r
             for r in stored]
    assert {r.offset: r for r in fixed} == {r.offset: r for r in plain_items}  # type: ignore[union-attr]
    text = json.dumps([msg for r in fixed for msg in (r.message, r.context)])
    assert CARD not in text and "123-45-6789" not in text and "hunter2" not in text


def _json_source(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "logs").mkdir(exist_ok=True)
    return {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "json"}


def _lines(start: int, stop: int) -> list[str]:
    return [json.dumps({"ts": "2026-12-01T00:00:00Z", "msg": f"line {i:04d}" + (f" {CARD}" if i % 17 == 0 else "")})
            for i in range(start, stop)]


def _expected(start: int, stop: int) -> list[str]:
    return [f"line {i:04d}" + (" [REDACTED:credit_card]" if i % 17 == 0 else "") for i in range(start, stop)]


async def test_every_line_stored_once_across_batch_boundaries(tmp_path, stub, start_agent) -> None:
    log = tmp_path / "logs" / "a.log"
    source = _json_source(tmp_path)
    write_lines(log, _lines(0, 5))
    running = await start_agent(agent_config(tmp_path, stub.url, [source], batch={"max_records": 7}))
    await eventually(lambda: len(stub.messages()) == 5, what="the first batch (records: the collector is unknown)")
    write_lines(log, _lines(5, 300))
    await eventually(lambda: len(stub.messages()) == 300, what="every line")
    assert sorted(stub.messages()) == _expected(0, 300)
    assert stub.lines_posts > 0, "lines were shipped as read"
    offsets = sorted(r.offset for r in stub.records)
    assert len(set(offsets)) == 300 and all(r.file == str(log) and r.host for r in stub.records)
    assert max(len(b) for b in stub.batches.values()) <= 7
    await eventually(lambda: running.agent.metrics.records_shipped == 300, what="300 records shipped (acknowledged)")
    # Every batch names the rules it was redacted with (the collector skips redacting it again if they are its own).
    assert set(stub.redacted_with) == {Redactor(RedactConfig()).fingerprint}


async def test_logfmt_lines_ship_as_read_only_to_a_collector_that_names_the_format(tmp_path, stub,
                                                                                   start_agent) -> None:
    log = tmp_path / "logs" / "a.log"
    (tmp_path / "logs").mkdir(exist_ok=True)
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "logfmt"}
    lines = [f'ts=2026-12-01T00:00:00Z level=info msg="line {i:04d}{f" {CARD}" if i % 17 == 0 else ""}"'
             for i in range(200)]
    write_lines(log, lines[:5])
    running = await start_agent(agent_config(tmp_path, stub.url, [source], batch={"max_records": 30}))
    await eventually(lambda: len(stub.messages()) == 5, what="the first batch")
    write_lines(log, lines[5:100])
    await eventually(lambda: len(stub.messages()) == 100, what="every line")
    assert sorted(stub.messages()) == _expected(0, 100)
    assert stub.lines_posts > 0, "logfmt lines were shipped as read"
    assert all(r.level == "INFO" and r.timestamp.startswith("2026-12-01T00:00:00") for r in stub.records)
    # A collector that parses JSON lines only (it names "lines" but not "lines:logfmt"): records.
    running.agent._collector_lines(True, ["lines"])
    posts = stub.lines_posts
    write_lines(log, lines[100:200])
    await eventually(lambda: len(stub.messages()) == 200, what="the rest")
    assert stub.lines_posts == posts and sorted(stub.messages()) == _expected(0, 200)


async def test_an_older_collector_gets_records_only(tmp_path, stub, start_agent) -> None:
    stub.lines_feature = False
    log = tmp_path / "logs" / "a.log"
    source = _json_source(tmp_path)
    write_lines(log, _lines(0, 5))
    await start_agent(agent_config(tmp_path, stub.url, [source]))
    await eventually(lambda: len(stub.messages()) == 5)
    write_lines(log, _lines(5, 100))
    await eventually(lambda: len(stub.messages()) == 100)
    assert sorted(stub.messages()) == _expected(0, 100) and stub.lines_posts == 0


async def test_a_collector_that_stops_reading_lines_gets_them_again_as_records(
        tmp_path, stub, start_agent, caplog) -> None:
    log = tmp_path / "logs" / "a.log"
    source = _json_source(tmp_path)
    write_lines(log, _lines(0, 5))
    running = await start_agent(agent_config(tmp_path, stub.url, [source]))
    await eventually(lambda: len(stub.messages()) == 5)
    stub.lines_feature = False  # replaced by an older collector: lines are ignored, not counted
    with caplog.at_level(logging.ERROR, logger="logferry.agent"):
        write_lines(log, _lines(5, 60))
        await eventually(lambda: len(stub.messages()) == 60, what="the ignored lines, sent again")
        posts = stub.lines_posts
        write_lines(log, _lines(60, 80))
        await eventually(lambda: len(stub.messages()) == 80)
    assert sorted(stub.messages()) == _expected(0, 80)
    assert stub.lines_posts == posts, "no lines shipped as read after the collector stopped reading them"
    assert any("did not read" in r.getMessage() for r in caplog.records)
    assert not any(p.ship_lines for p in running.agent.pipelines)


async def test_refused_lines_survive_a_stop_while_their_records_wait_for_the_collector(
        tmp_path, stub, start_agent) -> None:
    # The records of a refused group are spooled before the first batch is
    # acknowledged: stopped while the collector refuses them for now, the
    # agent sends them after a restart (the first batch, sent again, is
    # answered as a duplicate that repeats the refusal; the replacement it
    # makes again has the spooled one's id, so the records are stored once).
    (tmp_path / "logs").mkdir()
    regex_log, json_log = tmp_path / "logs" / "r.log", tmp_path / "logs" / "j.log"
    sources = [{"path": str(regex_log), "source": "rx", "format": "regex",
                "pattern": r"(?P<level>[A-Z]+) (?P<message>.*)"},
               _json_source(tmp_path) | {"path": str(json_log)}]
    stub.refuse_group = lambda group: "lines.pattern is not a valid RE2 regular expression: refused by test"
    held: list[str] = []

    def unavailable_for_rx_records(batch: Any) -> Any:
        if not batch.lines and any(r.source == "rx" for _, r in batch.records):
            held.append(batch.batch_id)
            return json_answer(503, {"error": {"code": "unavailable", "message": "not now"}})
        return None

    stub.answer_batch = unavailable_for_rx_records
    write_lines(json_log, _lines(0, 5))
    cfg = agent_config(tmp_path, stub.url, sources)
    first = await start_agent(cfg)
    await eventually(lambda: len(stub.messages()) == 5, what="the first batch, which learns the collector's formats")
    await eventually(lambda: all(p.ship_lines for p in first.agent.pipelines), what="the collector's formats")
    write_lines(regex_log, [f"WARN rx {i:03d}" for i in range(30)])
    await eventually(lambda: len(held) >= 2, what="the records of the refused lines, retried")
    await first.stop()
    stub.answer_batch = None
    second = await start_agent(cfg)
    await eventually(lambda: len([r for r in stub.records if r.source == "rx"]) == 30, what="the refused lines")
    await asyncio.sleep(0.3)  # a duplicate would arrive now
    assert sorted(r.message for r in stub.records if r.source == "rx") == [f"rx {i:03d}" for i in range(30)]
    assert set(held) == {held[0]}, "the same batch id, before and after the restart"
    assert second.agent.metrics.records_shipped >= 30


async def test_refused_lines_whose_answer_was_lost_are_sent_again_as_records(tmp_path, stub, start_agent) -> None:
    # The collector refused a group of lines and its answer never arrived: the
    # resend is answered as a duplicate that carries the refusal, so the lines
    # are parsed here and sent as records instead of being lost.
    (tmp_path / "logs").mkdir()
    regex_log, json_log = tmp_path / "logs" / "r.log", tmp_path / "logs" / "j.log"
    sources = [{"path": str(regex_log), "source": "rx", "format": "regex",
                "pattern": r"(?P<level>[A-Z]+) (?P<message>.*)"},
               _json_source(tmp_path) | {"path": str(json_log)}]
    stub.refuse_group = lambda group: ("lines.pattern is not a valid RE2 regular expression: refused by test"
                                       if group.source == "rx" else None)
    write_lines(json_log, _lines(0, 5))
    agent = await start_agent(agent_config(tmp_path, stub.url, sources))
    await eventually(lambda: len(stub.messages()) == 5, what="the first batch, which learns the collector's formats")
    await eventually(lambda: all(p.ship_lines for p in agent.agent.pipelines), what="the collector's formats")
    stub.lose_answers = 1
    write_lines(regex_log, [f"WARN rx {i:03d}" for i in range(30)])
    await eventually(lambda: len([r for r in stub.records if r.source == "rx"]) == 30, what="the refused lines")
    assert stub.lose_answers == 0 and stub.duplicates == 1
    assert sorted(r.message for r in stub.records if r.source == "rx") == [f"rx {i:03d}" for i in range(30)]
    assert not (tmp_path / "state" / "dead-letter.ndjson").exists()


# A reason naming lines ("lines.…") given to some lines of a group, not all,
# is theirs alone: the group is not refused (sent again as records). Line 35
# starts a group of lines shipped as read: line 34 holds a card (a record).
@pytest.mark.parametrize("reason", ["message: refused by test", "lines.x: refused by test"])
async def test_a_rejected_line_is_dead_lettered_with_its_record(tmp_path, stub, start_agent, reason) -> None:
    log = tmp_path / "logs" / "a.log"
    source = _json_source(tmp_path)
    write_lines(log, _lines(0, 3))
    running = await start_agent(agent_config(tmp_path, stub.url, [source]))
    await eventually(lambda: len(stub.messages()) == 3)
    stub.reject = lambda r: reason if r.message == "line 0035" else None
    write_lines(log, _lines(3, 50))
    await eventually(lambda: len(stub.messages()) == 49)
    dead = tmp_path / "state" / "dead-letter.ndjson"
    await eventually(dead.exists, what="the dead-letter file")
    entries = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [(e["record"]["message"], e["reason"]) for e in entries] == [("line 0035", reason)]
    assert sorted(stub.messages()) == [m for m in _expected(0, 50) if m != "line 0035"]
    assert all(p.ship_lines for p in running.agent.pipelines)
    assert entries[0]["record"]["offset"] == log.read_bytes().index(b'{"ts"', log.read_bytes().index(b"line 0035") - 60)
    # Counted once the entry is written: the file may be seen a moment before.
    await eventually(lambda: running.agent.metrics.records_rejected == 1, what="the rejection counted")
    assert stub.lines_posts > 0


def test_read_at_is_the_timestamp_of_lines_without_one() -> None:
    p = pipeline(True)
    items, _, _ = p.process(None, chunk_of(['{"msg": "no time"}']), "/f.log", 0.0)
    records, groups = _wire_items(items)
    assert not records and len(groups) == 1
    (_, record), = parse_shipped_lines(groups[0], "h")[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record.timestamp)
    import datetime as dt
    stamped = dt.datetime.fromisoformat(record.timestamp.replace("Z", "+00:00")).timestamp()
    assert abs(stamped - groups[0].read_at) < 0.001


async def test_one_batch_in_flight_until_the_collector_first_answers(tmp_path, stub, start_agent) -> None:
    # The first answer says whether lines can go as read; until then the agent
    # does not fill every in-flight slot with batches of records.
    import asyncio

    stub.delay = 0.5
    log = tmp_path / "logs" / "a.log"
    source = _json_source(tmp_path)
    write_lines(log, _lines(0, 100))
    await start_agent(agent_config(tmp_path, stub.url, [source], batch={"max_records": 5},
                                   collector={"max_in_flight": 4}))
    await eventually(lambda: stub.posts >= 1, what="the first post")
    await asyncio.sleep(0.3)
    assert stub.posts == 1, "a second batch was sent before the first answer"
    await eventually(lambda: stub.posts >= 3, what="more posts once answered")
    stub.delay = 0.0
    await eventually(lambda: len(stub.messages()) == 100)
    write_lines(log, _lines(100, 120))  # read after the answer: shipped as read
    await eventually(lambda: len(stub.messages()) == 120)
    assert sorted(stub.messages()) == _expected(0, 120) and stub.lines_posts > 0


async def test_the_first_batch_is_small_until_the_collector_first_answers(tmp_path, stub, start_agent) -> None:
    # Until its answer says the collector parses lines shipped as read, every
    # line is parsed here: the first batch holds 1000 records at most, not
    # max_records (10,000 by default), and the rest go as read.
    seen: list[tuple[int, int]] = []

    def note(batch: Any) -> None:
        seen.append((len(batch.records), sum(group.data.count(b"\n") for group in batch.lines)))

    stub.answer_batch = note
    log = tmp_path / "logs" / "a.log"
    source = _json_source(tmp_path)
    write_lines(log, [line.replace(f" {CARD}", "") for line in _lines(0, 6000)])
    await start_agent(agent_config(tmp_path, stub.url, [source], read_chunk="1MiB"))
    await eventually(lambda: len(stub.messages()) == 6000)
    assert stub.records[0].message == "line 0000"
    assert 0 < seen[0][0] <= 1000 and seen[0][1] == 0, seen[:3]
    # Reads are 64 KiB until then: the one that filled the first batch left
    # the rest of its records for the next; every later line goes as read.
    shortest = min(len(line) for line in log.read_text().splitlines()) + 1
    records = sum(records for records, _ in seen)
    assert records <= 1000 + 65536 // shortest, seen[:3]
    assert sum(lines for _, lines in seen) == 6000 - records


async def test_batches_a_spool_takes_while_the_first_answer_is_awaited_are_full(tmp_path, stub, start_agent) -> None:
    # The collector is down from the start and the spool has room: the first
    # batch is small, the ones read meanwhile are records of full size.
    seen: list[int] = []
    stub.answer_batch = lambda batch: seen.append(len(batch.records))
    stub.responder = lambda n: json_answer(503, {"error": {"code": "down", "message": "down"}})
    log = tmp_path / "logs" / "a.log"
    source = _json_source(tmp_path)
    write_lines(log, [line.replace(f" {CARD}", "") for line in _lines(0, 6000)])
    running = await start_agent(agent_config(tmp_path, stub.url, [source], spool={"max_bytes": "64MiB"}))
    await eventually(lambda: running.agent._unacked >= 2, what="a second batch spooled during the outage")
    stub.responder = None
    await eventually(lambda: len(stub.messages()) == 6000)
    # (Which arrives first depends on the retries' timing.)
    assert min(seen) <= 1000 < max(seen), seen


async def test_lines_still_go_as_read_after_a_sighup_reload(tmp_path, stub, start_agent) -> None:
    log = tmp_path / "logs" / "a.log"
    source = _json_source(tmp_path)
    write_lines(log, _lines(0, 5))
    cfg = agent_config(tmp_path, stub.url, [source])
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(json.dumps({"agent": {
        "collector": {"url": stub.url, "token": "test-token"}, "state_dir": str(tmp_path / "state"),
        "sources": [source], "poll_interval": "20ms", "batch": {"max_wait": "30ms"}}}))
    running = await start_agent(cfg)
    running.agent.config_path = str(config_file)
    await eventually(lambda: len(stub.messages()) == 5)
    write_lines(log, _lines(5, 20))
    await eventually(lambda: len(stub.messages()) == 20)
    posts = stub.lines_posts
    assert posts > 0
    running.agent.request_reload()
    await eventually(lambda: all(p.ship_lines for p in running.agent.pipelines), what="the reloaded pipelines")
    write_lines(log, _lines(20, 40))
    await eventually(lambda: len(stub.messages()) == 40)
    assert stub.lines_posts > posts and sorted(stub.messages()) == _expected(0, 40)


def test_a_last_line_without_newline_goes_as_a_record() -> None:
    # A finished file's last line (read_partial): no newline to end a run on.
    line = json.dumps({"ts": "2026-12-01T00:00:00Z", "msg": f"last words {CARD}"}).encode()
    chunk = Chunk(line, [line], [500], 500 + len(line))
    items, count, end = pipeline(True).process(None, chunk, "/f.log", 0.0)
    assert count == 1 and end == 500 + len(line) and len(items) == 1
    assert isinstance(items[0], Record) and items[0].message == "last words [REDACTED:credit_card]"
    assert items[0].offset == 500


def test_logfmt_escapes_that_hide_a_card_from_the_raw_line_make_it_a_hit() -> None:
    # Quoted logfmt values are JSON strings: "\u00e94111…" decodes to "é4111…"
    # (a card after a letter) and "\u0034111…" to "4111…"; the raw bytes hold
    # neither. Such lines must be parsed and redacted on the agent.
    lines = ['ts=2026-12-01T00:00:00Z msg="paid \\u00e94111 1111 1111 1111"',
             'ts=2026-12-01T00:00:01Z msg="paid \\u0034111 1111 1111 1111"',
             'ts=2026-12-01T00:00:02Z msg="ssn 123\\u002d45-6789"',
             "ts=2026-12-01T00:00:03Z msg=fine"]
    items, count, _ = pipeline(True, "logfmt").process(None, chunk_of(lines), "/f.log", 0.0)
    assert count == 4
    stored = {r.offset: r.message for r in expand(items)}
    assert list(stored.values()) == ["paid é[REDACTED:credit_card]", "paid [REDACTED:credit_card]",
                                     "ssn [REDACTED:ssn]", "fine"]
    assert [type(i).__name__ for i in items] == ["Record", "Record", "Record", "RawRun"]


@pytest.mark.parametrize("fmt", sorted(JOINED_FORMATS))
def test_a_combined_log_message_that_joins_a_card_is_redacted_on_both_paths(fmt: str) -> None:
    # "GET /pay/4111-1111-1111-1" + " " + "103": a valid card only once joined;
    # the raw line holds no match, so it ships as read and the collector redacts
    # it, or, parsed on the agent, the agent does.
    line = '10.0.0.1 - - [01/Dec/2026:00:00:00 +0000] "GET /pay/4111-1111-1111-1" 103 5 "-" "curl"'
    items, _, _ = pipeline(True, fmt).process(None, chunk_of([line]), "/f.log", 0.0)
    assert [type(i).__name__ for i in items] == ["RawRun"]
    assert [r.message for r in expand(items)] == ["GET /pay/[REDACTED:credit_card]"]
    records, _, _ = pipeline(False, fmt).process(None, chunk_of([line]), "/f.log", 0.0)
    assert [r.message for r in records] == ["GET /pay/[REDACTED:credit_card]"]  # type: ignore[union-attr]


def test_a_syslog_line_with_a_backslash_is_a_hit_on_both_paths() -> None:
    # Structured-data values are unescaped: '4111\\ 1111\\ …' is read as a card
    # that no raw line holds. Such lines are parsed and redacted on the agent,
    # whether the source ships lines as read or not (the collector does not
    # redact again what an agent with its rules sent).
    lines = ['<134>1 2026-12-01T00:00:00Z web pay 1 - [card@1 number="4111\\ 1111\\ 1111\\ 1111"] declined',
             '<134>1 2026-12-01T00:00:01Z web pay 1 - [card@1 number="4111\\-1111-1111-1111"] declined',
             "<34>Dec  1 00:00:02 web su[1]: fine",
             "<34>Dec  1 00:00:03 web su[1]: a path C:\\temp, no secret"]
    for ship_lines in (False, True):
        items, count, _ = pipeline(ship_lines, "syslog").process(None, chunk_of(lines), "/f.log", 0.0)
        assert count == 4
        stored = sorted(expand(items) if ship_lines else items, key=lambda r: r.offset)  # type: ignore[union-attr]
        assert [r.context["structured_data"]["card@1"]["number"] for r in stored[:2]] == (  # type: ignore[index]
            ["[REDACTED:credit_card]"] * 2)
        assert [r.message for r in stored] == ["declined", "declined", "fine", "a path C:\\temp, no secret"]
    assert [type(i).__name__ for i in items] == ["Record", "Record", "RawRun", "Record"]


def test_a_custom_rule_with_a_word_boundary_finds_what_json_escapes_hid_from_the_line() -> None:
    # "x\\nacct12345" in a JSON line is "x", a newline and "acct12345" once
    # decoded: a boundary before "acct" that the raw line lacks. The prefilter
    # drops \\b (a superset), so the line is a hit on both paths.
    config = msgspec.convert({"custom": [{"name": "acct", "pattern": r"\bacct\d+"}]}, RedactConfig)
    lines = [json.dumps({"msg": "x\nacct12345 done"}), json.dumps({"msg": "xacct12345 kept"})]
    for ship_lines in (False, True):
        cfg = SourceConfig(path="x", source="app", format="json")
        p = SourcePipeline(cfg, "host-1", Redactor(config), AgentMetrics())
        p.ship_lines = ship_lines
        items, _, _ = p.process(None, chunk_of(lines), "/f.log", 0.0)
        records, groups = _wire_items(items)
        stored = [*records, *(r for g in groups for _, r in parse_shipped_lines(g, "host-1")[0])]
        assert sorted(r.message for r in stored) == ["x\n[REDACTED:acct] done", "xacct12345 kept"]


@pytest.mark.parametrize("fmt", ["json", "plain", "nginx"])
def test_a_card_written_with_url_spaces_is_a_hit_and_is_redacted(fmt: str) -> None:
    # "%204111…": the "20" of the "%20" is not part of the number after it. Dashes escaped ("%2D") separate too.
    queries = ["/pay?card=4111%201111%201111%201111", "/pay?card=%204111111111111111", "/pay?card=4111+1111+1111+1111",
               "/pay?card=4111%2D1111%2D1111%2D1111"]
    lines = {"json": [json.dumps({"msg": f"GET {q}"}) for q in queries],
             "plain": [f"2026-12-01 00:00:00,000 INFO GET {q}" for q in queries],
             "nginx": [f'10.0.0.1 - - [01/Dec/2026:00:00:00 +0000] "GET {q} HTTP/1.1" 200 5 "-" "curl"'
                       for q in queries]}[fmt]
    for ship_lines in (False, True):
        items, _, _ = pipeline(ship_lines, fmt).process(None, chunk_of(lines), "/f.log", 0.0)
        stored = expand(items) if ship_lines else items
        assert sorted(r.message for r in stored) == sorted([  # type: ignore[union-attr]
            "GET /pay?card=[REDACTED:credit_card]" + (" HTTP/1.1 200" if fmt == "nginx" else ""),
            "GET /pay?card=%20[REDACTED:credit_card]" + (" HTTP/1.1 200" if fmt == "nginx" else ""),
            "GET /pay?card=[REDACTED:credit_card]" + (" HTTP/1.1 200" if fmt == "nginx" else ""),
            "GET /pay?card=[REDACTED:credit_card]" + (" HTTP/1.1 200" if fmt == "nginx" else "")])
        if ship_lines and fmt != "nginx":
            assert all(isinstance(i, Record) for i in items)  # hits: parsed and redacted here


def test_a_card_logged_as_a_json_number_is_redacted_on_both_paths() -> None:
    lines = ['{"msg": "paid", "pan": 4111111111111111, "qty": 2}', '{"msg": "ok", "at": 1764583200000}']
    for ship_lines in (False, True):
        items, _, _ = pipeline(ship_lines, "json").process(None, chunk_of(lines), "/f.log", 0.0)
        stored = sorted(expand(items) if ship_lines else items, key=lambda r: r.offset)  # type: ignore[union-attr]
        assert [r.context for r in stored] == [  # type: ignore[union-attr]
            {"pan": "[REDACTED:credit_card]", "qty": 2}, {"at": 1764583200000}]


async def test_lines_whose_group_the_collector_refuses_are_sent_again_as_records(
        tmp_path, stub, start_agent, caplog) -> None:
    # A collector whose RE2 refuses a pattern this agent takes (another
    # version) rejects every line of the group with the same reason: the agent
    # parses them itself and ships records, now and for later lines of that
    # source, instead of dead-lettering the source's logs.
    (tmp_path / "logs").mkdir()
    regex_log, json_log = tmp_path / "logs" / "r.log", tmp_path / "logs" / "j.log"
    sources = [{"path": str(regex_log), "source": "rx", "format": "regex",
                "pattern": r"(?P<level>[A-Z]+) (?P<message>.*)"},
               _json_source(tmp_path) | {"path": str(json_log)}]
    reason = "lines.pattern is not a valid RE2 regular expression: refused by test"
    stub.refuse_group = lambda group: reason if group.format == "regex" else None
    write_lines(json_log, _lines(0, 5))
    running = await start_agent(agent_config(tmp_path, stub.url, sources))
    await eventually(lambda: len(stub.messages()) == 5, what="the first batch, which learns the collector's formats")
    # (The answer reaches the agent after the stub stored the records.)
    await eventually(lambda: all(p.ship_lines for p in running.agent.pipelines), what="the collector's formats")
    with caplog.at_level(logging.ERROR, logger="logferry.agent"):
        write_lines(regex_log, [f"WARN rx {i:03d}" for i in range(40)])
        await eventually(lambda: len(stub.messages()) == 45, what="the refused lines, sent again")
    assert stub.lines_posts >= 1, "the regex lines went as read first"
    posts = stub.lines_posts
    write_lines(regex_log, [f"ERROR rx {i:03d}" for i in range(40, 60)])
    await eventually(lambda: len(stub.messages()) == 65, what="later regex lines")
    assert stub.lines_posts == posts, "later regex lines went as records"
    write_lines(json_log, _lines(5, 40))
    await eventually(lambda: len(stub.messages()) == 100, what="later JSON lines")
    assert stub.lines_posts > posts, "the JSON source still ships lines as read"
    regex = sorted((r.level, r.message) for r in stub.records if r.source == "rx")
    assert regex == sorted([("WARN", f"rx {i:03d}") for i in range(40)]
                           + [("ERROR", f"rx {i:03d}") for i in range(40, 60)])
    assert sorted(r.message for r in stub.records if r.source == "app") == _expected(0, 40)
    assert {(p.cfg.source, p.ship_lines) for p in running.agent.pipelines} == {("rx", False), ("app", True)}
    assert not (tmp_path / "state" / "dead-letter.ndjson").exists()
    assert any("refused the lines of source rx" in r.getMessage() and "refused by test" in r.getMessage()
               for r in caplog.records)
    metrics = running.agent.metrics
    await eventually(lambda: metrics.records_shipped == 100, what="every record counted once, when acknowledged")
    assert metrics.records_rejected == 0


@pytest.mark.parametrize(("fmt", "line", "as_read"), [
    ("plain", "2026-12-01 10:00:00 INFO GET /x request_id={uuid} took 3 ms", True),
    ("json", '{{"msg":"GET /x","request_id":"{uuid}"}}', True),
    ("logfmt", "msg=done request_id={uuid}", True),
    # Syslog's fields are not the line's bytes (structured data is unescaped): the record is looked at.
    ("syslog", '<14>1 2026-12-01T10:00:00Z h app 1 - [x@1 id="{uuid}"] done', False),
])
def test_a_line_whose_only_digit_run_is_inside_a_uuid_goes_as_read(fmt: str, line: str, as_read: bool) -> None:
    # 5453853284707646, the UUID's digits, passes every card check; inside the UUID it is no card.
    uuid = "54538532-8470-7646-3511-b677c3e44a22"
    text = line.format(uuid=uuid).encode() + b"\n"
    pipeline = SourcePipeline(SourceConfig(path="/x", source="app", format=fmt), "h",  # type: ignore[arg-type]
                              Redactor(RedactConfig()), AgentMetrics())
    items, count, _ = pipeline._runs(Chunk.of_body(text, 0, len(text)), "/x")
    assert count == 1
    assert [type(item) for item in items] == [RawRun if as_read else Record]
    if not as_read:
        assert uuid in msgspec.json.encode(items[0]).decode()  # kept: no card
