"""POST /v1/ingest with lines shipped as read (Batch.lines): the collector parses
them into records numbered after the body's records, stores them like records
(ids, retention, redaction) and rejects the lines of an invalid group."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

import pytest
import zstandard

from agent.wire import Batch, Lines, Record, encode_batch
from collector import appkeys
from collector.ingest import BATCH_NAMESPACE

# What the collector says it parses when shipped as read (agent.wire.lines_feature).
FEATURES = ["lines", "lines:apache", "lines:combined", "lines:logfmt", "lines:multiline", "lines:nginx", "lines:plain",
            "lines:regex", "lines:syslog"]

MSGPACK = {"Content-Type": "application/msgpack"}
NOW = dt.datetime.now(dt.UTC).replace(microsecond=123000) - dt.timedelta(minutes=5)
NOW_ISO = NOW.isoformat()
FILE = "/var/log/app.json"


def read_at() -> float:
    """A read time two minutes ago, exact in binary (so its milliseconds are known)."""
    return float(int(time.time()) - 120) + 0.25


def rec(message: str, **kw: Any) -> Record:
    fields: dict[str, Any] = {"timestamp": NOW_ISO, "level": "INFO", "source": "web", "message": message}
    fields.update(kw)
    return Record(**fields)


def obj(**kw: Any) -> bytes:
    return json.dumps(kw).encode()


def group(lines: list[bytes], *, source: str = "app-json", at: float | None = None, offset: int | None = 5000,
          data: bytes | None = None, **kw: Any) -> Lines:
    return Lines(source=source, data=b"".join(line + b"\n" for line in lines) if data is None else data,
                 read_at=read_at() if at is None else at, file=FILE, offset=offset, **kw)


def batch(records: list[Record], lines: list[Lines], batch_id: str | None = None) -> Batch:
    return Batch(agent_id="test-agent", batch_id=batch_id or str(uuid.uuid4()), host="h1", records=records,
                 lines=lines)


def body_of(b: Batch) -> bytes:
    return zstandard.compress(encode_batch(b))


async def stored(storage: Any) -> list[dict[str, Any]]:
    return await storage.query("SELECT * FROM application_logs ORDER BY message", {})  # type: ignore[no-any-return]


def naive(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC).replace(tzinfo=None)


@pytest.fixture
async def ingest(app_client: Any, tokens: Any) -> Any:
    token = tokens.create("ingest")
    await app_client.server.app[appkeys.TOKENS].load()

    async def post(body: bytes) -> Any:
        headers = {**MSGPACK, **tokens.headers(token), "Content-Encoding": "zstd"}
        return await app_client.post("/v1/ingest", data=body, headers=headers)

    return post


async def test_lines_are_stored_after_the_body_records_with_deterministic_ids(ingest: Any, storage: Any) -> None:
    at = read_at()
    lines = [obj(ts=NOW_ISO, level="warn", msg="line zero", user_id="u7"),
             obj(level="error", msg="no timestamp"),
             b"",
             b"not json {",
             obj(time=NOW_ISO, msg="line four", extra=1)]
    starts = [5000 + sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]
    sent = batch([rec("body zero"), rec("body one")], [group(lines, at=at, tags=["prod"])], batch_id="lines-1")
    resp = await ingest(body_of(sent))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"accepted": 6, "rejected": [], "duplicate": False, "features": FEATURES,
                                 "lines": 5}

    rows = {row["message"]: row for row in await stored(storage)}
    assert sorted(rows) == ["body one", "body zero", "line four", "line zero", "no timestamp", "not json {"]
    for message, line_number in (("line zero", 0), ("no timestamp", 1), ("not json {", 3), ("line four", 4)):
        row = rows[message]
        assert (row["source"], row["host"], row["file"], row["offset"]) == ("app-json", "h1", FILE,
                                                                            starts[line_number]), message
        assert row["agent_id"] == "test-agent" and row["batch_id"] == "lines-1"
    assert (rows["line zero"]["level"], rows["line zero"]["user_id"]) == ("WARN", "u7")
    assert rows["line zero"]["timestamp"] == naive(NOW)
    assert rows["line zero"]["tags"] == ["prod"]
    # A line without a timestamp gets the time the agent read it, to the millisecond.
    assert rows["no timestamp"]["timestamp"] == naive(dt.datetime.fromtimestamp(at, dt.UTC))
    assert rows["no timestamp"]["level"] == "ERROR"
    assert rows["not json {"]["tags"] == ["prod", "parse_error"]
    assert json.loads(rows["line four"]["context"]) == {"extra": 1}
    assert (rows["body zero"]["source"], rows["body zero"]["file"]) == ("web", "")

    # Ids come from (batch id, record index): lines are numbered after the body, blank lines keep a number.
    prefix = str(uuid.uuid5(BATCH_NAMESPACE, "lines-1"))[:24]
    indexes = {"body zero": 0, "body one": 1, "line zero": 2, "no timestamp": 3, "not json {": 5, "line four": 6}
    assert {m: str(row["id"]) for m, row in rows.items()} == {m: f"{prefix}{i:012x}" for m, i in indexes.items()}

    again = await (await ingest(body_of(sent))).json()
    assert again["duplicate"] is True and again["accepted"] == 0 and again["features"] == FEATURES
    assert len(await stored(storage)) == 6


async def test_a_batch_without_lines_has_no_lines_count(ingest: Any) -> None:
    out = await (await ingest(body_of(batch([rec("only a record")], [])))).json()
    assert out == {"accepted": 1, "rejected": [], "duplicate": False, "features": FEATURES}


async def test_rejected_lines_are_reported_by_body_count_plus_line_number(ingest: Any, storage: Any) -> None:
    first = group([obj(ts=NOW_ISO, msg="a0"), b"", obj(ts=NOW_ISO, msg="a2")], source="first")
    second = group([obj(ts=NOW_ISO, msg="b0"),
                    obj(ts=(NOW - dt.timedelta(days=31)).isoformat(), msg="too old"),
                    obj(ts=(NOW + dt.timedelta(days=2)).isoformat(), msg="future"),
                    obj(msg="b3 read_at")], source="second")
    out = await (await ingest(body_of(batch([rec("r0"), rec("r1")], [first, second])))).json()
    assert out["accepted"] == 6 and out["lines"] == 7
    # second's lines follow the body (2) and first's 3 lines (its blank one included).
    assert [r["index"] for r in out["rejected"]] == [2 + 3 + 1, 2 + 3 + 2]
    assert "30-day retention" in out["rejected"][0]["error"] and "'second'" in out["rejected"][0]["error"]
    assert "future" in out["rejected"][1]["error"]
    assert [r["message"] for r in await stored(storage)] == ["a0", "a2", "b0", "b3 read_at", "r0", "r1"]


async def test_an_invalid_group_rejects_its_lines_and_the_rest_is_stored(ingest: Any, storage: Any) -> None:
    groups = [
        group([], data=b"<a/>\n<b/>\n<c/>", format="xml"),  # 3 lines (the last without a newline): 2, 3, 4
        group([obj(ts=NOW_ISO, msg="valid 0"), obj(msg="valid 1")], source="good"),  # 5, 6
        group([obj(ts=NOW_ISO, msg="x"), b""], fields={"bogus": "x"}),  # 7, 8
        group([obj(ts=NOW_ISO, msg="y")], source=""),  # 9
        group([obj(ts=NOW_ISO, msg="z")], source="s" * 201),  # 10
    ]
    resp = await ingest(body_of(batch([rec("r0"), rec("r1")], groups)))
    assert resp.status == 200, await resp.text()
    out = await resp.json()
    assert out["accepted"] == 4 and out["lines"] == 9 and out["duplicate"] is False
    errors = {r["index"]: r["error"] for r in out["rejected"]}
    assert sorted(errors) == [2, 3, 4, 7, 8, 9, 10]
    assert all(errors[i].startswith("lines.format") and "'xml'" in errors[i] for i in (2, 3, 4))
    assert all("fields" in errors[i] and "bogus" in errors[i] for i in (7, 8))
    assert all(errors[i].startswith("lines.source") for i in (9, 10))
    rows = await stored(storage)
    assert [(r["message"], r["source"]) for r in rows] == [("r0", "web"), ("r1", "web"), ("valid 0", "good"),
                                                          ("valid 1", "good")]
    ids = [str(r["id"]) for r in rows]
    prefix = ids[0][:24]
    assert [i[24:] for i in ids] == [f"{i:012x}" for i in (0, 1, 5, 6)]
    assert all(i[:24] == prefix for i in ids)


async def test_lines_of_a_batch_not_marked_redacted_are_redacted_by_the_collector(ingest: Any, storage: Any) -> None:
    card = "4111 1111 1111 1111"
    lines = [obj(ts=NOW_ISO, level="error", msg=f"charge failed for card {card}", password="hunter2", order=7)]
    sent = batch([rec(f"body record with card {card}")], [group(lines)])
    assert sent.redacted is False  # what agents send
    out = await (await ingest(body_of(sent))).json()
    assert out["accepted"] == 2 and out["lines"] == 1
    rows = {row["source"]: row for row in await stored(storage)}
    line_row = rows["app-json"]
    assert line_row["message"].startswith("charge failed for card ")
    assert card not in line_row["message"] and "4111" not in line_row["message"]
    assert "hunter2" not in line_row["context"] and json.loads(line_row["context"])["order"] == 7
    assert "4111" not in rows["web"]["message"]


async def test_logfmt_and_plain_lines_are_parsed_as_the_agent_parses_them(ingest: Any, storage: Any) -> None:
    stamp = NOW.strftime("%Y-%m-%dT%H:%M:%S.123Z")
    logfmt = [f'ts={stamp} level=warn msg="disk \\"sda\\" at 91%" user_id=u7 volume=sda'.encode(),
              b"no pairs here"]
    plain = [NOW.strftime("%Y-%m-%d %H:%M:%S,123").encode() + b" ERROR worker 3 died",
             b"a line without a timestamp"]
    at = read_at()
    sent = batch([], [group(logfmt, source="app-logfmt", format="logfmt"),
                      group(plain, source="app-plain", format="plain", at=at)])
    out = await (await ingest(body_of(sent))).json()
    assert (out["accepted"], out["lines"], out["rejected"]) == (4, 4, [])
    rows = {row["message"]: row for row in await stored(storage)}
    disk = rows['disk "sda" at 91%']
    assert (disk["source"], disk["level"], disk["user_id"]) == ("app-logfmt", "WARN", "u7")
    assert json.loads(disk["context"]) == {"volume": "sda"} and disk["timestamp"] == naive(NOW)
    assert rows["no pairs here"]["tags"] == ["parse_error"]
    died = rows["worker 3 died"]
    assert (died["source"], died["level"], died["timestamp"]) == ("app-plain", "ERROR", naive(NOW))
    assert rows["a line without a timestamp"]["timestamp"] == naive(dt.datetime.fromtimestamp(at, dt.UTC))


async def test_syslog_lines_are_read_in_the_zone_of_the_agent_that_sent_them(ingest: Any, storage: Any) -> None:
    # An agent 5 h 30 min east of UTC read an RFC 3164 line (local time, no
    # zone): stored as the instant it names, not as if written in UTC here.
    ist = dt.timezone(dt.timedelta(hours=5, minutes=30))
    local = NOW.astimezone(ist).strftime("%b %e %H:%M:%S").encode()
    good = group([b"<30>" + local + b" web cron[7]: backup done"], source="sys", format="syslog",
                 utc_offset=5 * 3600 + 1800)
    zoneless = group([b"<30>" + local + b" web cron[7]: from an agent that sent no offset"], source="sys",
                     format="syslog")
    out = await (await ingest(body_of(batch([], [good, zoneless])))).json()
    assert (out["accepted"], out["lines"]) == (1, 2)
    assert [r["index"] for r in out["rejected"]] == [1]
    assert out["rejected"][0]["error"].startswith("lines.utc_offset: ")
    [row] = await stored(storage)
    assert (row["message"], row["level"]) == ("backup done", "INFO")
    assert row["timestamp"] == naive(NOW.replace(microsecond=0))
    assert json.loads(row["context"]) == {"facility": 3, "severity": 6, "hostname": "web", "appname": "cron",
                                          "procid": "7"}


async def test_regex_lines_are_parsed_with_their_pattern_and_a_bad_pattern_rejects_only_its_lines(
        ingest: Any, storage: Any) -> None:
    stamp = NOW.strftime("%Y-%m-%dT%H:%M:%S.123Z").encode()
    pattern = r"(?P<timestamp>\S+) (?P<level>[A-Z]+) \[(?P<worker>\w+)\] (?P<message>.*)"
    good = group([stamp + b" ERROR [w7] queue full", b"free text"], source="app-re", format="regex", pattern=pattern)
    bad = group([stamp + b" INFO [w1] x"], source="app-re", format="regex", pattern="(?P<message>.*")
    out = await (await ingest(body_of(batch([], [good, bad])))).json()
    assert (out["accepted"], out["lines"]) == (2, 3)
    assert [(r["index"], r["error"].split(":")[0]) for r in out["rejected"]] == [
        (2, "lines.pattern is not a valid RE2 regular expression")]
    rows = {row["message"]: row for row in await stored(storage)}
    full = rows["queue full"]
    assert (full["level"], full["timestamp"], json.loads(full["context"])) == ("ERROR", naive(NOW), {"worker": "w7"})
    assert rows["free text"]["tags"] == ["parse_error"]


async def test_nginx_lines_are_redacted_here_even_from_an_agent_with_the_same_rules(ingest: Any, storage: Any,
                                                                                    app_client: Any) -> None:
    # The message joins the request and the status: "GET /pay/4111-1111-1111-1" + " 103"
    # is a card no raw line holds, so the agent's verdict on the line does not cover it.
    fingerprint = app_client.server.app[appkeys.REDACTOR].fingerprint
    nginx = [b'10.0.0.1 - - [01/Dec/2026:00:00:00 +0000] "GET /pay/4111-1111-1111-1" 103 5 "-" "curl"']
    plain = [b"2026-12-01 00:00:00,000 INFO kept as sent 4111 1111 1111 1111"]  # "missed" by the sender
    sent = batch([], [group(nginx, source="web-nginx", format="nginx"), group(plain, source="app-plain",
                                                                               format="plain")])
    sent.redacted_with = fingerprint
    out = await (await ingest(body_of(sent))).json()
    assert (out["accepted"], out["lines"]) == (2, 2)
    rows = {row["source"]: row["message"] for row in await stored(storage)}
    assert rows == {"web-nginx": "GET /pay/[REDACTED:credit_card]",
                    "app-plain": "kept as sent 4111 1111 1111 1111"}


async def test_fields_naming_one_key_for_two_record_fields_is_not_a_server_error(ingest: Any,
                                                                               storage: Any) -> None:
    groups = [group([obj(ts=NOW_ISO, level="warn", msg="x")], fields={"message": "level"}),
              group([obj(ts=NOW_ISO, msg="fine")], source="good")]
    resp = await ingest(body_of(batch([rec("r0")], groups)))
    assert resp.status == 200
    out = await resp.json()
    assert out["accepted"] >= 2
    assert "fine" in [r["message"] for r in await stored(storage)]


async def test_a_line_whose_key_has_a_quote_is_stored(ingest: Any, storage: Any) -> None:
    lines = [obj(ts=NOW_ISO, msg="quoted key", **{'say "hi"': 1})]
    out = await (await ingest(body_of(batch([], [group(lines, source="quoted")])))).json()
    assert out["rejected"] == []
    assert out["accepted"] == 1
