"""Query latency over generated logs in chDB, measured through the HTTP API.

Generates N logs (default 10 million) spread over the last 7 days, 20 sources
and 5 levels with ClickHouse itself (``INSERT … SELECT … FROM numbers(N)``),
then times the collector's real endpoints (auth, SQL, rendering, HTTP) with
an in-process aiohttp server:

- a 1-hour range by minimum level (the spec's query 1: < 100 ms; our goal p95 < 50 ms)
- a source + level query over the last 24 hours
- a full-text search over the whole 7 days (a rare word and a common one)
- a histogram of the whole 7 days (auto interval) and of the last 24 hours (1m)

Usage: ``python bench/bench_query.py [--rows N] [--quick] [--runs R] [--keep DIR] [--only NAME]``.
``--keep DIR`` reuses the logs generated there by an earlier run (10M take
about a minute to generate) unless a migration has run since. ``cpu p50`` is
the CPU time of this process (chDB runs in it) per request: steadier than the
wall-clock figures when other work shares the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from aiohttp.test_utils import TestClient, TestServer

from agent.configfile import convert
from collector.app import create_app
from collector.auth import TokenScope, TokenService
from collector.config import CollectorConfig
from collector.schema import migrate
from collector.storage import Storage

SECRET = "bench-secret-key-0123456789abcdef0123456789"
SOURCES = ["web", "api", "payments-api", "payments-worker", "auth", "search", "billing", "checkout", "cart",
           "inventory", "shipping", "email-worker", "notifications", "gateway", "cdn-edge", "analytics",
           "recommendations", "admin", "cron", "db-proxy"]
MESSAGES = ["GET /api/v1/orders completed", "user login succeeded", "payment authorised for order",
            "cache miss for key", "upstream request timeout after retries", "database query slow",
            "connection reset by peer", "email queued for delivery", "inventory reserved for cart",
            "rate limit exceeded for client"]
DAY_MS = 86_400_000

# Levels: 30% DEBUG, 50% INFO, 12% WARN, 6% ERROR, 2% CRITICAL. Sources: half
# of the rows spread evenly, half skewed to the first few (real fleets are
# uneven). Timestamps: evenly over 7 days with jitter. One row in 10,000
# mentions "deadlock" (a rare word); "timeout" is in 10% of messages.
GENERATE = """
INSERT INTO application_logs (id, timestamp, level, source, message, context, user_id, session_id, request_id,
                              ip_address, duration_ms, tags, host, retention_days)
SELECT
    generateUUIDv4(number),
    fromUnixTimestamp64Milli(toInt64({end_ms:Int64} - intDiv(number * {span_ms:Int64}, {rows:UInt64})
                                     - (cityHash64(number, 7) % 1000)), 'UTC'),
    multiIf(r < 30, 'DEBUG', r < 80, 'INFO', r < 92, 'WARN', r < 98, 'ERROR', 'CRITICAL'),
    {sources:Array(String)}[1 + if(cityHash64(number, 2) % 2 = 0, cityHash64(number, 3) % 20,
                                   least(toUInt64(floor(-log(1 - (cityHash64(number, 4) % 1000) / 1000.) * 3)), 19))],
    concat({messages:Array(String)}[1 + cityHash64(number, 5) % 10], ' id=', toString(cityHash64(number, 6) % 100000),
           if(cityHash64(number, 8) % 10000 = 0, ' deadlock detected', '')),
    '{}',
    if(cityHash64(number, 9) % 2 = 0, concat('user-', toString(cityHash64(number, 10) % 100000)), NULL),
    concat('sess-', toString(cityHash64(number, 11) % 1000000)),
    toString(generateUUIDv4(number + 1)),
    '10.0.0.1',
    (cityHash64(number, 12) % 5000) / 10.0,
    arraySlice(['checkout', 'mobile', 'beta', 'eu-west'], 1 + cityHash64(number, 13) % 4, cityHash64(number, 14) % 3),
    concat('host-', toString(cityHash64(number, 15) % 8)),
    30
FROM (SELECT number, cityHash64(number, 1) % 100 AS r FROM numbers({rows:UInt64}))
"""


def generate(storage: Storage, rows: int, end: dt.datetime) -> float:
    started = time.perf_counter()
    storage.command_sync(GENERATE, {
        "end_ms": int(end.timestamp() * 1000), "span_ms": 7 * DAY_MS, "rows": rows,
        "sources": SOURCES, "messages": MESSAGES,
    }, settings={"max_insert_threads": 2, "max_threads": 2})
    return time.perf_counter() - started


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def measure(client: TestClient[Any, Any], headers: dict[str, str], runs: int,
                  make_params: Any) -> tuple[list[float], list[float], int]:
    """Wall-clock and CPU milliseconds per request (CPU of this process, where
    chDB runs: steadier than wall time when other work shares the cores), up
    to the last byte of the response; this client's JSON decoding is not timed
    (a day of 1-minute buckets is ~3,000 dicts, whose allocation set off
    garbage collections that then landed in the timed part)."""
    times = []
    cpu = []
    rows = 0
    for i in range(runs + 3):
        params = make_params(i)
        started, cpu_started = time.perf_counter(), time.process_time()
        resp = await client.get(params.pop("_path", "/v1/logs"), params=params, headers=headers)
        raw = await resp.read()
        elapsed = (time.perf_counter() - started) * 1000
        cpu_ms = (time.process_time() - cpu_started) * 1000
        body = orjson.loads(raw)
        if resp.status != 200:
            raise SystemExit(f"request failed: {resp.status} {body}")
        if i >= 3:  # the first requests warm caches (and the text index dictionaries)
            times.append(elapsed)
            cpu.append(cpu_ms)
            rows = len(body.get("logs", body.get("buckets", [])))
    return times, cpu, rows


async def run(args: argparse.Namespace) -> None:
    path = args.keep or tempfile.mkdtemp(prefix="logferry-bench-")
    storage = Storage(f"chdb://{path}", "bench")
    # Logs kept from a run before a migration were stored under the older
    # schema (codecs, indexes): generate them again.
    applied = migrate(storage)
    existing = storage.query_sync("SELECT count() AS n, max(timestamp) AS end FROM application_logs")[0]
    if existing["n"] != args.rows or applied:
        storage.command_sync("TRUNCATE TABLE application_logs")
        end = dt.datetime.now(dt.UTC).replace(microsecond=0)
        took = generate(storage, args.rows, end)
        print(f"generated {args.rows:,} logs over 7 days in {took:.1f} s ({args.rows / took / 1e6:.2f} M rows/s)")
        started = time.perf_counter()
        storage.command_sync("OPTIMIZE TABLE application_logs FINAL", settings={"max_execution_time": 0})
        print(f"merged to steady state (OPTIMIZE FINAL) in {time.perf_counter() - started:.1f} s")
    else:
        end = existing["end"].replace(tzinfo=dt.UTC)
        print(f"reusing {args.rows:,} logs in {path}")
    parts = storage.query_sync("SELECT count() AS n, sum(bytes_on_disk) AS b FROM system.parts "
                               "WHERE active AND database = 'bench' AND table = 'application_logs'")[0]
    print(f"{parts['n']} parts, {parts['b'] / 2**20:.0f} MiB on disk")
    print("load average before the queries: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    tokens = TokenService(storage, SECRET)
    _, admin = tokens.create_sync(kind="admin", name="bench", created_by="bench")
    _, scoped = tokens.create_sync(kind="logs", name="bench-scoped", created_by="bench",
                                   permissions=TokenScope(sources=["payments-*"], min_level="WARN"))
    config = convert({"secret_key": SECRET, "storage": {"dsn": f"chdb://{path}", "database": "bench"}},
                      CollectorConfig)
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(config, storage=storage)))
    await client.start_server()
    rng = random.Random(7)
    span_hours = 7 * 24 - 1

    def iso(t: dt.datetime) -> str:
        return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def hour_window(_: int) -> dict[str, str]:
        start = end - dt.timedelta(hours=rng.uniform(1, span_hours))
        return {"start": iso(start), "end": iso(start + dt.timedelta(hours=1))}

    week = {"start": iso(end - dt.timedelta(days=7)), "end": iso(end)}
    day = {"start": iso(end - dt.timedelta(days=1)), "end": iso(end)}
    cases = [
        ("1 h range, level >= WARN (random hour)", admin, lambda i: {**hour_window(i), "level": "WARN"}),
        ("1 h range, level >= WARN, last hour", admin, lambda i: {"level": "WARN"}),
        ("source + level >= ERROR, 24 h", admin,
         lambda i: {**day, "source": SOURCES[i % 20], "level": "ERROR"}),
        ("source glob + level, 1 h, scoped token", scoped,
         lambda i: {**hour_window(i), "source": "payments-*", "level": "ERROR"}),
        ("full text, rare word, 7 d", admin, lambda i: {**week, "q": "deadlock"}),
        ("full text, common word + level, 7 d", admin, lambda i: {**week, "q": "timeout", "level": "ERROR"}),
        ("full text, phrase, 7 d", admin, lambda i: {**week, "q": '"connection reset"'}),
        ("histogram, 7 d, auto interval", admin, lambda i: {**week, "_path": "/v1/logs/histogram"}),
        ("histogram, 24 h, 1m, level >= WARN", admin,
         lambda i: {**day, "interval": "1m", "level": "WARN", "_path": "/v1/logs/histogram"}),
        ("histogram, 7 d, full text (no projection)", admin,
         lambda i: {**week, "q": "timeout", "_path": "/v1/logs/histogram"}),
    ]
    print(f"\n{'query':48} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'cpu p50':>8} {'rows':>6}   "
          f"({args.runs} runs each)")
    for name, token, make_params in cases:
        if args.only and not any(word in name for word in args.only):
            continue
        times, cpu, rows = await measure(client, {"Authorization": f"Bearer {token}"}, args.runs, make_params)
        print(f"{name:48} {statistics.median(times):8.1f} {pct(times, 95):8.1f} {max(times):8.1f} "
              f"{statistics.median(cpu):8.1f} {rows:6}", flush=True)

    # NDJSON export throughput: one hour of every level.
    hour = hour_window(0)
    started = time.perf_counter()
    resp = await client.get("/v1/logs", params=hour, headers={"Authorization": f"Bearer {admin}",
                                                               "Accept": "application/x-ndjson"})
    exported = 0
    async for line in resp.content:
        exported += 1 if line.strip() else 0
    took = time.perf_counter() - started
    print("load average after the queries: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"\nNDJSON export of one hour: {exported:,} logs in {took:.2f} s ({exported / took:,.0f} logs/s)")
    await client.close()
    storage.close()
    if not args.keep:
        print(f"(data in {path}; pass --keep DIR to reuse it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--quick", action="store_true", help="1 M rows, 10 runs")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--keep", help="data folder to keep (and reuse when it holds --rows logs)")
    parser.add_argument("--only", action="append", help="run only the queries whose name contains this (repeatable)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.runs = min(args.rows, 1_000_000), min(args.runs, 10)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
