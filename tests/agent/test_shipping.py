"""Batching and delivery: retries, Retry-After, dead letters, back-pressure,
outages, metrics."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest

from agent.shipper import backoff_delay, parse_retry_after
from tests.agent.conftest import agent_config, eventually, write_lines
from tests.agent.ingest_stub import IngestStub, json_answer
from tests.helpers import free_port


def src(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "logs").mkdir(exist_ok=True)
    return {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}


def test_backoff_is_full_jitter_and_capped() -> None:
    assert backoff_delay(0, 0.2, 30, rng=lambda: 1.0) == 0.2
    assert backoff_delay(3, 0.2, 30, rng=lambda: 0.5) == pytest.approx(0.8)
    assert backoff_delay(50, 0.2, 30, rng=lambda: 1.0) == 30
    assert backoff_delay(5, 0.2, 30, rng=lambda: 0.0) == 0


def test_retry_after_seconds_or_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 25 Nov 2026 05:00:10 GMT", now=1795582800.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_batches_close_at_max_records_and_are_zstd_msgpack(tmp_path, stub, start_agent) -> None:
    source = src(tmp_path)
    write_lines(tmp_path / "logs" / "a.log", [f"line {i}" for i in range(250)])
    await start_agent(agent_config(tmp_path, stub.url, [source], batch={"max_records": 100}))
    await eventually(lambda: len(stub.messages()) == 250)
    assert sorted(len(b) for b in stub.batches.values()) == [50, 100, 100]
    assert set(stub.encodings) == {"zstd"}


async def test_429_and_503_are_retried_honouring_retry_after(tmp_path, stub, start_agent) -> None:
    answers = {1: json_answer(503, {"error": {"code": "busy", "message": "try later"}}, {"Retry-After": "0.3"}),
               2: json_answer(429, {"error": {"code": "slow", "message": "slow down"}}, {"Retry-After": "0"})}
    times: list[float] = []

    def responder(n: int) -> tuple[int, dict[str, str], bytes] | None:
        times.append(time.monotonic())
        return answers.get(n)

    stub.responder = responder
    source = src(tmp_path)
    write_lines(tmp_path / "logs" / "a.log", ["hello"])
    running = await start_agent(agent_config(tmp_path, stub.url, [source]))
    await eventually(lambda: stub.messages() == ["hello"])
    assert times[1] - times[0] >= 0.29  # waited as told
    assert running.agent.metrics.retries == 2


async def test_permanent_errors_dead_letter_the_batch_with_the_reason(tmp_path, stub, start_agent) -> None:
    stub.responder = lambda n: json_answer(413, {"error": {"code": "too_large", "message": "body too large"}}) \
        if n == 1 else None
    source = src(tmp_path)
    write_lines(tmp_path / "logs" / "a.log", ["doomed 1", "doomed 2"])
    running = await start_agent(agent_config(tmp_path, stub.url, [source]))
    dead = tmp_path / "state" / "dead-letter.ndjson"
    await eventually(dead.exists, what="the dead-letter file")
    entries = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [e["record"]["message"] for e in entries] == ["doomed 1", "doomed 2"]
    assert all("HTTP 413: body too large" in e["reason"] for e in entries)
    write_lines(tmp_path / "logs" / "a.log", ["next"])
    await eventually(lambda: stub.messages() == ["next"], what="later lines still shipped")
    assert running.agent.metrics.batches_dead_lettered == 1


async def test_records_rejected_one_by_one_go_to_the_dead_letter_file(tmp_path, stub, start_agent) -> None:
    stub.reject = lambda r: "message mentions forbidden" if "forbidden" in r.message else None
    source = src(tmp_path)
    write_lines(tmp_path / "logs" / "a.log", ["ok 1", "forbidden", "ok 2"])
    await start_agent(agent_config(tmp_path, stub.url, [source]))
    dead = tmp_path / "state" / "dead-letter.ndjson"
    await eventually(lambda: dead.exists() and sorted(stub.messages()) == ["ok 1", "ok 2"])
    (entry,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert entry["record"]["message"] == "forbidden" and entry["reason"] == "message mentions forbidden"


async def test_bad_token_is_retried_until_fixed_by_sighup_reload(tmp_path, stub, start_agent) -> None:
    source = src(tmp_path)
    write_lines(tmp_path / "logs" / "a.log", ["waits for a token"])
    cfg = agent_config(tmp_path, stub.url, [source], collector={"token": "wrong"})
    config_file = tmp_path / "agent.yaml"
    data = {"agent": {"collector": {"url": stub.url, "token": "wrong", "retry_max": "100ms"},
                      "state_dir": str(tmp_path / "state"), "sources": [source], "poll_interval": "20ms"}}
    config_file.write_text(json.dumps(data))
    running = await start_agent(cfg)
    running.agent.config_path = str(config_file)
    await eventually(lambda: running.agent.metrics.retries >= 2, what="retries on 401")
    assert stub.messages() == []
    data["agent"]["collector"]["token"] = "test-token"  # type: ignore[index]
    config_file.write_text(json.dumps(data))
    running.agent.request_reload()
    await eventually(lambda: stub.messages() == ["waits for a token"], what="delivery after reload")


async def test_collector_down_for_a_while_loses_nothing_and_memory_stays_bounded(tmp_path, start_agent) -> None:
    port = free_port()
    stub = IngestStub().start(port)
    source = src(tmp_path)
    app = tmp_path / "logs" / "a.log"
    cfg = agent_config(tmp_path, stub.url, [source], batch={"max_records": 50},
                       collector={"max_in_flight": 2})
    running = await start_agent(cfg)
    write_lines(app, [f"before {i}" for i in range(100)])
    await eventually(lambda: len(stub.messages()) == 100)
    stored = stub.records
    stub.stop()
    write_lines(app, [f"during {i}" for i in range(3000)])
    await asyncio.sleep(1.0)
    agent = running.agent
    # Back-pressure: only max_in_flight batches are built and spooled; what
    # else was read (one chunk at most) waits, and the rest stays in the file.
    assert agent._unacked <= 2
    assert agent.spool.batches <= 2
    tracked = next(iter(agent.tailer.files.values()))
    assert tracked.carry is not None and len(tracked.carry[0]) <= 3000
    stub2 = IngestStub().start(port)
    try:
        await eventually(lambda: len(stub2.messages()) == 3000, timeout=30, what="all lines after the outage")
        assert sorted(stub2.messages()) == sorted(f"during {i}" for i in range(3000))
        assert len(stored) == 100
    finally:
        await running.stop()
        stub2.stop()


async def test_disk_spool_reads_ahead_while_collector_is_down(tmp_path, start_agent) -> None:
    port = free_port()
    source = src(tmp_path)
    app = tmp_path / "logs" / "a.log"
    write_lines(app, [f"spooled {i}" for i in range(1000)])
    cfg = agent_config(tmp_path, f"http://127.0.0.1:{port}", [source], batch={"max_records": 50},
                       collector={"max_in_flight": 1}, spool={"max_bytes": "10MiB"})
    running = await start_agent(cfg)
    await eventually(lambda: hasattr(running.agent, "spool") and running.agent.spool.batches == 20,
                     what="the whole file read into the spool")
    assert list((tmp_path / "state" / "spool").glob("*.seg"))
    stub = IngestStub().start(port)
    try:
        await eventually(lambda: len(stub.messages()) == 1000, timeout=30)
        await eventually(lambda: running.agent.spool.batches == 0
                         and not list((tmp_path / "state" / "spool").iterdir()), what="spool drained")
    finally:
        await running.stop()
        stub.stop()


async def test_sigterm_style_stop_flushes_the_open_batch(tmp_path, stub, start_agent) -> None:
    source = src(tmp_path)
    cfg = agent_config(tmp_path, stub.url, [source], batch={"max_wait": "10s"})
    running = await start_agent(cfg)
    await asyncio.sleep(0.2)
    write_lines(tmp_path / "logs" / "a.log", ["in the open batch"])
    await eventually(lambda: running.agent.metrics.lines_read == 1)
    assert stub.messages() == []  # max_wait not reached yet
    assert await running.stop() == 0
    assert stub.messages() == ["in the open batch"]


async def test_metrics_endpoint_reports_counters_redactions_and_lag(tmp_path, stub, start_agent) -> None:
    port = free_port()
    source = src(tmp_path)
    write_lines(tmp_path / "logs" / "a.log", ["card 4111 1111 1111 1111", "plain"])
    await start_agent(agent_config(tmp_path, stub.url, [source], metrics={"listen": f"127.0.0.1:{port}"}))
    await eventually(lambda: len(stub.messages()) == 2)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = await asyncio.to_thread(scrape)
    assert "logferry_agent_lines_read_total 2" in text
    assert 'logferry_agent_redactions_total{rule="credit_card"} 1' in text
    assert "logferry_agent_records_shipped_total 2" in text
    assert 'logferry_agent_file_lag_bytes{source="app",path="' in text


def test_stdin_source_ships_every_line_and_stops_at_eof(tmp_path, stub) -> None:
    import subprocess
    import sys

    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({"agent": {
        "collector": {"url": stub.url, "token": "test-token", "compression": "gzip"},
        "state_dir": str(tmp_path / "state"),
        "sources": [{"path": "-", "source": "pipe", "format": "logfmt"}],
        "metrics": {"summary_interval": 0},
    }}))
    lines = "".join(f"level=warn msg=\"piped {i}\" password=hunter{i}\n" for i in range(300))
    out = subprocess.run([sys.executable, "-m", "agent.cli", "run", "-c", str(config)], input=lines,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    records = stub.records
    assert sorted(r.message for r in records) == sorted(f"piped {i}" for i in range(300))
    assert all(r.level == "WARN" and r.source == "pipe" and r.offset is None for r in records)
    assert all(r.context == {"password": "[REDACTED:key]"} for r in records)
    assert set(stub.encodings) == {"gzip"}


async def test_zstd_level_is_configurable(tmp_path, stub, start_agent) -> None:
    import zstandard

    source = src(tmp_path)
    write_lines(tmp_path / "logs" / "a.log", [f"fast {i}" for i in range(20)])
    running = await start_agent(agent_config(tmp_path, stub.url, [source], collector={"zstd_level": -3}))
    await eventually(lambda: len(stub.messages()) == 20)
    assert set(stub.encodings) == {"zstd"}
    fast = zstandard.ZstdCompressor(level=-3).compress(b"x" * 100)
    assert running.agent._compress(b"x" * 100) == fast


async def test_a_compressed_body_holds_only_its_own_bytes(tmp_path, stub, start_agent) -> None:
    # python-zstandard allocates its result for the worst case (a little over
    # the input) and only shortens its length: each body kept in flight or
    # queued pinned ~5x its size, which bounded how large batches could be.
    import tracemalloc

    running = await start_agent(agent_config(tmp_path, stub.url, [src(tmp_path)]))
    await eventually(lambda: running.agent._compress is not None)
    data = b"".join(b'{"msg":"GET /api/items/%d completed","status":200}\n' % i for i in range(20_000))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        body = running.agent._compress(data)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(body) < len(data) // 5
    assert held < len(body) + 64 * 1024, (held, len(body), len(data))

async def test_a_reload_to_another_collector_url_ships_there(tmp_path, stub, start_agent) -> None:
    # Kept-alive connections lead to the old collector: none is used for the new URL.
    other = IngestStub().start()
    try:
        source = src(tmp_path)
        log = tmp_path / "logs" / "a.log"
        write_lines(log, ["to the first"])
        config_file = tmp_path / "agent.yaml"
        data = {"agent": {"collector": {"url": stub.url, "token": "test-token"}, "state_dir": str(tmp_path / "state"),
                          "sources": [source], "poll_interval": "20ms", "batch": {"max_wait": "30ms"}}}
        config_file.write_text(json.dumps(data))
        running = await start_agent(agent_config(tmp_path, stub.url, [source]))
        running.agent.config_path = str(config_file)
        await eventually(lambda: stub.messages() == ["to the first"])
        data["agent"]["collector"]["url"] = other.url  # type: ignore[index]
        config_file.write_text(json.dumps(data))
        running.agent.request_reload()
        await asyncio.sleep(0.2)
        write_lines(log, [f"to the second {i}" for i in range(5)])
        await eventually(lambda: len(other.messages()) == 5, what="lines at the new collector")
        assert stub.messages() == ["to the first"]
    finally:
        other.stop()


async def test_a_request_still_running_when_the_shipper_closes_leaves_no_connection_open(stub) -> None:
    # A POST outlives the shipper at exit (a slow collector): its connection
    # was pooled after the pool was emptied, and left for the garbage
    # collector (a ResourceWarning in some later test).
    import msgspec

    from agent.config import CollectorTarget
    from agent.shipper import Shipper
    from agent.wire import Batch, encode_batch

    stub.delay = 0.4
    cfg = msgspec.convert({"url": stub.url, "token": "test-token"}, CollectorTarget)
    body = encode_batch(Batch("agent-1", "batch-1", "host-1", []))
    async with Shipper(cfg) as shipper:
        sending = asyncio.create_task(shipper.deliver(body, "identity"))
        await eventually(lambda: stub.posts == 1, what="the request in flight")
    delivery = await sending
    assert delivery.stored
    assert shipper._idle.empty()
