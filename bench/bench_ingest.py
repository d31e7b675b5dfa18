"""Ingest throughput and insert latency through POST /v1/ingest into chDB.

Runs the real collector app on 127.0.0.1 in this process (chDB in a temporary
folder), pre-encodes msgpack+zstd batches of 1000 records (so the client's
encoding is not measured), posts them with a few concurrent connections, and
prints records/s, request latency (acknowledged once fsynced in the write-ahead
journal; with --no-journal, once inserted) and the per-insert latency of the
journal's flusher (the spec: log write < 10 ms per batch). Then one sender posts a batch
every 100 ms (an agent's pace: the spec's 100 ms write pattern) and the
request latency it sees is printed: POST sent to "stored" answered.

    python bench/bench_ingest.py [--batches 200] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import statistics
import sys
import tempfile
import time
import uuid

import aiohttp
import zstandard
from aiohttp import web

from agent.configfile import convert
from agent.wire import Batch, Record, encode_batch
from collector import appkeys
from collector.app import create_app, tune_gc
from collector.config import CollectorConfig

SECRET = "bench-secret-key-0123456789abcdef0123456789"
SOURCES = [f"service-{i}" for i in range(20)]
LEVELS = ["DEBUG", "INFO", "INFO", "INFO", "WARN", "ERROR"]


def make_batches(n: int, size: int) -> list[bytes]:
    rng = random.Random(7)
    now = dt.datetime.now(dt.UTC)
    cctx = zstandard.ZstdCompressor(level=1)
    out = []
    for b in range(n):
        records = [
            Record(timestamp=(now - dt.timedelta(seconds=rng.random() * 3600)).isoformat(),
                   level=rng.choice(LEVELS), source=rng.choice(SOURCES),
                   message=f"GET /api/orders/{rng.randint(1, 10**6)} took {rng.randint(1, 900)} ms",
                   context={"status": rng.choice([200, 200, 404, 500]), "region": "eu-west-1"},
                   request_id=uuid.uuid4().hex, user_id=f"user-{rng.randint(1, 5000)}", tags=["bench"],
                   file="/var/log/app.log", offset=b * size + i, host="bench-host")
            for i in range(size)
        ]
        batch = Batch(agent_id="bench", batch_id=str(uuid.uuid4()), host="bench-host", records=records,
                      redacted=True)
        out.append(cctx.compress(encode_batch(batch)))
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def run(batches: int, size: int, concurrency: int, paced_batches: int, journal_on: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="logferry-bench-") as folder:
        storage_cfg = {"dsn": f"chdb://{folder}"} if journal_on else {"dsn": f"chdb://{folder}", "journal": "off"}
        config = convert({"secret_key": SECRET, "storage": storage_cfg, "listen": "127.0.0.1:18080"},
                         CollectorConfig)
        app = create_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        tune_gc()  # as `logferry-collector serve` does
        _, token = await app[appkeys.TOKENS].create(kind="ingest", name="bench", created_by="bench")
        print(f"encoding {batches} batches of {size} records ...", flush=True)
        bodies = make_batches(batches, size)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack",
                   "Content-Encoding": "zstd"}
        latencies: list[float] = []
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)

        async def worker(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}/v1/ingest", data=body, headers=headers) as r:
                    out = await r.json()
                    assert r.status == 200 and out["accepted"] == size, out
                latencies.append(time.perf_counter() - started)
                done = len(latencies)
                if done % max(1, batches // 10) == 0:
                    print(f"  {done}/{batches} batches", flush=True)

        storage = app[appkeys.STORAGE]
        journal = storage.journal
        writer = app[appkeys.LOG_WRITER].logs
        writer.insert_seconds.clear()
        if journal is not None:
            journal.inserts.clear()
        _, admin = await app[appkeys.TOKENS].create(kind="admin", name="bench-reader", created_by="bench")
        query_latencies: list[float] = []
        ingesting = True

        async def reader(session: aiohttp.ClientSession) -> None:
            # A dashboard polling the last 5 minutes while agents ship: with the
            # journal, each query first waits for the logs acknowledged before it.
            while ingesting:
                started = time.perf_counter()
                async with session.get(f"http://127.0.0.1:{port}/v1/logs",
                                       params={"start": "-5m", "limit": "100", "level": "WARN"},
                                       headers={"Authorization": f"Bearer {admin}"}) as r:
                    await r.read()
                    assert r.status == 200
                query_latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.2)

        started = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            reading = asyncio.create_task(reader(session))
            await asyncio.gather(*(worker(session) for _ in range(concurrency)))
            ingesting = False
            await reading
        elapsed = time.perf_counter() - started
        await storage.run(storage.barrier, "SELECT count() FROM application_logs")  # every row in ClickHouse
        elapsed_stored = time.perf_counter() - started
        if journal is not None:
            inserts = [s * 1000 for table, _, s in journal.inserts if table == "application_logs"]
        else:
            inserts = [s * 1000 for s in writer.insert_seconds]
        total = batches * size
        print(f"ingest: {total} records in {elapsed:.2f} s = {total / elapsed:,.0f} records/s "
              f"({batches} batches of {size}, {concurrency} connections)")
        print(f"  every row in ClickHouse after {elapsed_stored:.2f} s = {total / elapsed_stored:,.0f} records/s; "
              + ("acknowledged from the write-ahead journal (fsynced), inserted by its flusher"
                 if journal is not None else "acknowledged after the insert (storage.journal: off)"))
        print(f"request latency (ms): p50 {pct(latencies, 50) * 1000:.1f}  p99 {pct(latencies, 99) * 1000:.1f}")
        print(f"a log query (last 5 min, level>=WARN, 100 rows) every 200 ms meanwhile (ms): "
              f"p50 {pct(query_latencies, 50) * 1000:.1f}  p95 {pct(query_latencies, 95) * 1000:.1f}  "
              f"(n={len(query_latencies)})")
        print(f"inserts: {len(inserts)} (coalesced, ~{total / max(1, len(inserts)):,.0f} rows each); "
              f"insert latency (ms): p50 {statistics.median(inserts):.1f}  p99 {pct(inserts, 99):.1f}")
        per_batch = [s / max(1, (total / len(inserts)) / size) for s in inserts]
        print(f"insert latency per {size}-record batch (ms): p50 {statistics.median(per_batch):.1f}  "
              f"p99 {pct(per_batch, 99):.1f}   (spec: < 10 ms)")

        # An agent's pace: a batch every 100 ms (its max_wait); a quiet host's
        # batch holds ~100 records, a busy one's the bench's size.
        for paced_size in sorted({100, size}):
            paced: list[float] = []
            async with aiohttp.ClientSession() as session:
                for body in make_batches(paced_batches, paced_size):
                    started = time.perf_counter()
                    async with session.post(f"http://127.0.0.1:{port}/v1/ingest", data=body, headers=headers) as r:
                        out = await r.json()
                        assert r.status == 200 and out["accepted"] == paced_size, out
                    paced.append(time.perf_counter() - started)
                    await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - started)))
            print(f"one sender, a {paced_size}-record batch every 100 ms: request (stored, answered) p50 "
                  f"{pct(paced, 50) * 1000:.1f} ms  p99 {pct(paced, 99) * 1000:.1f} ms  (n={len(paced)})")
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a short run (50 batches)")
    parser.add_argument("--no-journal", action="store_true",
                        help="storage.journal: off (requests wait for the coalesced insert), for comparison")
    args = parser.parse_args()
    asyncio.run(run(50 if args.quick else args.batches, args.size, args.concurrency, 20 if args.quick else 100,
                    not args.no_journal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
