"""POST /v1/ingest: formats, per-record validation, limits, idempotency, back-pressure."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import uuid
from typing import Any

import msgspec
import pytest
import zstandard

from agent.wire import Batch, Record, encode_batch
from collector import appkeys

# What the collector says it parses when shipped as read (agent.wire.lines_feature).
FEATURES = ["lines", "lines:apache", "lines:combined", "lines:logfmt", "lines:multiline", "lines:nginx", "lines:plain",
            "lines:regex", "lines:syslog"]

MSGPACK = {"Content-Type": "application/msgpack"}


def batch(records: list[Record], batch_id: str | None = None) -> Batch:
    return Batch(agent_id="test-agent", batch_id=batch_id or str(uuid.uuid4()), host="h1", records=records)


NOW = dt.datetime.now(dt.UTC).replace(microsecond=123000) - dt.timedelta(minutes=5)


def rec(message: str = "hello", **kw: Any) -> Record:
    fields: dict[str, Any] = {"timestamp": NOW.isoformat(), "level": "INFO", "source": "web", "message": message}
    fields.update(kw)
    return Record(**fields)


async def stored(storage, where: str = "1", params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return await storage.query(f"SELECT * FROM application_logs WHERE {where} ORDER BY message", params or {})


@pytest.fixture
async def ingest(app_client, tokens):
    token = tokens.create("ingest")
    await app_client.server.app[appkeys.TOKENS].load()

    async def post(body: bytes, headers: dict[str, str] | None = None, token_: str | None = None):
        h = {**MSGPACK, **tokens.headers(token_ or token), **(headers or {})}
        return await app_client.post("/v1/ingest", data=body, headers=h)

    return post


async def test_msgpack_zstd_batch_is_stored_with_every_field(ingest, storage):
    r = rec("full record", level="warning", context={"order": 42, "nested": {"a": [1, 2]}}, user_id="u1",
            session_id="s1", request_id="r1", ip_address="10.0.0.1", user_agent="curl/8", duration_ms=12.5,
            error_stack="Traceback ...", tags=["billing", "eu"], file="/var/log/app.log", offset=1234)
    resp = await ingest(zstandard.compress(encode_batch(batch([r]))), {"Content-Encoding": "zstd"})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"accepted": 1, "rejected": [], "duplicate": False, "features": FEATURES}
    [row] = await stored(storage)
    assert row["level"] == "WARN"
    assert json.loads(row["context"]) == {"order": 42, "nested": {"a": [1, 2]}}
    assert (row["user_id"], row["session_id"], row["request_id"]) == ("u1", "s1", "r1")
    assert row["ip_address"] == "10.0.0.1" and row["user_agent"] == "curl/8" and row["duration_ms"] == 12.5
    assert row["error_stack"] == "Traceback ..." and row["tags"] == ["billing", "eu"]
    assert row["timestamp"].isoformat() == NOW.replace(tzinfo=None).isoformat()
    assert row["host"] == "h1" and row["file"] == "/var/log/app.log" and row["offset"] == 1234
    assert row["retention_days"] == 30


async def test_gzip_json_and_ndjson_bodies_are_accepted(ingest, storage):
    body = msgspec.json.encode({"records": [msgspec.to_builtins(rec("from json"))]})
    resp = await ingest(gzip.compress(body), {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert (await resp.json())["accepted"] == 1
    lines = b"\n".join(msgspec.json.encode(msgspec.to_builtins(rec(f"ndjson {i}"))) for i in range(3))
    resp = await ingest(lines + b"\n\n", {"Content-Type": "application/x-ndjson"})
    assert (await resp.json())["accepted"] == 3
    assert len(await stored(storage)) == 4


async def test_timestamps_as_epoch_seconds_millis_and_msgpack_extension(ingest, storage):
    at = NOW.replace(microsecond=500000)
    records = [rec("epoch", timestamp=at.timestamp()), rec("millis", timestamp=int(at.timestamp() * 1000)),
               rec("ext", timestamp=at)]
    resp = await ingest(encode_batch(batch(records)))
    assert (await resp.json())["accepted"] == 3
    rows = await stored(storage)
    assert {r["timestamp"].isoformat() for r in rows} == {at.replace(tzinfo=None).isoformat()}


async def test_records_past_their_retention_or_far_in_the_future_are_rejected(ingest, storage):
    records = [rec("too old", timestamp=(NOW - dt.timedelta(days=31)).isoformat()),
               rec("future", timestamp=(NOW + dt.timedelta(days=2)).isoformat()), rec("fine")]
    out = await (await ingest(encode_batch(batch(records)))).json()
    assert out["accepted"] == 1
    assert [r["index"] for r in out["rejected"]] == [0, 1]
    assert "30-day retention" in out["rejected"][0]["error"]
    assert "future" in out["rejected"][1]["error"]


async def test_invalid_records_are_rejected_by_index_and_valid_ones_stored(ingest, storage):
    records: list[Any] = [
        msgspec.to_builtins(rec("ok 0")),
        {**msgspec.to_builtins(rec()), "timestamp": "yesterday-ish"},
        {**msgspec.to_builtins(rec()), "level": "LOUD"},
        msgspec.to_builtins(rec("x" * (10 * 1024 + 1))),
        {**msgspec.to_builtins(rec()), "context": {"blob": "y" * (50 * 1024)}},
        {**msgspec.to_builtins(rec()), "level": 7, "message": 3},
        {"timestamp": NOW.isoformat(), "level": "INFO", "source": "web"},
        msgspec.to_builtins(rec("ok 7")),
    ]
    body = msgspec.msgpack.encode({"agent_id": "a", "batch_id": str(uuid.uuid4()), "host": "h", "records": records})
    resp = await ingest(body)
    out = await resp.json()
    assert resp.status == 200
    assert out["accepted"] == 2
    errors = {r["index"]: r["error"] for r in out["rejected"]}
    assert sorted(errors) == [1, 2, 3, 4, 5, 6]
    assert errors[1].startswith("timestamp:")
    assert errors[2].startswith("level:")
    assert "message" in errors[3] and "10 KB" in errors[3]
    assert "context" in errors[4] and "50 KB" in errors[4]
    assert "`level`" in errors[5]
    assert "message" in errors[6]
    assert [r["message"] for r in await stored(storage)] == ["ok 0", "ok 7"]


async def test_message_of_exactly_10_kb_is_accepted(ingest, storage):
    resp = await ingest(encode_batch(batch([rec("m" * 10 * 1024)])))
    assert (await resp.json())["accepted"] == 1


async def test_undecodable_body_is_400(ingest):
    resp = await ingest(b"\xc1\xc1 not msgpack")
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "bad_request"


async def test_missing_invalid_and_wrong_kind_tokens(app_client, tokens, ingest):
    body = encode_batch(batch([rec()]))
    resp = await app_client.post("/v1/ingest", data=body, headers=MSGPACK)
    assert resp.status == 401
    resp = await ingest(body, token_="not-a-token")
    assert resp.status == 401
    user = tokens.create("user")
    resp = await ingest(body, token_=user)
    assert resp.status == 403


async def test_unknown_content_type_and_encoding_are_415(ingest):
    body = encode_batch(batch([rec()]))
    assert (await ingest(body, {"Content-Type": "text/csv"})).status == 415
    assert (await ingest(body, {"Content-Encoding": "lz4"})).status == 415


async def test_body_over_the_limit_is_413(make_client, make_config, tokens):
    client = await make_client(make_config(ingest={"max_body": "1KiB"}))
    token = tokens.create("ingest")
    body = encode_batch(batch([rec("z" * 3000)]))
    resp = await client.post("/v1/ingest", data=body, headers={**MSGPACK, **tokens.headers(token)})
    assert resp.status == 413
    assert "limit" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
async def test_decompression_bombs_stop_at_the_limit(make_client, make_config, tokens, encoding):
    client = await make_client(make_config(ingest={"max_decompressed": "1MiB"}))
    token = tokens.create("ingest")
    payload = b"\0" * (200 * 1024 * 1024)
    bomb = zstandard.compress(payload, 19) if encoding == "zstd" else gzip.compress(payload, 9)
    assert len(bomb) < 1024 * 1024
    resp = await client.post("/v1/ingest", data=bomb,
                             headers={**MSGPACK, **tokens.headers(token), "Content-Encoding": encoding})
    assert resp.status == 413
    assert "decompressed" in (await resp.json())["error"]["message"]


async def test_a_resent_batch_is_stored_once_even_after_a_restart(make_client, make_config, tokens, storage):
    token = tokens.create("ingest")
    headers = {**MSGPACK, **tokens.headers(token)}
    body = encode_batch(batch([rec("once"), rec("twice?")], batch_id="batch-1"))
    first = await make_client(make_config())
    assert (await (await first.post("/v1/ingest", data=body, headers=headers)).json())["duplicate"] is False
    assert (await (await first.post("/v1/ingest", data=body, headers=headers)).json())["duplicate"] is True
    await first.close()
    second = await make_client(make_config())  # a new collector on the same storage
    out = await (await second.post("/v1/ingest", data=body, headers=headers)).json()
    assert out == {"accepted": 0, "rejected": [], "duplicate": True, "features": FEATURES}
    assert len(await stored(storage)) == 2


async def test_a_batch_is_known_as_stored_by_the_insert_that_stored_its_logs(make_client, make_config, tokens,
                                                                             storage):
    """A collector that stops right after storing a batch's logs (before any
    other write) must still recognise the agent's resend."""
    from collector.ingest import RetentionPolicy, build_rows, decode_body

    sent = batch([rec("stored just before the crash"), rec("and this one")], batch_id="crash-window")
    rows, rejected = build_rows(decode_body(encode_batch(sent), MSGPACK["Content-Type"]), None,
                                RetentionPolicy(make_config()))
    assert rejected == []
    await storage.insert_rows("application_logs", rows)  # the logs' insert, and nothing after it
    client = await make_client(make_config())  # the restarted collector
    token = tokens.create("ingest")
    resp = await client.post("/v1/ingest", data=encode_batch(sent), headers={**MSGPACK, **tokens.headers(token)})
    assert await resp.json() == {"accepted": 0, "rejected": [], "duplicate": True, "features": FEATURES}
    assert len(await stored(storage)) == 2


async def test_a_batch_whose_every_record_was_rejected_is_a_duplicate_when_resent(ingest, storage):
    body = encode_batch(batch([rec(level="LOUD")], batch_id="all-bad"))
    first = await (await ingest(body)).json()
    assert first["accepted"] == 0 and first["duplicate"] is False and len(first["rejected"]) == 1
    again = await (await ingest(body)).json()
    assert again["duplicate"] is True and again["rejected"] == first["rejected"]


@pytest.mark.parametrize("journal", ["on", "off"])
async def test_a_resent_batch_is_answered_with_what_its_first_request_rejected(make_client, make_config, tokens,
                                                                             storage, chdb_dsn, journal):
    """An agent that lost the first answer (it crashed before writing its
    dead-letter file, or the connection dropped) learns from the resend's
    answer which records to dead-letter, even from a restarted collector."""
    storage_config: dict[str, Any] = {"dsn": chdb_dsn, "database": "unused"}
    if journal == "off":
        storage_config["journal"] = "off"
    token = tokens.create("ingest")
    headers = {**MSGPACK, **tokens.headers(token)}
    body = encode_batch(batch([rec("kept"), rec(level="LOUD"), rec("kept too"), rec(timestamp="soon")],
                              batch_id="half-bad"))
    first = await make_client(make_config(storage=storage_config))
    answer = await (await first.post("/v1/ingest", data=body, headers=headers)).json()
    assert answer["accepted"] == 2 and answer["duplicate"] is False
    assert [r["index"] for r in answer["rejected"]] == [1, 3]
    again = await (await first.post("/v1/ingest", data=body, headers=headers)).json()
    assert again == {"accepted": 0, "rejected": answer["rejected"], "duplicate": True, "features": FEATURES}
    clean = encode_batch(batch([rec("all good")], batch_id="clean"))
    assert (await (await first.post("/v1/ingest", data=clean, headers=headers)).json())["rejected"] == []
    await first.close()
    second = await make_client(make_config(storage=storage_config))  # a new collector on the same storage
    after = await (await second.post("/v1/ingest", data=body, headers=headers)).json()
    assert after == {"accepted": 0, "rejected": answer["rejected"], "duplicate": True, "features": FEATURES}
    assert (await (await second.post("/v1/ingest", data=clean, headers=headers)).json())["rejected"] == []
    assert [r["message"] for r in await stored(storage)] == ["all good", "kept", "kept too"]


async def test_concurrent_copies_of_one_batch_store_it_once(ingest, storage):
    body = encode_batch(batch([rec(f"c{i}") for i in range(50)], batch_id="same-batch"))
    responses = await asyncio.gather(*(ingest(body) for _ in range(8)))
    results = [await r.json() for r in responses]
    assert sum(not r["duplicate"] for r in results) == 1
    assert len(await stored(storage)) == 50


async def test_back_pressure_answers_429_with_retry_after(make_client, make_config, tokens, chdb_dsn):
    # Journaled (the default): the rows of the first batch wait for a flush a
    # minute away; the next batch is refused until ClickHouse has them.
    client = await make_client(make_config(ingest={"max_pending_rows": 3},
                                           storage={"dsn": chdb_dsn, "database": "unused",
                                                    "journal_flush_interval": "60s"}))
    token = tokens.create("ingest")
    resp = await client.post("/v1/ingest", data=encode_batch(batch([rec("a"), rec("b")])),
                             headers={**MSGPACK, **tokens.headers(token)})
    assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/ingest", data=encode_batch(batch([rec("c"), rec("d")])),
                             headers={**MSGPACK, **tokens.headers(token)})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    assert "waiting for ClickHouse" not in await resp.text()  # the answer says what to do, not internals


async def test_back_pressure_without_the_journal(make_client, make_config, tokens, chdb_dsn):
    client = await make_client(make_config(ingest={"max_pending_rows": 1},
                                           storage={"dsn": chdb_dsn, "database": "unused", "journal": "off"}))
    token = tokens.create("ingest")
    resp = await client.post("/v1/ingest", data=encode_batch(batch([rec("a"), rec("b")])),
                             headers={**MSGPACK, **tokens.headers(token)})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"


async def test_records_sent_without_an_agent_are_redacted(ingest, storage):
    line = {"timestamp": NOW.isoformat(), "level": "ERROR", "source": "pay",
            "message": "charge failed for card 4111 1111 1111 1111 ssn 123-45-6789",
            "context": {"password": "hunter2", "order": 7}}
    resp = await ingest(json.dumps(line).encode(), {"Content-Type": "application/x-ndjson"})
    assert (await resp.json())["accepted"] == 1
    [row] = await stored(storage)
    assert "4111" not in row["message"] and "123-45-6789" not in row["message"]
    assert "hunter2" not in row["context"]
    assert json.loads(row["context"])["order"] == 7


async def test_retention_tier_follows_the_source_rules(make_client, make_config, tokens, storage):
    config = make_config(retention={"default_tier": "standard",
                                    "rules": [{"sources": ["pay*"], "tier": "enterprise"},
                                              {"sources": ["audit"], "tier": "premium"}]})
    client = await make_client(config)
    token = tokens.create("ingest")
    records = [rec("a", source="payments"), rec("b", source="audit"), rec("c", source="web")]
    await client.post("/v1/ingest", data=encode_batch(batch(records)), headers={**MSGPACK, **tokens.headers(token)})
    rows = await stored(storage)
    assert {r["source"]: r["retention_days"] for r in rows} == {"payments": 365, "audit": 90, "web": 30}


async def test_concurrent_requests_are_coalesced_into_few_inserts(ingest, app_client, storage):
    writer = app_client.server.app[appkeys.LOG_WRITER]
    before = writer.logs.flushes
    responses = await asyncio.gather(*(ingest(encode_batch(batch([rec(f"r{i}")]))) for i in range(40)))
    assert all(r.status == 200 for r in responses)
    assert writer.logs.flushes - before < 40
    assert len(await stored(storage)) == 40


async def test_stored_logs_are_published_to_pipelines(ingest, app_client):
    seen: list[dict[str, Any]] = []
    app_client.server.app[appkeys.EVENTS].subscribe("log", seen.extend)
    await ingest(encode_batch(batch([rec("event one", context={"k": 1})])))
    assert [e["message"] for e in seen] == ["event one"]
    assert seen[0]["context"] == {"k": 1} and seen[0]["timestamp"].tzinfo is not None


async def test_a_large_batch_is_built_in_slices_with_every_index_kept(ingest, storage):
    # Past ROWS_PER_SLICE records a batch is validated a thousand at a time;
    # rejections keep their index in the whole batch and every valid row is stored once.
    from collector.ingest import ROWS_PER_SLICE

    total = ROWS_PER_SLICE * 2 + 500
    bad = {3, ROWS_PER_SLICE, ROWS_PER_SLICE + 1, total - 1}
    records: list[Any] = [msgspec.to_builtins(rec(f"m {i:05d}")) for i in range(total)]
    for i in bad:
        records[i]["level"] = "LOUD"
    body = msgspec.msgpack.encode({"agent_id": "a", "batch_id": str(uuid.uuid4()), "host": "h", "records": records})
    resp = await ingest(body)
    out = await resp.json()
    assert resp.status == 200 and out["accepted"] == total - len(bad)
    assert [r["index"] for r in out["rejected"]] == sorted(bad)
    rows = await stored(storage)
    assert [r["message"] for r in rows] == [f"m {i:05d}" for i in range(total) if i not in bad]
    assert len({r["id"] for r in rows}) == total - len(bad)


async def test_a_batch_redacted_with_the_collectors_own_rules_is_not_redacted_again(ingest, storage, app_client):
    # Equal fingerprints: the sender's rules found everything the collector's would.
    # Shown with a card number the sender "missed": kept as sent. Any other
    # fingerprint (or none) and the collector redacts it.
    fingerprint = app_client.server.app[appkeys.REDACTOR].fingerprint
    card = "paid with 4111 1111 1111 1111"
    for source, claimed in (("same-rules", fingerprint), ("other-rules", "0" * 32), ("no-claim", "")):
        body = Batch(agent_id="a", batch_id=str(uuid.uuid4()), host="h", records=[rec(card, source=source)],
                     redacted_with=claimed)
        resp = await ingest(encode_batch(body))
        assert resp.status == 200, await resp.text()
    rows = {r["source"]: r["message"] for r in await stored(storage)}
    assert rows == {"same-rules": card, "other-rules": "paid with [REDACTED:credit_card]",
                    "no-claim": "paid with [REDACTED:credit_card]"}


def test_the_fast_timestamp_path_agrees_with_the_general_parser() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from agent.wire import parse_timestamp
    from collector.ingest import _stored_time, _ts

    def general(value: object) -> str | None:
        ts = parse_timestamp(value)
        return None if ts is None else _ts(ts)

    agent_form = st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2261, 12, 31)).map(
        lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z")
    python_form = st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2261, 12, 31),
                               timezones=st.just(dt.UTC)).map(lambda d: d.isoformat(timespec="microseconds"))
    offsets = st.tuples(agent_form, st.sampled_from(["+00:00", "+01:00", "-00:00", "+0000", "Z"])).map(
        lambda t: t[0][:-1] + t[1])
    shaped = st.tuples(st.text(min_size=10, max_size=10), st.text(min_size=8, max_size=8),
                       st.text(min_size=3, max_size=3)).map(lambda t: f"{t[0]}T{t[1]}.{t[2]}Z")

    @settings(max_examples=400, deadline=None)
    @given(st.one_of(agent_form, python_form, offsets, shaped, st.sampled_from([
        "2026-12-01T10:00:00.123456+00:00", "2026-12-01T10:00:00.999999Z", "2026-12-01T10:00:00.12345+00:00",
        "2026-12-01T10:00:00.123+00:00x", "2026-12-01T10:00:00.1234567+00:00",
        "2026-13-01T10:00:00.000Z", "2026-02-30T10:00:00.000Z", "1969-12-31T23:59:59.999Z",
        "2262-01-01T00:00:00.000Z", "2026-12-01T24:00:00.000Z", "2026-12-01T10:00:00.1a3Z",
        "2026-12-01T10:00:00.١٢٣Z", "２０26-12-01T10:00:00.000Z", "2026-12-01T10-00-00.000Z",
        "2026-12-01T10:00+00.000Z", "+026-12-01T10:00:00.000Z", "2026-12-01t10:00:00.000Z",
        "2026-12-01T10:60:00.000Z", "2026-12-01T10:00:60.000Z", "2026-12-01T10:99:00.000Z",
        "2026-12-01T10:59:59.999Z", "2026-12-01T23:59:59.999999+00:00"])))
    def agree(value: str) -> None:
        assert _stored_time(value) == general(value)

    agree()


@pytest.mark.parametrize("kind", ["msgpack", "json"])
def test_a_batch_decodes_to_the_same_records_whole_or_one_record_at_a_time(kind: str) -> None:
    """Valid batches are decoded in one call; one bad record makes the decoder
    go record by record. Either way every record keeps its index."""
    from agent.wire import decode_json_batch, decode_msgpack_batch

    good = [msgspec.to_builtins(rec(f"r{i}", tags=["t"], context={"i": i})) for i in range(5)]
    bad = [*good[:2], {**good[2], "level": 7}, *good[3:]]
    encode = msgspec.msgpack.encode if kind == "msgpack" else msgspec.json.encode
    decode = decode_msgpack_batch if kind == "msgpack" else decode_json_batch
    whole = decode(encode({"agent_id": "a", "batch_id": "b", "host": "h", "records": good}))
    assert [(i, r.message) for i, r in whole.records] == [(i, f"r{i}") for i in range(5)]
    assert whole.errors == [] and whole.records[4][1].context == {"i": 4} and whole.batch_id == "b"
    split = decode(encode({"agent_id": "a", "batch_id": "b", "host": "h", "records": bad}))
    assert [i for i, _ in split.records] == [0, 1, 3, 4] and [i for i, _ in split.errors] == [2]
    assert [r for i, r in split.records] == [r for i, r in whole.records if i != 2]
    if kind == "msgpack":
        assert (whole.lines_index, split.lines_index) == (5, 5)


@pytest.mark.parametrize(("field", "good", "bad", "reason"), [
    ("source", "s" * 256, "s" * 257, "source: must be 1–256 characters"),
    ("source", "s", "", "source: must be 1–256 characters"),
    *((name, "v" * 4096, "v" * 4097, f"{name}: longer than 4096 characters")
      for name in ("user_id", "session_id", "request_id", "ip_address", "user_agent")),
    ("error_stack", "e" * (256 * 1024), "e" * (256 * 1024 + 1), "error_stack: larger than 262144 bytes"),
    ("tags", ["t"] * 64, ["t"] * 65, "tags: at most 64 tags of at most 256 characters"),
    ("tags", ["t" * 256, "u"], ["u", "t" * 257], "tags: at most 64 tags of at most 256 characters"),
    ("duration_ms", 0.0, -0.5, "duration_ms: must be a non-negative number"),
    ("duration_ms", 1e12 - 1, 1e12, "duration_ms: must be a non-negative number"),
])
def test_each_field_limit_is_enforced_at_its_boundary(field: str, good: Any, bad: Any, reason: str) -> None:
    from collector.ingest import validate_record

    row, error = validate_record(rec(**{field: good}))
    assert error is None and row is not None and row[field] == good
    row, error = validate_record(rec(**{field: bad}))
    assert row is None and error == reason


def test_a_row_holds_every_column_and_the_extra_ones_given() -> None:
    from collector.ingest import validate_record

    row, _ = validate_record(rec("m", context={"k": 1}, tags=None, host=None, file=None, offset=None),
                             {"agent_id": "a", "batch_id": "b"})
    assert row is not None
    assert row["context"] == '{"k":1}' and row["tags"] == [] and row["host"] == "" and row["file"] == ""
    assert row["offset"] == 0 and row["agent_id"] == "a" and row["batch_id"] == "b"
    assert row["timestamp"] == NOW.strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
