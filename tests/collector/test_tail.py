"""GET /v1/logs/tail: live server-sent events, filtered and scoped like queries."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import jwt
import orjson

from collector.auth import TokenScope


class SseReader:
    """Reads server-sent events (and comments) off an aiohttp response."""

    def __init__(self, resp):
        self.resp = resp
        self.comments: list[str] = []

    async def next(self, timeout: float = 3.0) -> dict | None:
        """The next event as {"id", "event", "data"}; None when the stream ends."""
        event: dict = {}
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no event in time")
            raw = await asyncio.wait_for(self.resp.content.readline(), remaining)
            if not raw:
                return None
            line = raw.decode().rstrip("\n")
            if not line:
                if "event" in event or "data" in event:
                    return event
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(": ")
            event[name] = value

    async def logs(self, n: int, timeout: float = 3.0) -> list[dict]:
        out = []
        while len(out) < n:
            event = await self.next(timeout)
            assert event is not None, "stream ended"
            if event.get("event") == "log":
                log = orjson.loads(event["data"])
                log["_event_id"] = event.get("id")
                out.append(log)
        return out


async def ingest(client, tokens, token, *records: dict) -> None:
    now = dt.datetime.now(dt.UTC).isoformat()
    body = {"agent_id": "t", "batch_id": str(uuid.uuid4()), "host": "h",
            "records": [{"timestamp": now, "level": "INFO", "source": "web", "message": "m", **r} for r in records]}
    resp = await client.post("/v1/ingest", json=body, headers=tokens.headers(token))
    assert resp.status == 200, await resp.text()


async def open_tail(client, tokens, token, headers=None, **params):
    resp = await client.get("/v1/logs/tail", params=params, headers={**tokens.headers(token), **(headers or {})})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    reader = SseReader(resp)
    assert "tailing" in (await asyncio.wait_for(resp.content.readline(), 3)).decode() + \
        (await asyncio.wait_for(resp.content.readline(), 3)).decode()
    return resp, reader


async def test_matching_logs_arrive_within_a_second(app_client, tokens, admin_token):
    ingest_token = tokens.create("ingest")
    resp, reader = await open_tail(app_client, tokens, admin_token, level="WARN", source="pay*", q="card")
    started = time.monotonic()
    await ingest(app_client, tokens, ingest_token,
                 {"level": "ERROR", "source": "payments", "message": "card declined", "context": {"k": 1}},
                 {"level": "INFO", "source": "payments", "message": "card ok"},
                 {"level": "ERROR", "source": "web", "message": "card declined"},
                 {"level": "ERROR", "source": "payments", "message": "timeout"})
    [log] = await reader.logs(1, timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert log["message"] == "card declined" and log["source"] == "payments" and log["context"] == {"k": 1}
    assert log["timestamp"].endswith("Z") and log["_event_id"]
    # Nothing else matched.
    await ingest(app_client, tokens, ingest_token, {"level": "CRITICAL", "source": "pay", "message": "card x"})
    [log] = await reader.logs(1)
    assert log["message"] == "card x"
    resp.close()


async def test_a_logs_token_tail_is_held_to_its_scope(app_client, tokens, admin_token):
    token = tokens.create("logs", scope=TokenScope(sources=["payments-*"], min_level="ERROR"))
    resp, reader = await open_tail(app_client, tokens, token, source="*", level="DEBUG")
    await ingest(app_client, tokens, admin_token,
                 {"level": "DEBUG", "source": "payments-api", "message": "below the scope"},
                 {"level": "CRITICAL", "source": "web", "message": "outside the sources"},
                 {"level": "ERROR", "source": "payments-api", "message": "in scope"})
    logs = await reader.logs(1)
    assert [log["message"] for log in logs] == ["in scope"]
    with_timeout = asyncio.wait_for(reader.logs(1), 0.5)
    try:
        extra = await with_timeout
    except TimeoutError:
        extra = []
    assert extra == []
    resp.close()


async def test_heartbeats_keep_an_idle_tail_open(make_client, make_config, tokens, admin_token):
    client = await make_client(make_config(query={"tail_heartbeat": "1s"}))
    resp, reader = await open_tail(client, tokens, admin_token)
    try:
        await reader.next(timeout=2.5)
    except TimeoutError:
        pass
    assert "ping" in reader.comments
    resp.close()


async def test_concurrent_tails_are_capped_per_token(make_client, make_config, tokens, admin_token):
    client = await make_client(make_config(query={"tail_max_per_token": 2}))
    other = tokens.create("admin")
    first, _ = await open_tail(client, tokens, admin_token)
    second, _ = await open_tail(client, tokens, admin_token)
    resp = await client.get("/v1/logs/tail", headers=tokens.headers(admin_token))
    assert resp.status == 429
    assert "2" in (await resp.json())["error"]["message"]
    third, _ = await open_tail(client, tokens, other)  # another token has its own allowance
    first.close()
    for _ in range(50):  # the slot frees when the server sees the disconnect
        resp = await client.get("/v1/logs/tail", headers=tokens.headers(admin_token))
        if resp.status == 200:
            break
        await asyncio.sleep(0.05)
    assert resp.status == 200
    for r in (second, third, resp):
        r.close()


async def test_last_event_id_resumes_from_storage_without_gaps_or_duplicates(app_client, tokens, admin_token):
    resp, reader = await open_tail(app_client, tokens, admin_token, source="svc")
    await ingest(app_client, tokens, admin_token, {"source": "svc", "message": "one"})
    [first] = await reader.logs(1)
    resp.close()
    # Missed while disconnected (later timestamps than the last event seen).
    for i in range(3):
        await asyncio.sleep(0.002)
        await ingest(app_client, tokens, admin_token, {"source": "svc", "message": f"missed {i}"},
                     {"source": "other", "message": "not mine"})
    resp, reader = await open_tail(app_client, tokens, admin_token, headers={"Last-Event-ID": first["_event_id"]},
                                   source="svc")
    missed = await reader.logs(3)
    assert [log["message"] for log in missed] == ["missed 0", "missed 1", "missed 2"]
    await ingest(app_client, tokens, admin_token, {"source": "svc", "message": "live again"})
    [live] = await reader.logs(1)
    assert live["message"] == "live again"
    resp.close()
    bad = await app_client.get("/v1/logs/tail", headers={**tokens.headers(admin_token), "Last-Event-ID": "forged"})
    assert bad.status == 400 and "Last-Event-ID" in (await bad.json())["error"]["message"]


async def test_a_revoked_token_tail_ends(app_client, tokens, admin_token):
    token = tokens.create("logs", scope=TokenScope(sources=["*"]))
    _, reader = await open_tail(app_client, tokens, token)
    token_id = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert (await app_client.delete(f"/v1/tokens/{token_id}", headers=tokens.headers(admin_token))).status == 200
    event = await reader.next(timeout=2.5)
    assert event is not None and event["event"] == "error" and "unauthorized" in event["data"]
    assert await reader.next(timeout=2.5) is None


async def test_a_client_that_falls_behind_is_told_to_resume(make_client, make_config, tokens, admin_token):
    client = await make_client(make_config(query={"tail_buffer": 100}))
    resp, reader = await open_tail(client, tokens, admin_token)
    # 150 logs in one batch before the handler gets to run: more than the buffer.
    await ingest(client, tokens, admin_token, *({"message": f"m{i}"} for i in range(150)))
    events = []
    while (event := await reader.next()) is not None:
        events.append(event)
    assert events[-1]["event"] == "overflow"
    resp.close()


async def test_bad_tail_parameters_are_refused(app_client, tokens, admin_token):
    for params, name in (({"level": "LOUD"}, "level"), ({"limit": "5"}, "limit"), ({"q": "%"}, "q")):
        resp = await app_client.get("/v1/logs/tail", params=params, headers=tokens.headers(admin_token))
        assert resp.status == 400
        assert (await resp.json())["error"]["message"].startswith(f"{name}:")


async def test_resume_delivers_late_logs_stored_while_away(app_client, tokens, admin_token):
    """Logs stored while the client was away whose own timestamps are older
    than the last event it saw (a late agent, a backfill) still reach it on
    resume, in the order they were stored, and nothing it saw comes again."""
    resp, reader = await open_tail(app_client, tokens, admin_token, source="svc")
    await ingest(app_client, tokens, admin_token, {"source": "svc", "message": "seen"})
    [seen] = await reader.logs(1)
    resp.close()
    an_hour_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    await ingest(app_client, tokens, admin_token, {"source": "svc", "message": "late", "timestamp": an_hour_ago})
    await ingest(app_client, tokens, admin_token, {"source": "svc", "message": "on time"},
                 {"source": "svc", "message": "on time too"})
    resp, reader = await open_tail(app_client, tokens, admin_token, headers={"Last-Event-ID": seen["_event_id"]},
                                   source="svc")
    missed = await reader.logs(3)
    assert missed[0]["message"] == "late"
    assert sorted(log["message"] for log in missed[1:]) == ["on time", "on time too"]
    # Resuming from the middle of a batch: only what came after it in ingest order.
    resp.close()
    resp, reader = await open_tail(app_client, tokens, admin_token, headers={"Last-Event-ID": missed[1]["_event_id"]},
                                   source="svc")
    [last] = await reader.logs(1)
    assert last["message"] == missed[2]["message"]
    await ingest(app_client, tokens, admin_token, {"source": "svc", "message": "live"})
    [live] = await reader.logs(1)
    assert live["message"] == "live"
    resp.close()
