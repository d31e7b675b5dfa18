"""GET /v1/logs while logs wait in the write-ahead journal: they are matched
in memory and merged into the page (read-your-writes without waiting for the
journal's insert), and every page — content, order and cursors — is the one
the same query gives once they are in ClickHouse."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from typing import Any

import pytest

from agent.wire import Batch, Record, encode_batch
from collector.logs_api import MERGE_PENDING_MAX, uuid_order
from collector.storage import Storage

SOURCES = ["pay-api", "pay-worker", "web", "auth"]
LEVELS = ["DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"]
WORDS = ["timeout", "deadlock", "charged", "refund", "login"]


def _records(rng: random.Random, n: int, base: dt.datetime) -> list[Record]:
    out = []
    for _ in range(n):
        # Few distinct timestamps, so paging must break ties by id exactly as ClickHouse does.
        when = base - dt.timedelta(milliseconds=rng.choice([0, 1, 2, 500, 60_000]))
        words = " ".join(rng.sample(WORDS, 2))
        out.append(Record(timestamp=when.isoformat().replace("+00:00", "Z"), level=rng.choice(LEVELS),
                          source=rng.choice(SOURCES), message=f"{words} order {rng.randint(1, 99)}",
                          tags=rng.sample(["eu", "us", "beta"], rng.randint(0, 2)),
                          user_id=rng.choice([None, "u1", "u2"]), duration_ms=rng.choice([None, 1.5, 20.0]),
                          context={"attempt": rng.randint(1, 3)}))
    return out


QUERIES: list[dict[str, str]] = [
    {},
    {"order": "asc"},
    {"level": "WARN"},
    {"source": "pay-*"},
    {"q": "timeout"},
    {"q": '"deadlock charged"'},
    {"q": "refund", "order": "asc", "level": "ERROR"},
    {"tag": "eu"},
    {"user_id": "u1", "source": "web"},
]


async def _all_pages(client: Any, headers: dict[str, str], params: dict[str, str]) -> list[Any]:
    pages = []
    cursor = None
    while True:
        query = {**params, "start": "-1h", "limit": "7", **({"cursor": cursor} if cursor else {})}
        resp = await client.get("/v1/logs", params=query, headers=headers)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        pages.append(body["logs"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


async def test_pages_merge_the_journals_logs_exactly_as_clickhouse_pages_them(
        make_client: Any, make_config: Any, tokens: Any, storage: Storage, chdb_dsn: str) -> None:
    client = await make_client(make_config(storage={"dsn": chdb_dsn, "database": "unused",
                                                    "journal_flush_interval": "60s"}))
    ingest = {"Content-Type": "application/msgpack", **tokens.headers(tokens.create("ingest"))}
    admin = tokens.headers(tokens.create("admin"))
    rng = random.Random(11)
    base = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=2)
    # One batch reaches ClickHouse, the next two stay in the journal.
    for n, batch_id in enumerate(("stored", "pending-1", "pending-2")):
        body = encode_batch(Batch(agent_id="a", batch_id=batch_id, host="h", records=_records(rng, 40, base)))
        resp = await client.post("/v1/ingest", data=body, headers=ingest)
        assert (await resp.json())["accepted"] == 40
        if n == 0:
            await storage.run(storage.barrier, "SELECT 1 FROM application_logs")
    assert storage.journal is not None
    assert len(storage.journal.pending_rows("application_logs")) == 80
    merged = {str(q): await _all_pages(client, admin, q) for q in QUERIES}
    # No query waited for the journal: its logs are still only there.
    assert len(storage.journal.pending_rows("application_logs")) == 80
    await storage.run(storage.barrier, "SELECT 1 FROM application_logs")
    assert storage.journal.pending_rows("application_logs") == []
    for q in QUERIES:
        assert merged[str(q)] == await _all_pages(client, admin, q), q
    # The whole set was read: 120 logs, each once.
    everything = [log["id"] for page in merged[str({})] for log in page]
    assert len(everything) == len(set(everything)) == 120


def test_uuid_order_is_clickhouses(storage: Storage) -> None:
    ids = [str(uuid.uuid4()) for _ in range(200)] + [
        "00000000-0000-0001-0000-000000000000", "00000000-0000-0000-0000-000000000001",
        "ffffffff-ffff-ffff-0000-000000000000", "00000000-0000-0000-ffff-ffffffffffff"]
    got = [r["id"] for r in storage.query_sync(
        "SELECT toString(u) AS id FROM (SELECT arrayJoin({ids:Array(UUID)}) AS u) ORDER BY u", {"ids": ids})]
    assert got == sorted(ids, key=uuid_order)


async def test_a_large_backlog_is_waited_for_instead_of_matched_in_memory(
        make_client: Any, make_config: Any, tokens: Any, storage: Storage, chdb_dsn: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("collector.logs_api.MERGE_PENDING_MAX", 5)
    assert MERGE_PENDING_MAX > 5
    client = await make_client(make_config(storage={"dsn": chdb_dsn, "database": "unused",
                                                    "journal_flush_interval": "60s"}))
    ingest = {"Content-Type": "application/msgpack", **tokens.headers(tokens.create("ingest"))}
    records = _records(random.Random(3), 10, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    resp = await client.post("/v1/ingest", data=encode_batch(Batch(agent_id="a", batch_id="big", host="h",
                                                                   records=records)), headers=ingest)
    assert (await resp.json())["accepted"] == 10
    resp = await client.get("/v1/logs", params={"start": "-1h", "limit": "100"},
                            headers=tokens.headers(tokens.create("admin")))
    assert len((await resp.json())["logs"]) == 10
    assert storage.journal is not None and storage.journal.pending_rows("application_logs") == []
