"""GET /v1/logs/histogram, and the query time limit."""

from __future__ import annotations

import datetime as dt

import pytest

from collector.logs_api import storage_error

BASE = dt.datetime(2026, 11, 24, 10, 0, tzinfo=dt.UTC)


def at(minutes: float) -> dt.datetime:
    return BASE + dt.timedelta(minutes=minutes)


def z(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


async def histogram(client, tokens, token, **params):
    resp = await client.get("/v1/logs/histogram", params=params, headers=tokens.headers(token))
    return resp.status, await resp.json()


async def test_counts_per_level_per_interval_with_empty_buckets(app_client, admin_token, tokens, add_logs):
    add_logs({"level": "ERROR", "timestamp": at(0.5)}, {"level": "ERROR", "timestamp": at(0.9)},
             {"level": "INFO", "timestamp": at(0.1)}, {"level": "WARN", "timestamp": at(2.2)},
             {"level": "DEBUG", "timestamp": at(4.99), "source": "api"}, {"level": "INFO", "timestamp": at(5)})
    status, body = await histogram(app_client, tokens, admin_token, start=z(at(0)), end=z(at(5)), interval="1m")
    assert status == 200, body
    assert body["interval_seconds"] == 60 and body["start"] == z(at(0)) and body["end"] == z(at(5))
    assert [b["start"] for b in body["buckets"]] == [z(at(m)) for m in range(5)]
    assert [b["total"] for b in body["buckets"]] == [3, 0, 1, 0, 1]
    assert body["buckets"][0]["counts"] == {"DEBUG": 0, "INFO": 1, "WARN": 0, "ERROR": 2, "CRITICAL": 0}
    # The same filters as GET /v1/logs.
    status, body = await histogram(app_client, tokens, admin_token, start=z(at(0)), end=z(at(5)), interval="1m",
                                   level="WARN", source="web")
    assert body["levels"] == ["WARN", "ERROR", "CRITICAL"]
    assert [b["total"] for b in body["buckets"]] == [2, 0, 1, 0, 0]


async def test_sub_minute_and_unaligned_intervals(app_client, admin_token, tokens, add_logs):
    add_logs({"timestamp": at(0) + dt.timedelta(seconds=1)}, {"timestamp": at(0) + dt.timedelta(seconds=12)},
             {"timestamp": at(0) + dt.timedelta(seconds=29, milliseconds=999)})
    status, body = await histogram(app_client, tokens, admin_token, start=z(at(0)), end=z(at(0.5)), interval="10s")
    assert status == 200
    assert [b["total"] for b in body["buckets"]] == [1, 1, 1]
    # Buckets align to the interval: a range starting mid-bucket widens to whole buckets.
    status, body = await histogram(app_client, tokens, admin_token, start=z(at(0) + dt.timedelta(seconds=5)),
                                   end=z(at(0.5)), interval="10s")
    assert body["start"] == z(at(0)) and [b["total"] for b in body["buckets"]] == [1, 1, 1]


async def test_automatic_interval_and_full_text(app_client, admin_token, tokens, add_logs):
    add_logs({"message": "disk full", "timestamp": at(30)}, {"message": "all good", "timestamp": at(31)})
    status, body = await histogram(app_client, tokens, admin_token, start=z(at(0)), end=z(at(24 * 60)), q="disk")
    assert status == 200
    assert body["interval_seconds"] == 60 and len(body["buckets"]) == 1440
    assert sum(b["total"] for b in body["buckets"]) == 1


async def test_bad_histogram_parameters(app_client, admin_token, tokens):
    for params, name in (({"interval": "fortnight"}, "interval"), ({"interval": "0s"}, "interval"),
                         ({"interval": "1.5s"}, "interval"), ({"interval": "1s", "start": "-7d"}, "interval"),
                         ({"limit": "5"}, "limit"), ({"level": "LOUD"}, "level")):
        status, body = await histogram(app_client, tokens, admin_token, **params)
        assert status == 400, params
        assert body["error"]["message"].startswith(f"{name}:")


def test_a_query_over_the_time_limit_is_a_504_naming_the_limit(storage):
    with pytest.raises(Exception) as raised:
        storage.query_sync("SELECT count() FROM numbers(10000000000) WHERE sipHash64(number) = 1",
                           settings={"max_execution_time": 1})
    # The real engine's timeout error, as the API answers it.
    error = storage_error(raised.value, 1.0)
    assert error.status == 504
    assert error.code == "query_timeout" and "1s limit" in error.message
