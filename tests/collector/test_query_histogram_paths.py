"""The histogram's SQL paths (projection, rows, the split full-text count) all
count exactly what the query's filters match, and the timestamp codec."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter
from typing import Any

import orjson
import pytest

from collector.auth import TokenScope
from collector.histogram import (
    buckets_json,
    fill,
    histogram_sql,
    needs_rows,
    parse_counts,
    plan,
    rows_histogram_sql,
)
from collector.logquery import LogQuery, apply_scope, matches
from collector.schema import all_migrations, migrate
from collector.storage import Storage
from tests.collector.conftest import log_row

BASE = dt.datetime(2026, 11, 24, 10, 0, tzinfo=dt.UTC)
WORDS = ["timeout", "card", "declined", "retry", "eu", "beta"]
TAGS = [[], ["eu"], ["beta", "mobile"], ["timeout"], ["Retry", "eu-west"]]
MESSAGES = ["upstream TIMEOUT after retry", "card declined by issuer", "all good", "retry: card timeout",
            "eu customers see beta", "nothing to see", "Declined card; timeout"]


def _logs(n: int = 400) -> list[dict[str, Any]]:
    rng = random.Random(5)
    rows = []
    for i in range(n):
        rows.append({
            "timestamp": BASE + dt.timedelta(seconds=rng.uniform(0, 3 * 3600)),
            "level": rng.choice(["DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"]),
            "source": rng.choice(["web", "api", "payments-api", "payments-worker"]),
            "message": rng.choice(MESSAGES) + f" n{i % 7}",
            "tags": rng.choice(TAGS),
            "user_id": rng.choice([None, "u1", "u2"]),
        })
    # Ties on a bucket edge and on the range's edges.
    rows.append({"timestamp": BASE, "level": "WARN", "message": "card on the start edge"})
    rows.append({"timestamp": BASE + dt.timedelta(minutes=10), "level": "WARN", "message": "card on a bucket edge",
                 "tags": ["card"]})
    return rows


def counts(storage: Storage, sql: str, params: dict[str, Any]) -> list[tuple[int, str, int]]:
    """The counts as the endpoint reads them (raw TSV lines)."""
    raw = bytes(storage.client.raw_query(sql, parameters=params, fmt="TSVRaw"))
    return list(parse_counts(raw.split(b"\n")[:-1]))


def _oracle(query: LogQuery, scope: TokenScope | None, h: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The histogram computed in Python with the tails' matcher."""
    per: Counter[tuple[int, str]] = Counter()
    start, end = h.start.timestamp(), h.end.timestamp()
    for row in rows:
        ts = dt.datetime.strptime(row["timestamp"], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC).timestamp()
        if start <= ts < end and matches(query, scope, row):
            per[(int(ts // h.interval) * h.interval, row["level"])] += 1
    return fill(h, [(bucket, level, n) for (bucket, level), n in per.items()])


QUERIES: list[dict[str, Any]] = [
    {}, {"words": ["timeout"]}, {"words": ["card", "declined"]}, {"words": ["eu"]}, {"words": ["beta", "timeout"]},
    {"words": ["retry"]}, {"words": ["card"], "levels": ["WARN", "ERROR", "CRITICAL"]},
    {"phrases": ["card declined"]}, {"words": ["timeout"], "phrases": ["card timeout"]},
    {"tags": ["eu"]}, {"tags": ["beta"], "words": ["mobile"]}, {"user_id": "u1", "words": ["card"]},
    {"sources": ["payments-*"], "words": ["timeout", "eu"]}, {"levels": ["ERROR"]},
]
SCOPES = [None, TokenScope(sources=["payments-*"]), TokenScope(sources=["web", "api"], min_level="WARN")]


@pytest.mark.parametrize("interval", ["1m", "10m", "7s", "1h"])
def test_every_sql_path_counts_what_the_filters_match(storage: Storage, add_logs, interval: str) -> None:
    rows = add_logs(*_logs())
    start, end = BASE - dt.timedelta(seconds=30), BASE + dt.timedelta(hours=3, seconds=1)
    for fields in QUERIES:
        for scope in SCOPES:
            query = apply_scope(LogQuery(start=start, end=end, **fields), scope)
            if query is None:
                continue
            h = plan(query, interval, 10_000)
            sql, params = histogram_sql(query, scope, h)
            got = fill(h, counts(storage, sql, params))
            assert got == _oracle(query, scope, h, rows), (fields, scope, interval)
            if not needs_rows(query):
                # The projection's answer and the rows' answer agree.
                sql, params = rows_histogram_sql(query, scope, h)
                assert fill(h, counts(storage, sql, params)) == got, (fields, scope, interval)


def test_full_text_counts_each_log_once_whether_it_matches_by_message_or_tag(storage: Storage, add_logs) -> None:
    add_logs({"timestamp": BASE, "message": "timeout in message"},
             {"timestamp": BASE, "message": "quiet", "tags": ["timeout"]},
             {"timestamp": BASE, "message": "timeout twice", "tags": ["timeout"]},
             {"timestamp": BASE, "message": "card only", "tags": ["mobile"]},
             {"timestamp": BASE, "message": "mobile card", "tags": ["beta"]},
             {"timestamp": BASE, "message": "nothing"})
    query = LogQuery(start=BASE, end=BASE + dt.timedelta(minutes=1))
    h = plan(query, "1m", 100)

    def total(**fields: Any) -> int:
        sql, params = histogram_sql(LogQuery(start=query.start, end=query.end, **fields), None, h)
        return sum(n for _, _, n in counts(storage, sql, params))

    assert total(words=["timeout"]) == 3
    assert total(words=["card", "mobile"]) == 2  # one word from the tags, one from the message
    assert total(words=["mobile"]) == 2
    assert total(words=["beta", "card"]) == 1
    assert total(words=["absent"]) == 0


def test_log_timestamps_use_the_fast_codec(storage: Storage) -> None:
    [row] = storage.query_sync("SELECT compression_codec AS codec FROM system.columns WHERE database = {db:String} "
                               "AND table = 'application_logs' AND name = 'timestamp'", {"db": storage.database})
    assert row["codec"] == "CODEC(T64, LZ4)"



def test_the_codec_migration_keeps_stored_logs_readable(chdb_dsn: str) -> None:
    """Upgrading a database that holds logs: migration 14 changes the codec for
    new parts; parts written before it still read, merge and count."""
    db = Storage(chdb_dsn, "t_codec_upgrade")
    try:
        before = [m for m in all_migrations() if m.version < 14]
        migrate(db, before)
        old = [log_row(timestamp=BASE + dt.timedelta(seconds=i), message=f"old {i}") for i in range(50)]
        db.insert_rows_sync("application_logs", old)
        assert [m.version for m in migrate(db)] == [m.version for m in all_migrations() if m.version >= 14]
        new = [log_row(timestamp=BASE + dt.timedelta(seconds=i, milliseconds=500), message=f"new {i}")
               for i in range(50)]
        db.insert_rows_sync("application_logs", new)
        db.command_sync("OPTIMIZE TABLE application_logs FINAL")
        stored = db.query_sync("SELECT toString(id) AS id, timestamp FROM application_logs ORDER BY timestamp")
        assert [r["id"] for r in stored] == [r["id"] for pair in zip(old, new, strict=True) for r in pair]
        query = LogQuery(start=BASE, end=BASE + dt.timedelta(minutes=1), words=["old"])
        h = plan(query, "10s", 100)
        sql, params = histogram_sql(query, None, h)
        assert [b["total"] for b in fill(h, counts(db, sql, params))] == [10, 10, 10, 10, 10, 0]
    finally:
        db.command_sync("DROP DATABASE IF EXISTS t_codec_upgrade")
        db.close()


def test_fill_zero_fills_adds_up_and_ignores_what_is_off_the_grid() -> None:
    query = LogQuery(start=BASE, end=BASE + dt.timedelta(minutes=3), levels=["WARN", "ERROR"])
    h = plan(query, "1m", 100)
    start = int(BASE.timestamp())
    rows = [(start, "WARN", 2), (start, "WARN", 3), (start + 60, "ERROR", 1), (start + 30, "ERROR", 9),
            (start + 180, "WARN", 9), (start - 60, "WARN", 9), (start + 120, "INFO", 9)]
    assert fill(h, rows) == [
        {"start": "2026-11-24T10:00:00Z", "total": 5, "counts": {"WARN": 5, "ERROR": 0}},
        {"start": "2026-11-24T10:01:00Z", "total": 1, "counts": {"WARN": 0, "ERROR": 1}},
        {"start": "2026-11-24T10:02:00Z", "total": 0, "counts": {"WARN": 0, "ERROR": 0}},
    ]
    assert list(parse_counts([b"1796000400\tWARN\t7"])) == [(1796000400, "WARN", 7)]
    # The endpoint's rendering is the same JSON.
    assert orjson.loads(buckets_json(h, rows)) == fill(h, rows)
    for levels, interval in (([], "1m"), (["WARN"], "10s"), (["DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"], "1h")):
        other = plan(LogQuery(start=BASE, end=BASE + dt.timedelta(hours=2), levels=levels), interval, 10_000)
        assert orjson.loads(buckets_json(other, rows)) == fill(other, rows)
        assert len(fill(other, rows)) == 7200 // other.interval
