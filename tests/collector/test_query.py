"""GET /v1/logs: filters, paging, exports and parameter errors, against chDB."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import orjson
import pytest

from collector.logquery import Cursor, decode_cursor, encode_cursor, split_search, tokens_of

NOW = dt.datetime.now(dt.UTC)


def ago(**kw: float) -> dt.datetime:
    return NOW - dt.timedelta(**kw)


async def get(client, token, tokens, **params):
    resp = await client.get("/v1/logs", params=params, headers=tokens.headers(token))
    body = await resp.json()
    return resp.status, body


async def test_recent_logs_by_level_is_one_call(app_client, admin_token, tokens, add_logs):
    """The spec's query 1: level >= WARN in the last hour, newest first."""
    add_logs({"level": "INFO", "timestamp": ago(minutes=1), "message": "fine"},
             {"level": "WARN", "timestamp": ago(minutes=2), "message": "warned"},
             {"level": "CRITICAL", "timestamp": ago(minutes=3), "message": "on fire"},
             {"level": "ERROR", "timestamp": ago(hours=2), "message": "too old"})
    status, body = await get(app_client, admin_token, tokens, level="WARN")
    assert status == 200, body
    assert [log["message"] for log in body["logs"]] == ["warned", "on fire"]
    assert body["next_cursor"] is None


async def test_logs_carry_every_field_of_the_spec(app_client, admin_token, tokens, add_logs):
    [row] = add_logs({"level": "ERROR", "source": "api", "message": 'boom "quoted"\nline',
                      "context": '{"order": 7, "nested": {"a": [1, 2]}}', "user_id": "u1", "session_id": "s1",
                      "request_id": "r1", "ip_address": "10.0.0.1", "user_agent": "curl/8", "duration_ms": 12.5,
                      "error_stack": "Traceback ...", "tags": ["checkout", "eu"], "timestamp": ago(minutes=1)})
    status, body = await get(app_client, admin_token, tokens)
    assert status == 200
    [log] = body["logs"]
    assert log["id"] == row["id"]
    assert log["timestamp"] == row["timestamp"].replace(" ", "T") + "Z"
    assert log["context"] == {"order": 7, "nested": {"a": [1, 2]}}
    assert log["message"] == 'boom "quoted"\nline'
    for name in ("level", "source", "user_id", "session_id", "request_id", "ip_address", "user_agent",
                 "duration_ms", "error_stack", "tags"):
        assert log[name] == row[name], name


async def test_source_globs_and_repeated_sources(app_client, admin_token, tokens, add_logs):
    add_logs(*({"source": s, "message": s} for s in ("payments-api", "payments-worker", "web", "payments_x",
                                                      "paymentsXapi")))
    _, body = await get(app_client, admin_token, tokens, source="payments-*")
    assert sorted(log["source"] for log in body["logs"]) == ["payments-api", "payments-worker"]
    _, body = await get(app_client, admin_token, tokens, source=["web", "payments-w?rker"])
    assert sorted(log["source"] for log in body["logs"]) == ["payments-worker", "web"]
    # LIKE's own wildcards are plain characters in a glob.
    _, body = await get(app_client, admin_token, tokens, source="payments_*")
    assert [log["source"] for log in body["logs"]] == ["payments_x"]
    _, body = await get(app_client, admin_token, tokens, source="%")
    assert body["logs"] == []


async def test_full_text_words_phrases_and_tags(app_client, admin_token, tokens, add_logs):
    add_logs({"message": "Upstream request TIMEOUT after 3 retries", "timestamp": ago(minutes=1)},
             {"message": "request served", "timestamp": ago(minutes=2)},
             {"message": "retries exhausted", "tags": ["timeout"], "timestamp": ago(minutes=3)},
             {"message": "timeout after request", "timestamp": ago(minutes=4)},
             {"message": "charged", "tags": ["Payment-EU"], "timestamp": ago(minutes=5)})
    _, body = await get(app_client, admin_token, tokens, q="timeout request")
    assert [log["message"] for log in body["logs"]] == ["Upstream request TIMEOUT after 3 retries",
                                                        "timeout after request"]
    _, body = await get(app_client, admin_token, tokens, q='"request timeout"')
    assert [log["message"] for log in body["logs"]] == ["Upstream request TIMEOUT after 3 retries"]
    _, body = await get(app_client, admin_token, tokens, q="timeout")
    assert len(body["logs"]) == 3  # the tag matches too
    _, body = await get(app_client, admin_token, tokens, tag="timeout")
    assert [log["message"] for log in body["logs"]] == ["retries exhausted"]
    # Tags are searched whatever their case, like the message.
    _, body = await get(app_client, admin_token, tokens, q="PAYMENT eu")
    assert [log["message"] for log in body["logs"]] == ["charged"]
    _, body = await get(app_client, admin_token, tokens, q="nothing-like-this")
    assert body["logs"] == []


async def test_id_filters(app_client, admin_token, tokens, add_logs):
    add_logs({"user_id": "u1", "session_id": "s1", "request_id": "r1", "message": "a"},
             {"user_id": "u1", "session_id": "s2", "request_id": "r2", "message": "b"},
             {"user_id": "u2", "message": "c"})
    _, body = await get(app_client, admin_token, tokens, user_id="u1")
    assert sorted(log["message"] for log in body["logs"]) == ["a", "b"]
    _, body = await get(app_client, admin_token, tokens, user_id="u1", session_id="s2")
    assert [log["message"] for log in body["logs"]] == ["b"]
    _, body = await get(app_client, admin_token, tokens, request_id="r1")
    assert [log["message"] for log in body["logs"]] == ["a"]


async def test_absolute_and_relative_ranges(app_client, admin_token, tokens, add_logs):
    add_logs({"message": "recent", "timestamp": ago(minutes=30)},
             {"message": "older", "timestamp": ago(hours=5)},
             {"message": "oldest", "timestamp": ago(days=3)})
    _, body = await get(app_client, admin_token, tokens, start="-6h")
    assert [log["message"] for log in body["logs"]] == ["recent", "older"]
    start = ago(days=4).isoformat().replace("+00:00", "Z")
    end = ago(hours=4).isoformat().replace("+00:00", "Z")
    _, body = await get(app_client, admin_token, tokens, start=start, end=end, order="asc")
    assert [log["message"] for log in body["logs"]] == ["oldest", "older"]
    _, body = await get(app_client, admin_token, tokens, start=str(int(ago(hours=6).timestamp())), end="now")
    assert [log["message"] for log in body["logs"]] == ["recent", "older"]


@pytest.mark.parametrize("order", ["desc", "asc"])
async def test_paging_visits_every_log_once_in_order(app_client, admin_token, tokens, add_logs, order):
    # Many logs share a millisecond: the id breaks ties.
    rows = add_logs(*({"message": f"m{i}", "timestamp": ago(minutes=10) + dt.timedelta(milliseconds=i // 7)}
                      for i in range(95)))
    seen: list[dict] = []
    params: dict = {"limit": 10, "order": order, "start": "-1h"}
    pages = 0
    while True:
        _, body = await get(app_client, admin_token, tokens, **params)
        seen.extend(body["logs"])
        pages += 1
        if not body["next_cursor"]:
            break
        params["cursor"] = body["next_cursor"]
    assert pages == 10
    # (ClickHouse orders UUIDs by their two 64-bit halves, not as text.)
    stamps = [log["timestamp"] for log in seen]
    assert stamps == sorted(stamps, reverse=order == "desc")
    ids = [log["id"] for log in seen]
    assert len(ids) == len(set(ids)) == 95
    assert set(ids) == {r["id"] for r in rows}


async def test_cursor_pages_are_stable_while_logs_arrive(app_client, admin_token, tokens, add_logs):
    """Logs ingested while a client pages (newer, and late ones older than the
    cursor) and a relative range that moves on neither duplicate nor skip what
    the first page's range held."""
    original = add_logs(*({"message": f"m{i}", "timestamp": ago(minutes=50 - i)} for i in range(30)))
    paging_done = asyncio.Event()
    ingested = 0

    async def ingest_meanwhile() -> None:
        nonlocal ingested
        while not paging_done.is_set():
            now = dt.datetime.now(dt.UTC)
            records = [{"timestamp": now.isoformat(), "level": "INFO", "source": "web", "message": f"new{ingested}"},
                       {"timestamp": (now - dt.timedelta(minutes=49, seconds=30)).isoformat(), "level": "INFO",
                        "source": "web", "message": f"late{ingested}"}]
            resp = await app_client.post("/v1/ingest", json={"agent_id": "a", "batch_id": str(uuid.uuid4()),
                                                             "host": "h", "records": records},
                                         headers=tokens.headers(admin_token))
            assert resp.status == 200
            ingested += 1
            # An arrival rate the pages outrun: late logs land just ahead of an
            # ascending cursor that sits among them, so a client paging slower
            # than they arrive would chase them for ever (the journal
            # acknowledges a batch in a few ms).
            await asyncio.sleep(0.03)

    writer = asyncio.create_task(ingest_meanwhile())
    await asyncio.sleep(0.05)
    first_page_end: dt.datetime | None = None
    seen: list[dict] = []
    cursor = None
    while True:
        params = {"limit": 7, "start": "-55m", "order": "asc", **({"cursor": cursor} if cursor else {})}
        # The same relative `start` on every page: the cursor pins the first page's range.
        _, page = await get(app_client, admin_token, tokens, **params)
        first_page_end = first_page_end or dt.datetime.now(dt.UTC)
        seen.extend(page["logs"])
        cursor = page["next_cursor"]
        await asyncio.sleep(0.01)
        if not cursor:
            break
    paging_done.set()
    await writer
    assert ingested >= 3
    messages = [log["message"] for log in seen]
    assert len(messages) == len(set(messages))
    assert [m for m in messages if m.startswith("m")] == [r["message"] for r in original]
    # Logs newer than the first page's range are not mixed in.
    assert first_page_end is not None
    first_end = first_page_end.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert all(log["timestamp"] <= first_end for log in seen)


async def test_tampered_or_foreign_cursor_is_refused(app_client, admin_token, tokens, add_logs):
    add_logs(*({"message": f"m{i}"} for i in range(3)))
    _, body = await get(app_client, admin_token, tokens, limit=1)
    cursor = body["next_cursor"]
    body_part, sig = cursor.split(".")
    forged = encode_cursor(b"not-our-secret", Cursor(timestamp="2099-01-01 00:00:00.000",
                                                     id=str(uuid.uuid4()), order="desc"))
    flipped = body_part[:-2] + ("A" if body_part[-2] != "A" else "B") + body_part[-1] + "." + sig
    for bad in (forged, flipped, cursor + "x", "garbage", ".", cursor.split(".")[0], "a" * 5000):
        status, err = await get(app_client, admin_token, tokens, limit=1, cursor=bad)
        assert status == 400, bad
        assert err["error"]["message"].startswith("cursor:")
    status, err = await get(app_client, admin_token, tokens, limit=1, cursor=cursor, order="asc")
    assert status == 400 and "other order" in err["error"]["message"]


BAD_PARAMETERS = [
    ({"level": "LOUD"}, "level"),
    ({"level": "3"}, "level"),
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "-5"}, "limit"),
    ({"order": "sideways"}, "order"),
    ({"start": "yesterday"}, "start"),
    ({"end": "2026-13-45T00:00:00Z"}, "end"),
    ({"start": "-1h", "end": "-2h"}, "start"),
    ({"start": "-40d"}, "start"),
    ({"start": "nan"}, "start"),
    ({"start": "1e400"}, "start"),
    ({"color": "blue"}, "color"),
    ({"q": "x" * 1001}, "q"),
    ({"user_id": "x" * 5000}, "user_id"),
    ({"source": ""}, "source"),
    ({"user_id": "a\x00b"}, "user_id"),
    ({"q": "%%"}, "q"),
]


async def test_bad_parameters_name_themselves(app_client, admin_token, tokens):
    for params, param in BAD_PARAMETERS:
        status, body = await get(app_client, admin_token, tokens, **params)
        assert status == 400, (params, body)
        assert body["error"]["code"] == "bad_parameter"
        assert body["error"]["message"].startswith(f"{param}:"), body


async def test_repeated_single_parameter_is_refused(app_client, admin_token, tokens):
    resp = await app_client.get("/v1/logs?level=WARN&level=DEBUG", headers=tokens.headers(admin_token))
    assert resp.status == 400
    assert (await resp.json())["error"]["message"].startswith("level:")


async def test_max_range_is_configurable(make_client, make_config, admin_token, tokens):
    client = await make_client(make_config(query={"max_range": "2h"}))
    status, body = await get(client, admin_token, tokens, start="-3h")
    assert status == 400 and "2h" in body["error"]["message"]
    status, _ = await get(client, admin_token, tokens, start="-90m")
    assert status == 200


async def test_ndjson_streams_more_rows_than_one_page(make_client, make_config, admin_token, tokens, add_logs):
    client = await make_client(make_config(query={"export_page_rows": 100}))
    rows = add_logs(*({"message": f"m{i}", "timestamp": ago(minutes=30) + dt.timedelta(milliseconds=i // 3)}
                      for i in range(1234)))
    add_logs({"message": "other", "source": "api"})
    resp = await client.get("/v1/logs", params={"source": "web", "order": "asc"},
                            headers={**tokens.headers(admin_token), "Accept": "application/x-ndjson"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/x-ndjson")
    chunks = 0
    data = b""
    async for chunk in resp.content.iter_any():
        chunks += 1
        data += chunk
    lines = data.decode().splitlines()
    assert len(lines) == 1234
    logs = [orjson.loads(line) for line in lines]
    assert [log["timestamp"] for log in logs] == sorted(r["timestamp"].replace(" ", "T") + "Z" for r in rows)
    assert {log["id"] for log in logs} == {r["id"] for r in rows}
    assert all(log["source"] == "web" for log in logs)


async def test_ndjson_export_cap_ends_with_a_resumable_marker(make_client, make_config, admin_token, tokens,
                                                              add_logs):
    client = await make_client(make_config(query={"export_page_rows": 100, "export_max_rows": 150}))
    add_logs(*({"message": f"m{i}", "timestamp": ago(minutes=30, seconds=-i)} for i in range(200)))
    headers = {**tokens.headers(admin_token), "Accept": "application/x-ndjson"}
    resp = await client.get("/v1/logs", params={"order": "asc"}, headers=headers)
    lines = (await resp.read()).decode().splitlines()
    assert len(lines) == 151
    marker = orjson.loads(lines[-1])
    assert marker["truncated"] is True
    # The marker's cursor continues where the export stopped.
    resp = await client.get("/v1/logs", params={"order": "asc", "cursor": marker["next_cursor"], "limit": 1000},
                            headers=tokens.headers(admin_token))
    rest = (await resp.json())["logs"]
    assert [log["message"] for log in rest] == [f"m{i}" for i in range(150, 200)]


async def test_search_over_a_long_range_finds_old_rare_matches(app_client, admin_token, tokens, add_logs):
    """The windowed search still covers the whole range when matches are sparse."""
    add_logs(*({"message": "routine", "timestamp": ago(hours=h)} for h in range(0, 600, 3)))
    add_logs({"message": "deadlock detected", "timestamp": ago(days=20)},
             {"message": "deadlock again", "timestamp": ago(days=2)})
    _, body = await get(app_client, admin_token, tokens, q="deadlock", start="-30d", limit=5)
    assert [log["message"] for log in body["logs"]] == ["deadlock again", "deadlock detected"]
    _, body = await get(app_client, admin_token, tokens, q="deadlock", start="-30d", limit=1)
    assert [log["message"] for log in body["logs"]] == ["deadlock again"]
    _, body = await get(app_client, admin_token, tokens, q="deadlock", start="-30d", limit=1,
                        cursor=body["next_cursor"])
    assert [log["message"] for log in body["logs"]] == ["deadlock detected"]


def test_search_syntax_matches_the_text_index_tokenizer():
    assert tokens_of("GET /api/v1/Orders?id=7 ÉCOLE") == ["get", "api", "v1", "orders", "id", "7", "École"]
    assert split_search('timeout "connection reset" db') == (["timeout", "db"], ["connection reset"])
    assert split_search('"unterminated phrase') == ([], [])


def test_cursor_round_trip_and_signature():
    secret = b"k" * 32
    cursor = Cursor(timestamp="2026-11-25 10:00:00.123", id=str(uuid.uuid4()), order="asc", start_ms=1, end_ms=2)
    assert decode_cursor(secret, encode_cursor(secret, cursor)) == cursor
    with pytest.raises(ValueError, match="cursor"):
        decode_cursor(b"x" * 32, encode_cursor(secret, cursor))


async def test_tail_matching_in_python_agrees_with_the_sql(storage, add_logs):
    """Tails filter in Python, queries in SQL: the same rows must match both ways."""
    from collector.auth import TokenScope
    from collector.logquery import LogQuery, apply_scope, build_where, matches

    rows = add_logs(
        {"source": "payments-api", "level": "ERROR", "message": "Card DECLINED by issuer", "tags": ["eu"]},
        {"source": "payments_x", "level": "WARN", "message": "card-declined", "tags": ["Retry"]},
        {"source": "web", "level": "INFO", "message": "declined card? no: accepted", "user_id": "u1"},
        {"source": "web?", "level": "CRITICAL", "message": "École fermée", "tags": ["école"]},
        {"source": "api", "level": "DEBUG", "message": "issuer timeout", "tags": ["timeout", "eu"],
         "request_id": "r1"},
    )
    queries = [
        {"words": ["card"]}, {"words": ["card", "declined"]}, {"phrases": ["card declined"]},
        {"phrases": ["DECLINED by"]}, {"words": ["timeout"]}, {"words": ["eu"]}, {"words": ["retry"]},
        {"words": ["École"]}, {"sources": ["payments-*"]}, {"sources": ["web?"]}, {"sources": ["web"]},
        {"sources": ["payments_*"]}, {"tags": ["eu"]}, {"user_id": "u1"}, {"request_id": "r1"},
        {"levels": ["WARN", "ERROR", "CRITICAL"]},
    ]
    scopes = [None, TokenScope(sources=["payments-*", "api"]), TokenScope(sources=["w*"], min_level="WARN")]
    start, end = NOW - dt.timedelta(hours=1), NOW + dt.timedelta(minutes=1)
    for fields in queries:
        for scope in scopes:
            scoped = apply_scope(LogQuery(start=start, end=end, **fields), scope)
            in_python = {r["id"] for r in rows if scoped is not None and matches(scoped, scope, r)}
            if scoped is None:
                in_sql: set[str] = set()
            else:
                b = build_where(scoped, scope)
                in_sql = {str(r["id"]) for r in storage.query_sync(
                    f"SELECT id FROM application_logs WHERE {b.sql()}", b.params)}
            assert in_python == in_sql, (fields, scope)


async def test_a_repeated_sparse_search_skips_the_windows_it_could_not_fill(
        app_client, admin_token, tokens, add_logs, storage):
    """A search whose first windows did not fill its page starts, when repeated
    within a minute, with the first window that did; a dense search keeps
    starting with the last hour. Every page is the one the windows give."""
    from collector import appkeys

    # ~12 heartbeats an hour for 7 days; 3 deadlocks.
    add_logs(*({"message": f"routine heartbeat {i}", "timestamp": ago(minutes=4.8 * i + 0.5)} for i in range(2100)))
    add_logs(*({"message": "deadlock detected", "timestamp": ago(hours=h)} for h in (1.5, 30, 100)))
    queries: list[str] = []
    client = storage.client
    original = client.raw_query

    def counting(sql, *args, **kwargs):
        queries.append(sql)
        return original(sql, *args, **kwargs)

    async def search(**params) -> tuple[list[str], int]:
        queries.clear()
        _, body = await get(app_client, admin_token, tokens, start="-7d", **params)
        return [log["message"] for log in body["logs"]], len([q for q in queries if "FROM application_logs" in q])

    client.raw_query = counting
    try:
        assert await search(q="deadlock", limit=10) == (["deadlock detected"] * 3, 3)  # 1 h, 1 d, the rest
        assert await search(q="deadlock", limit=10) == (["deadlock detected"] * 3, 1)  # the whole range at once
        assert await search(q="deadlock", limit=2) == (["deadlock detected"] * 2, 3)  # another shape: learns anew
        assert await search(q="deadlock", limit=2) == (["deadlock detected"] * 2, 1)
        page = [f"routine heartbeat {i}" for i in range(10)]
        assert await search(q="heartbeat", limit=10) == (page, 1)
        assert await search(q="heartbeat", limit=10) == (page, 1)
        assert await search(q="heartbeat", limit=100) == ([f"routine heartbeat {i}" for i in range(100)], 2)
        assert await search(q="heartbeat", limit=100) == ([f"routine heartbeat {i}" for i in range(100)], 1)
        # Forgotten after WINDOW_MEMORY_TTL: the windows are tried again.
        memory = app_client.server.app[appkeys.WINDOW_MEMORY]
        memory._unfilled = {k: (0.0, v) for k, (_, v) in memory._unfilled.items()}
        assert await search(q="deadlock", limit=10) == (["deadlock detected"] * 3, 3)
    finally:
        client.raw_query = original


async def test_read_settings_ride_in_the_query_itself(storage):
    """A read's settings are its own SETTINGS clause (chDB's client would
    otherwise SET and restore each around the query), they apply, and they
    do not outlive it."""
    from collector.logs_api import json_lines, settings_clause

    assert settings_clause({}) == ""
    assert (settings_clause({"max_execution_time": 5, "timeout_overflow_mode": "throw"})
            == " SETTINGS max_execution_time = 5, timeout_overflow_mode = 'throw'")
    for bad in ({"max_threads = 1, readonly": 1}, {"max_threads": "1'"}, {"max_threads": None},
                {"max_threads": True}):
        with pytest.raises(ValueError):
            settings_clause(bad)
    sql = "SELECT number FROM numbers(10)"
    with pytest.raises(Exception, match=r"TOO_MANY_ROWS|[Ll]imit for result"):
        await json_lines(storage, sql, {}, {"max_result_rows": 2, "result_overflow_mode": "throw"})
    assert await json_lines(storage, sql, {}, {}) == [str(n).encode() for n in range(10)]
