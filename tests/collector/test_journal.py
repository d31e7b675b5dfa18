"""The write-ahead journal in front of ClickHouse (collector/journal.py):
torn records, group commit, replay idempotency on the real tables, the
read-your-writes barrier, and a real collector killed with SIGKILL after
acknowledging a notification but before flushing it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from collector.email.repository import EmailRepository, ch_time
from collector.journal import JOURNALED_TABLES, Journal, encode_record, read_segment
from collector.notifications.model import Delivery, Notification, Priority
from collector.notifications.repository import NotificationRepository
from collector.pii import PiiCipher
from collector.storage import Storage, default_journal_dir, new_version
from tests.helpers import SECRET, wait_for


class Recorder:
    """A stand-in for ClickHouse: records what the journal inserts."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, table: str, rows: list[dict[str, Any]]) -> None:
        with self.lock:
            self.calls += 1
            self.rows.setdefault(table, []).extend(rows)


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("segment-*.log"))


# --- records, torn tails, group commit ------------------------------------------------


def test_a_torn_or_corrupt_tail_is_ignored_and_the_whole_records_replayed(tmp_path: Path) -> None:
    live = tmp_path / "live"
    journal = Journal(live, Recorder(), flush_interval=60)
    journal.open()
    for i in range(3):
        journal.write_sync("notifications", [{"id": f"n{i}", "version": i}])
    # A crash: the process dies with the segment as it is on disk.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for path in segments(live):
        shutil.copy(path, crashed / path.name)
    journal.close()
    [segment] = segments(crashed)
    whole = segment.read_bytes()
    torn = encode_record("notifications", [{"id": "torn", "version": 9}])
    segment.write_bytes(whole + torn[: len(torn) // 2])

    recorder = Recorder()
    again = Journal(crashed, recorder, flush_interval=60)
    assert again.open() == 3
    assert [r["id"] for r in recorder.rows["notifications"]] == ["n0", "n1", "n2"]
    assert again.stats["ignored_bytes"] == len(torn) // 2
    again.close()
    assert segments(crashed) == []

    # A flipped byte inside a record ends the segment there too (CRC).
    bad = bytearray(whole)
    bad[len(whole) - 3] ^= 0xFF
    records, ignored = read_segment(bytes(bad))
    assert [rows[0]["id"] for _, rows in records] == ["n0", "n1"]
    assert ignored > 0


async def test_concurrent_writers_share_fsyncs_and_every_row_is_flushed(tmp_path: Path) -> None:
    recorder = Recorder()
    journal = Journal(tmp_path, recorder, flush_interval=0.05)
    journal.open()
    await asyncio.gather(*(journal.write("notification_deliveries", [{"id": i, "version": 1}])
                           for i in range(200)))
    assert journal.stats["records"] == 200
    assert journal.stats["fsyncs"] < 200  # group commit
    await asyncio.get_running_loop().run_in_executor(None, journal.close)
    assert sorted(r["id"] for r in recorder.rows["notification_deliveries"]) == list(range(200))
    assert recorder.calls < 200  # coalesced inserts
    assert segments(tmp_path) == []


async def test_segments_rotate_and_are_retired_once_their_rows_are_flushed(tmp_path: Path) -> None:
    recorder = Recorder()
    journal = Journal(tmp_path, recorder, flush_interval=60, segment_bytes=300)
    journal.open()
    for i in range(40):
        await journal.write("notifications", [{"id": i, "version": 1, "pad": "x" * 50}])
    assert len(segments(tmp_path)) > 5  # rotated; nothing flushed yet, so nothing retired
    journal.checkpoint()
    assert len(recorder.rows["notifications"]) == 40
    assert len(segments(tmp_path)) == 1  # only the fresh, empty current segment
    assert segments(tmp_path)[0].stat().st_size == 0
    await journal.write("notifications", [{"id": 40, "version": 1}])
    await asyncio.get_running_loop().run_in_executor(None, journal.close)
    assert len(recorder.rows["notifications"]) == 41
    assert segments(tmp_path) == []


async def test_the_barrier_waits_for_the_flush_and_pending_rows_are_visible_meanwhile(tmp_path: Path) -> None:
    recorder = Recorder()
    journal = Journal(tmp_path, recorder, flush_interval=60)
    journal.open()
    await journal.write("email_idempotency", [{"key": "k1", "email_id": "e1"}])
    assert journal.pending_rows("email_idempotency") == [{"key": "k1", "email_id": "e1"}]
    assert recorder.rows == {}
    started = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(
        None, journal.barrier_for_sql, "SELECT * FROM email_idempotency FINAL")
    assert time.monotonic() - started < 5  # flushed at once, not after the 60 s interval
    assert recorder.rows["email_idempotency"] == [{"key": "k1", "email_id": "e1"}]
    assert journal.pending_rows("email_idempotency") == []
    assert journal.tables_in("SELECT 1 FROM notification_preferences") == set()
    await asyncio.get_running_loop().run_in_executor(None, journal.close)


async def test_while_clickhouse_is_away_writes_are_refused_past_the_backlog_limit(tmp_path: Path) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from collector.errors import error_middleware
    from collector.journal import JournalFull

    recorder = Recorder()
    away = threading.Event()
    away.set()

    def insert(table: str, rows: list[dict[str, Any]]) -> None:
        if away.is_set():
            raise ConnectionError("ClickHouse is away")
        recorder(table, rows)

    journal = Journal(tmp_path, insert, flush_interval=0.01, max_unflushed_rows=10)
    journal.open()
    for i in range(10):
        await journal.write("notifications", [{"id": i, "version": 1}])
    with pytest.raises(JournalFull, match="10 stored rows of notifications are waiting for ClickHouse"):
        await journal.write("notifications", [{"id": 10, "version": 1}])

    # The HTTP answer to a refused write: 503 with Retry-After, no stack trace.
    async def handler(request: web.Request) -> web.Response:
        await journal.write("notifications", [{"id": 11, "version": 1}])
        return web.Response(text="stored")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/", handler)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/")
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert (await response.json())["error"]["code"] == "storage_backlog"

    away.clear()  # back: the backlog drains and writes are taken again
    await asyncio.get_running_loop().run_in_executor(None, journal.barrier, ["notifications"])
    await journal.write("notifications", [{"id": 12, "version": 1}])
    await asyncio.get_running_loop().run_in_executor(None, journal.close)
    assert sorted(r["id"] for r in recorder.rows["notifications"]) == [*range(10), 12]


def test_a_journal_folder_is_used_by_one_process_at_a_time(tmp_path: Path) -> None:
    from collector.journal import JournalLocked

    first = Journal(tmp_path, Recorder())
    first.open()
    with pytest.raises(JournalLocked):
        Journal(tmp_path, Recorder()).open()
    first.close()


def test_default_locations() -> None:
    assert default_journal_dir("chdb:///var/lib/logferry/clickhouse", "logferry") == \
        "/var/lib/logferry/clickhouse-journal/logferry"
    assert default_journal_dir("http://ch:8123/x", "db").endswith("/data/journal/db")


# --- the real tables --------------------------------------------------------------------


def _rows_of_every_journaled_table() -> dict[str, dict[str, Any]]:
    now = dt.datetime.now(dt.UTC)
    n = Notification(id=str(uuid.uuid4()), user_id="u1", type="deploy", priority=Priority.HIGH, title="t",
                     message="m", data={"a": 1}, channels=["email", "in_app"], created_at=now)
    d = Delivery(id=str(uuid.uuid4()), notification_id=n.id, channel="email", user_id="u1", created_at=now)
    repo = EmailRepository.__new__(EmailRepository)
    repo.cipher = PiiCipher(SECRET)
    email_id = str(uuid.uuid4())
    record = {"id": email_id, "from": "a@example.com", "to": ["b@example.com"], "subject": "s",
              "text_body": "x", "status": "QUEUED", "created_at": now}
    return {
        "notifications": NotificationRepository.notification_row(n),
        "notification_deliveries": NotificationRepository.delivery_row(d),
        "email_messages": repo.to_row(record),
        "email_outbox": {"email_id": email_id, "payload": "sealed", "record": "", "created_at": ch_time(now),
                         "version": new_version()},
        "email_idempotency": {"key": f"notification:{n.id}:email", "email_id": email_id,
                              "created_at": ch_time(now)},
        "ingest_rejections": {"batch_id": str(uuid.uuid4()), "received_at": ch_time(now),
                              "rejected": '[{"index": 0, "error": "level: \'LOUD\' is not a level"}]'},
    }


def test_every_journaled_table_is_a_replacing_merge_tree(storage: Storage) -> None:
    engines = {r["name"]: r["engine"] for r in storage.query_sync(
        "SELECT name, engine FROM system.tables WHERE database = currentDatabase()")}
    for table in JOURNALED_TABLES:
        assert engines[table] == "ReplacingMergeTree", table


def test_replaying_rows_that_already_reached_clickhouse_changes_nothing(storage: Storage, tmp_path: Path) -> None:
    rows = _rows_of_every_journaled_table()
    assert set(rows) == set(JOURNALED_TABLES)
    for table, row in rows.items():
        storage.insert_direct_sync(table, [row])
    before = {t: storage.query_sync(f"SELECT * FROM {t} FINAL") for t in rows}
    # Two segments holding the same records (a crash after the flush, before
    # the segment was retired, then a crash during the replay itself).
    record = b"".join(encode_record(t, [r]) for t, r in rows.items())
    (tmp_path / f"segment-{1:020d}.log").write_bytes(record)
    (tmp_path / f"segment-{2:020d}.log").write_bytes(record)
    journal = Journal(tmp_path, storage.insert_direct_sync)
    assert journal.open() == 2 * len(rows)
    journal.close()
    for table in rows:
        storage.command_sync(f"OPTIMIZE TABLE {table} FINAL")
        after = storage.query_sync(f"SELECT * FROM {table} FINAL")
        assert after == before[table], table
        assert storage.query_sync(f"SELECT count() AS n FROM {table}")[0]["n"] == 1, table


async def test_reads_see_rows_that_are_only_in_the_journal(storage: Storage, tmp_path: Path) -> None:
    assert storage.attach_journal(tmp_path, flush_interval=60)
    try:
        row = _rows_of_every_journaled_table()["notifications"]
        await storage.insert_rows("notifications", [row])
        assert storage.journal is not None and storage.journal.pending_rows("notifications")
        found = await storage.query("SELECT toString(id) AS id FROM notifications FINAL WHERE user_id = 'u1'")
        assert [r["id"] for r in found] == [row["id"]]
        # Tables outside the journal are written straight through.
        assert not storage.journal.journaled("email_events")
    finally:
        await asyncio.get_running_loop().run_in_executor(None, storage.detach_journal)
    assert storage.journal is None


async def test_a_delete_retires_the_records_so_a_replay_cannot_bring_rows_back(
        storage: Storage, tmp_path: Path) -> None:
    assert storage.attach_journal(tmp_path, flush_interval=60)
    try:
        row = _rows_of_every_journaled_table()["notifications"]
        await storage.insert_rows("notifications", [row])
        await storage.command("DELETE FROM notifications WHERE user_id = {u:String}", {"u": "u1"})
        # What a crash now would replay: nothing written before the DELETE.
        left = [rows for path in segments(tmp_path) for _, rows in read_segment(path.read_bytes())[0]]
        assert left == []
        assert await storage.query("SELECT id FROM notifications FINAL WHERE user_id = 'u1'") == []
        await storage.insert_rows("notifications", [{**row, "version": new_version()}])  # still writable
    finally:
        await asyncio.get_running_loop().run_in_executor(None, storage.detach_journal)
    assert len(await storage.query("SELECT id FROM notifications FINAL WHERE user_id = 'u1'")) == 1


# --- a real collector, killed ---------------------------------------------------------------


def _api(url: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_a_collector_killed_before_flushing_loses_and_repeats_nothing(
        collector_process_factory: Callable[..., Any], tmp_path: Path, smtp_server: Any) -> None:
    def subjects() -> list[str]:
        return [str(m["Subject"]) for _, m in smtp_server.messages]

    data = tmp_path / "collector" / "clickhouse"
    proc = collector_process_factory({
        # Nothing reaches ClickHouse on its own within the test: only the journal holds the rows.
        "storage": {"dsn": f"chdb://{data}", "journal_flush_interval": "60s"},
        "email": {"providers": [{"type": "smtp", "host": "127.0.0.1", "port": smtp_server.port, "starttls": "off"}]},
    })
    service = proc.create_token("service", "journal-test")
    proc.start()
    assert _api(proc.url, service, "PUT", "/v1/users/u1", {"email": "u1@example.com"})[0] in (200, 201)
    base = {"user_id": "u1", "type": "deploy", "priority": "HIGH", "message": "m", "channels": ["email", "in_app"]}
    # B: acknowledged and delivered before the crash.
    status, b = _api(proc.url, service, "POST", "/v1/notifications", {**base, "title": "sent-before-crash"})
    assert status == 201, b
    wait_for(lambda: "sent-before-crash" in subjects(), 15, "the first email")
    # A: acknowledged, due a few seconds later; the collector dies at once.
    due = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)).isoformat().replace("+00:00", "Z")
    status, a = _api(proc.url, service, "POST", "/v1/notifications",
                     {**base, "title": "acked-then-crash", "scheduled_for": due})
    assert status == 201, a
    assert proc.proc is not None
    proc.proc.kill()  # SIGKILL: no flush, no clean shutdown
    proc.proc.wait()
    proc.proc = None
    journal = Path(default_journal_dir(f"chdb://{data}", "logferry"))
    assert sum(p.stat().st_size for p in segments(journal)) > 0

    proc.start()
    status, got = _api(proc.url, service, "GET", f"/v1/notifications/{a['id']}")
    assert status == 200, got
    wait_for(lambda: "acked-then-crash" in subjects(), 20, "the resumed email")
    wait_for(lambda: _api(proc.url, service, "GET", f"/v1/notifications/{a['id']}")[1]["status"] == "SENT", 10,
          "SENT")
    time.sleep(1.5)  # room for a duplicate to show up
    assert subjects().count("acked-then-crash") == 1
    assert subjects().count("sent-before-crash") == 1
    for notification in (a, b):
        status, got = _api(proc.url, service, "GET", f"/v1/notifications/{notification['id']}")
        assert status == 200 and got["status"] == "SENT", got
        # Without a preference the user gets the default channels (email), once.
        assert [(d["channel"].lower(), d["status"]) for d in got["deliveries"]] == [("email", "SENT")], got
    proc.stop()
    # A clean stop flushes everything and retires the segments.
    assert segments(journal) == []


# --- logs through the journal -------------------------------------------------------------------


def _log_row(batch_id: str, i: int, message: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {"id": str(uuid.uuid4()), "timestamp": ch_time(now), "ingested_at": ch_time(now), "level": "INFO",
            "source": "journal-test", "message": f"{message} {i}", "host": "h", "batch_id": batch_id,
            "agent_id": "a", "retention_days": 30}


def test_a_log_replay_skips_the_batches_whose_insert_happened(storage: Storage, tmp_path: Path) -> None:
    """A crash after the flusher's insert but before the segment was retired:
    application_logs is a plain MergeTree, so the replay must recognise the
    batches already stored (their ids, recorded by the same insert) and
    insert only the others — every log exactly once."""
    stored_rows = [_log_row("batch-stored", i, "stored") for i in range(3)]
    storage.insert_direct_sync("application_logs", stored_rows)
    missing_rows = [_log_row("batch-missing", i, "missing") for i in range(2)]
    (tmp_path / f"segment-{1:020d}.log").write_bytes(
        encode_record("application_logs", stored_rows) + encode_record("application_logs", missing_rows))
    journal = Journal(tmp_path, storage.insert_direct_sync, tables=(),
                      dedupe={"application_logs": storage.logs_not_stored})
    assert journal.open() == 2
    journal.close()
    counts = {r["batch_id"]: r["n"] for r in storage.query_sync(
        "SELECT batch_id, count() AS n FROM application_logs GROUP BY batch_id")}
    assert counts == {"batch-stored": 3, "batch-missing": 2}
    # And the replayed batch is now known as stored, so a second replay of the same segment adds nothing.
    (tmp_path / f"segment-{1:020d}.log").write_bytes(encode_record("application_logs", missing_rows))
    journal = Journal(tmp_path, storage.insert_direct_sync, tables=(),
                      dedupe={"application_logs": storage.logs_not_stored})
    assert journal.open() == 0
    journal.close()
    assert storage.query_sync("SELECT count() AS n FROM application_logs")[0]["n"] == 5


async def test_log_writes_are_acknowledged_from_the_journal_and_visible_to_queries_at_once(
        make_client: Callable[..., Any], make_config: Callable[..., Any], tokens: Any, storage: Storage,
        chdb_dsn: str) -> None:
    from agent.wire import Batch, Record, encode_batch

    client = await make_client(make_config(storage={"dsn": chdb_dsn, "database": "unused",
                                                    "journal_flush_interval": "60s"}))
    token = tokens.create("ingest")
    admin = tokens.create("admin")
    when = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    records = [Record(timestamp=when, level="INFO", source="jr", message=f"journaled {i}") for i in range(3)]
    body = encode_batch(Batch(agent_id="a1", batch_id="jb-1", host="h", records=records))
    headers = {"Content-Type": "application/msgpack", **tokens.headers(token)}
    resp = await client.post("/v1/ingest", data=body, headers=headers)
    assert resp.status == 200 and (await resp.json())["accepted"] == 3
    # Acknowledged with the rows in the journal only (the flush is a minute away).
    assert storage.journal is not None and len(storage.journal.pending_rows("application_logs")) == 3
    assert storage.query_sync("SELECT count() AS n FROM application_logs", barrier=False)[0]["n"] == 0
    # A query waits for them: read-your-writes.
    resp = await client.get("/v1/logs", params={"source": "jr", "start": "-1h"}, headers=tokens.headers(admin))
    assert resp.status == 200
    assert sorted(log["message"] for log in (await resp.json())["logs"]) == [f"journaled {i}" for i in range(3)]
    # The resend of a journaled batch is a duplicate.
    resp = await client.post("/v1/ingest", data=body, headers=headers)
    assert (await resp.json())["duplicate"] is True
    # Records sent without a batch id get one, so a replay can recognise them too.
    line = {"timestamp": when, "level": "INFO", "source": "jr", "message": "no batch id"}
    resp = await client.post("/v1/ingest", data=json.dumps(line).encode() + b"\n",
                             headers={"Content-Type": "application/x-ndjson", **tokens.headers(token)})
    assert (await resp.json())["accepted"] == 1, await resp.text()
    [row] = await storage.query("SELECT batch_id FROM application_logs WHERE message = 'no batch id'")
    assert row["batch_id"].startswith("collector-")


def _ingest(url: str, token: str, batch_id: str, messages: list[str]) -> dict[str, Any]:
    from agent.wire import Batch, Record, encode_batch

    when = dt.datetime.now(dt.UTC).isoformat()
    body = encode_batch(Batch(agent_id="a1", batch_id=batch_id, host="h", records=[
        Record(timestamp=when, level="INFO", source="crash", message=m) for m in messages]))
    req = urllib.request.Request(f"{url}/v1/ingest", data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"})
    with urllib.request.urlopen(req, timeout=30) as r:
        result: dict[str, Any] = json.loads(r.read())
        return result


def test_a_collector_killed_after_acknowledging_logs_stores_each_exactly_once(
        collector_process_factory: Callable[..., Any], tmp_path: Path) -> None:
    data = tmp_path / "collector" / "clickhouse"
    proc = collector_process_factory({"storage": {"dsn": f"chdb://{data}", "journal_flush_interval": "60s"}})
    ingest = proc.create_token("ingest", "journal-test")
    admin = proc.create_token("admin", "journal-admin")
    proc.start()
    assert _ingest(proc.url, ingest, "crash-1", ["one", "two"])["accepted"] == 2
    # A page finds the first batch in the journal (merged, no flush) ...
    status, got = _api(proc.url, admin, "GET", "/v1/logs?source=crash&start=-1h")
    assert status == 200 and len(got["logs"]) == 2, got
    # ... a histogram waits for it to reach ClickHouse (read-your-writes), but
    # its record stays in the open segment: a replay finds it again.
    status, got = _api(proc.url, admin, "GET", "/v1/logs/histogram?source=crash&start=-1h&interval=1h")
    assert status == 200 and sum(sum(b["counts"].values()) for b in got["buckets"]) == 2, got
    assert _ingest(proc.url, ingest, "crash-2", ["three"])["accepted"] == 1
    with urllib.request.urlopen(f"{proc.url}/metrics", timeout=10) as r:
        metrics = dict(line.split(" ", 1) for line in r.read().decode().splitlines() if not line.startswith("#"))
    assert float(metrics["logferry_ingest_pending_rows"]) == 1  # the second batch waits in the journal
    assert float(metrics["logferry_gc_frozen_objects"]) > 10_000  # `serve` tuned the collector's GC (app.tune_gc)
    assert proc.proc is not None
    proc.proc.kill()  # SIGKILL: the second batch is only in the journal
    proc.proc.wait()
    proc.proc = None
    journal = Path(default_journal_dir(f"chdb://{data}", "logferry"))
    assert sum(p.stat().st_size for p in segments(journal)) > 0

    proc.start()
    status, got = _api(proc.url, admin, "GET", "/v1/logs?source=crash&start=-1h&limit=100")
    assert status == 200, got
    assert sorted(log["message"] for log in got["logs"]) == ["one", "three", "two"]
    # The agent's resend of either batch after the crash stores nothing again.
    assert _ingest(proc.url, ingest, "crash-2", ["three"])["duplicate"] is True
    assert _ingest(proc.url, ingest, "crash-1", ["one", "two"])["duplicate"] is True
    proc.stop()
    assert segments(journal) == []


async def test_a_row_clickhouse_cannot_parse_is_set_aside_and_never_blocks_the_table(
        storage: Storage, tmp_path: Path) -> None:
    journal = Journal(tmp_path, storage.insert_direct_sync, tables=(), flush_interval=0.01,
                      dedupe={"application_logs": storage.logs_not_stored})
    journal.open()
    try:
        good = [_log_row("bad-row-batch", i, "fine") for i in range(5)]
        broken = {**_log_row("bad-row-batch", 9, "broken"), "level": "NOT-A-LEVEL"}
        await journal.write("application_logs", [*good[:2], broken, *good[2:]])
        await journal.write("application_logs", [_log_row("next-batch", 0, "after")])
        await asyncio.get_running_loop().run_in_executor(None, journal.barrier, ["application_logs"])
    finally:
        journal.close()
    messages = sorted(r["message"] for r in storage.query_sync("SELECT message FROM application_logs"))
    assert messages == ["after 0", *[f"fine {i}" for i in range(5)]]
    [line] = (tmp_path / "rejected.ndjson").read_text().splitlines()
    rejected = json.loads(line)
    assert rejected["table"] == "application_logs" and rejected["row"]["message"] == "broken 9"
    assert "NOT-A-LEVEL" in rejected["error"]
    assert journal.stats["rejected_rows"] == 1


def test_a_bad_row_left_in_a_segment_does_not_stop_the_replay(storage: Storage, tmp_path: Path) -> None:
    rows = [_log_row("replay-bad", 0, "kept"), {**_log_row("replay-bad", 1, "broken"), "timestamp": "never"}]
    (tmp_path / f"segment-{1:020d}.log").write_bytes(encode_record("application_logs", rows))
    journal = Journal(tmp_path, storage.insert_direct_sync, tables=(),
                      dedupe={"application_logs": storage.logs_not_stored})
    journal.open()
    journal.close()
    assert [r["message"] for r in storage.query_sync("SELECT message FROM application_logs")] == ["kept 0"]
    assert "broken 1" in (tmp_path / "rejected.ndjson").read_text()


async def test_a_batch_resent_after_the_collector_forgot_it_is_stored_once(
        make_client: Callable[..., Any], make_config: Callable[..., Any], tokens: Any, storage: Storage,
        chdb_dsn: str) -> None:
    """Ingest asks memory only whether a batch is stored (no storage round trip
    per request); the journal's flush skips batches already in ClickHouse, and
    a restarted collector remembers the last hour's batches."""
    from agent.wire import Batch, Record, encode_batch
    from collector import appkeys

    config = make_config(storage={"dsn": chdb_dsn, "database": "unused", "journal_flush_interval": "50ms"})
    client = await make_client(config)
    headers = {"Content-Type": "application/msgpack", **tokens.headers(tokens.create("ingest"))}
    when = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    body = encode_batch(Batch(agent_id="a1", batch_id="forgotten", host="h", records=[
        Record(timestamp=when, level="INFO", source="resend", message=f"line {i}") for i in range(3)]))

    async def count() -> int:
        rows = await storage.query("SELECT count() AS n FROM application_logs WHERE source = 'resend'")
        return int(rows[0]["n"])

    assert (await (await client.post("/v1/ingest", data=body, headers=headers)).json())["accepted"] == 3
    assert await count() == 3
    writer = client.server.app[appkeys.LOG_WRITER]
    writer._seen.clear()  # as if it had been pushed out of memory
    answer = await (await client.post("/v1/ingest", data=body, headers=headers)).json()
    assert answer["duplicate"] is False  # memory no longer knows it ...
    assert await count() == 3  # ... but the flush found it stored and skipped it
    assert storage.journal is not None and storage.journal.stats["skipped_rows"] >= 3
    # A collector started afterwards knows the recent batches from storage.
    restarted = await make_client(config)
    answer = await (await restarted.post("/v1/ingest", data=body, headers=headers)).json()
    assert answer["duplicate"] is True
