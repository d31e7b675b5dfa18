"""``POST /v1/ingest``: decode, validate, redact, store, acknowledge.

A request is answered only after its rows are stored, so an acknowledged
batch is durable. "Stored" means appended to the collector's write-ahead
journal and fsynced (collector.journal; ~2 ms), when the journal is on (the
default): its flusher writes coalesced inserts into ClickHouse at most every
``storage.journal_flush_interval``, and log reads see every row acknowledged
before them (pages merge the journal's rows, collector.logs_api; other reads
wait for them). With ``storage.journal: off``, rows from all requests are
coalesced per table and inserted at most every ``ingest.flush_interval``
(100 ms), and requests wait for that insert.

A ``batch_id`` is stored once, across restarts too: the batch id is recorded
by the same INSERT that stores the logs (a materialized view into
``ingest_batches``), so no crash can leave logs stored but their batch
unknown, and the journal's flushes and replay skip the batches already
stored (Storage.logs_not_stored). A batch this collector remembers (the last
200,000, and after a restart the last hour's) is answered ``duplicate: true``.

A duplicate's answer carries the records the first request rejected: they
are stored (``ingest_rejections``, through the journal) before the batch's
rows, so an agent that lost the first answer (a crash, a dropped
connection) still learns what to dead-letter.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import hmac
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import orjson
from aiohttp import web

from agent.parsers import JOINED_FORMATS, SHIPPED_FORMATS, parse_shipped_lines
from agent.redact import Redactor
from agent.wire import (
    MULTILINE_FEATURE,
    DecodedBatch,
    Level,
    Record,
    WireError,
    decode_json_batch,
    decode_msgpack_batch,
    decode_ndjson,
    lines_feature,
    parse_level,
    parse_timestamp,
)
from collector import appkeys
from collector.auth import requires
from collector.config import TIERS, CollectorConfig, IngestConfig
from collector.errors import json_error
from collector.events import LOG
from collector.journal import Journal, JournalFull
from collector.storage import LOGS_TABLE, Storage

log = logging.getLogger("logferry.collector.ingest")

MAX_MESSAGE_BYTES = 10 * 1024
MAX_CONTEXT_BYTES = 50 * 1024
MAX_FIELD_CHARS = 4096
MAX_ERROR_STACK_BYTES = 256 * 1024
MAX_TAGS = 64
BATCH_NAMESPACE = uuid.UUID("6b1f3c1e-1d2b-4f57-9a53-3f4d0c2f7a10")


class Overloaded(Exception):
    """Too many rows are waiting for storage: the caller should retry later."""


class _Pending:
    __slots__ = ("future", "rows")

    def __init__(self, rows: Sequence[Mapping[str, Any]], future: asyncio.Future[None]):
        self.rows = rows
        self.future = future


class TableWriter:
    """Coalesces rows for one table into one insert at most every ``interval``
    seconds; ``write`` returns once the rows are stored (or raises)."""

    def __init__(self, storage: Storage, table: str, *, interval: float, max_pending_rows: int):
        self.storage = storage
        self.table = table
        self.interval = interval
        self.max_pending_rows = max_pending_rows
        self._queue: list[_Pending] = []
        self._pending_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_flush = 0.0
        self.flushes = 0
        self.rows_written = 0
        self.insert_seconds: list[float] = []  # recent insert latencies, for metrics and bench

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"writer:{self.table}")

    async def stop(self) -> None:
        """Flush what is queued, then stop."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        if self._queue:
            await self._flush()

    async def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        if self._pending_rows + len(rows) > self.max_pending_rows:
            raise Overloaded(f"{self._pending_rows} rows are waiting for storage")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, future))
        self._pending_rows += len(rows)
        self._wakeup.set()
        if self._task is None:
            self.start()
        await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            # Idle writers flush at once; busy ones at most every `interval`.
            wait = self._last_flush + self.interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._wakeup.clear()
            await self._flush()

    async def _flush(self) -> None:
        queue, self._queue = self._queue, []
        if not queue:
            return
        rows = [row for pending in queue for row in pending.rows]
        self._last_flush = time.monotonic()
        started = time.perf_counter()
        try:
            await self.storage.insert_rows(self.table, rows)
        except Exception as exc:
            log.error("insert failed", extra={"table": self.table, "rows": len(rows), "error": str(exc)[:300]})
            for pending in queue:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        else:
            elapsed = time.perf_counter() - started
            self.insert_seconds.append(elapsed)
            if len(self.insert_seconds) > 2048:
                del self.insert_seconds[:1024]
            self.flushes += 1
            self.rows_written += len(rows)
            for pending in queue:
                if not pending.future.done():
                    pending.future.set_result(None)
        finally:
            self._pending_rows -= len(rows)


#: Batch ids a collector remembers as stored (the most recent ones).
SEEN_MAX = 200_000


class LogWriter:
    """Stores log rows and remembers stored batch ids."""

    def __init__(self, storage: Storage, config: IngestConfig):
        self.logs = TableWriter(storage, LOGS_TABLE, interval=config.flush_interval,
                                max_pending_rows=config.max_pending_rows)
        self.batches = TableWriter(storage, "ingest_batches", interval=config.flush_interval,
                                   max_pending_rows=1_000_000)
        self.storage = storage
        # batch id → whether rejections of it are stored (None: not known here;
        # storage is asked when a duplicate of it needs its answer).
        self._seen: OrderedDict[str, bool | None] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_ingested_ms = 0

    def start(self) -> None:
        self.logs.start()
        self.batches.start()

    async def stop(self) -> None:
        await self.logs.stop()
        await self.batches.stop()

    def _remember(self, batch_id: str, rejections: bool | None = None) -> None:
        self._seen[batch_id] = rejections
        if len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)

    async def preload(self, window: float = 3600.0) -> int:
        """Remember the batch ids stored in the last ``window`` seconds (at
        most the memory's size), so that an agent resending after a restart of
        this collector is told ``duplicate`` without a storage lookup."""
        rows = await self.storage.query(
            "SELECT batch_id FROM ingest_batches WHERE received_at >= now64(3) - toIntervalSecond({w:UInt32}) "
            "ORDER BY received_at DESC LIMIT {n:UInt32}", {"w": int(window), "n": SEEN_MAX})
        rejections = await self.storage.query(
            "SELECT DISTINCT batch_id FROM ingest_rejections "
            "WHERE received_at >= now64(3) - toIntervalSecond({w:UInt32})", {"w": int(window)})
        with_rejections = {row["batch_id"] for row in rejections}
        for row in reversed(rows):  # the newest are remembered last, so forgotten last
            self._remember(row["batch_id"], row["batch_id"] in with_rejections)
        return len(rows)

    async def stored_rejections(self, batch_id: str) -> list[dict[str, Any]]:
        """What the request that stored ``batch_id`` answered in ``rejected``
        (for a duplicate's answer)."""
        if self._seen.get(batch_id) is False:
            return []
        rows = await self.storage.query(
            "SELECT rejected FROM ingest_rejections FINAL WHERE batch_id = {b:String} LIMIT 1", {"b": batch_id})
        if not rows:
            return []
        found = orjson.loads(rows[0]["rejected"])
        return found if isinstance(found, list) else []

    async def already_stored(self, batch_id: str) -> bool:
        """Whether the batch is stored. With the journal this asks memory only:
        its flusher skips the rows of batches already in ClickHouse
        (Storage.logs_not_stored), so a batch resent after this collector's
        memory forgot it is still stored once, without a storage round trip on
        every request (~3.5 ms, and a wait behind any running insert)."""
        if batch_id in self._seen:
            return True
        if self.journal is not None:
            return False
        rows = await self.storage.query(
            "SELECT 1 AS found FROM ingest_batches WHERE batch_id = {b:String} LIMIT 1", {"b": batch_id}
        )
        if rows:
            self._remember(batch_id)
            return True
        return False

    def stamp(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Give rows their ``ingested_at``: the time they were handed to
        storage, in ms, strictly increasing from one call to the next on this
        collector. A tail sends logs in ``(ingested_at, id)`` order, the order
        of storage, and resumes by it (collector.tail) without missing logs
        whose own timestamps are older than the last one it sent."""
        now = max(int(time.time() * 1000), self._last_ingested_ms + 1)
        self._last_ingested_ms = now
        text = _ts(dt.datetime.fromtimestamp(now / 1000, dt.UTC))
        for row in rows:
            row["ingested_at"] = text  # type: ignore[index]

    @property
    def journal(self) -> Journal | None:
        """The write-ahead journal that stores log rows, if one is attached."""
        journal = self.storage.journal
        return journal if journal is not None and journal.journaled(LOGS_TABLE) else None

    async def _store(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Stamp and store rows (the caller hands them over: they are not copied)."""
        self.stamp(rows)
        journal = self.journal
        if journal is None:
            await self.logs.write(rows)
            return
        if not all(row.get("batch_id") for row in rows):
            # The journal's replay recognises stored rows by their batch id.
            batch_id = f"collector-{uuid.uuid4().hex}"
            for row in rows:
                if not row.get("batch_id"):
                    row["batch_id"] = batch_id  # type: ignore[index]
        try:
            await journal.write(LOGS_TABLE, rows, copy=False)
        except JournalFull as exc:
            raise Overloaded(str(exc)) from exc

    async def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Store log rows (no batch bookkeeping): for derived records."""
        await self._store(rows)

    async def write_batch(self, batch_id: str, agent_id: str, rows: Sequence[Mapping[str, Any]], *,
                          checked: bool = False, rejected: Sequence[Mapping[str, Any]] = ()) -> bool:
        """Store a batch's rows once; False if the batch was already stored.
        ``checked``: the caller found the batch id unknown to storage (with
        :meth:`already_stored`) just before; only a concurrent request with the
        same id can have stored it since, and that one is remembered here.
        ``rejected``: the batch's rejections, stored first (:meth:`stored_rejections`)."""
        if not batch_id:
            await self._store(rows)
            return True
        lock = self._locks.setdefault(batch_id, asyncio.Lock())
        try:
            async with lock:
                if batch_id in self._seen or (not checked and await self.already_stored(batch_id)):
                    return False
                if rejected:
                    # Before the rows: once a resend can be answered as a
                    # duplicate, its answer can say what was rejected.
                    await self.storage.insert_rows("ingest_rejections", [{
                        "batch_id": batch_id, "received_at": _ts(dt.datetime.now(dt.UTC)),
                        "rejected": orjson.dumps(list(rejected)).decode(),
                    }])
                if rows:
                    # The insert that stores the rows records the batch too
                    # (the ingest_batches_from_logs view, migration 16).
                    await self._store(rows)
                else:
                    # Every record rejected: remembered so a resend is a duplicate.
                    await self.batches.write([{
                        "batch_id": batch_id, "agent_id": agent_id, "accepted": 0,
                        "received_at": _ts(dt.datetime.now(dt.UTC)),
                    }])
                self._remember(batch_id, bool(rejected))
                return True
        finally:
            if not lock.locked() and self._locks.get(batch_id) is lock:
                del self._locks[batch_id]


def _ts(value: dt.datetime) -> str:
    """ClickHouse's DateTime64(3) text form of a UTC datetime (isoformat is ~4x faster than strftime)."""
    return value.isoformat(sep=" ", timespec="milliseconds")[:23]


class RetentionPolicy:
    """Maps a source to its retention days (first matching rule wins)."""

    def __init__(self, config: CollectorConfig):
        self._rules = [(r.sources, TIERS[r.tier]) for r in config.retention.rules]
        self._default = TIERS[config.retention.default_tier]
        self._cache: dict[str, int] = {}

    def days_for(self, source: str) -> int:
        days = self._cache.get(source)
        if days is None:
            days = self._default
            for globs, tier_days in self._rules:
                if any(fnmatch.fnmatchcase(source, g) for g in globs):
                    days = tier_days
                    break
            if len(self._cache) < 10_000:
                self._cache[source] = days
        return days


_LEVEL_NAMES = {level.name: level.name for level in Level}


def _stored_time(value: object) -> str | None:
    """The DateTime64(3) text of a record's timestamp, or None if it is not one.
    The agent's usual form (``2026-12-01T10:00:00.123Z``) and Python's UTC
    isoformat (``…:00.123456+00:00``) are checked and cut as text (to the
    millisecond, as the general path does); anything else goes through
    :func:`parse_timestamp`."""
    if type(value) is str and _AGENT_TIME.fullmatch(value):
        try:
            parsed = _fromisoformat(value[:19])  # the calendar: month 13, February 30, hour 24
        except ValueError:
            return None
        return f"{value[:10]} {value[11:23]}" if 1970 <= parsed.year <= 2261 else None
    ts = parse_timestamp(value)
    return None if ts is None else _ts(ts)


_fromisoformat = dt.datetime.fromisoformat
# The agent's form, and Python's isoformat() of an aware UTC time (what SDKs send).
_AGENT_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(?:\d{3})?(?:Z|\+00:00)", re.ASCII)


_OPTIONAL_TEXT = ("user_id", "session_id", "request_id", "ip_address", "user_agent")


def validate_record(record: Record, extra: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, Any] | None, str | None]:
    """A storable row for a record, or the reason it is rejected. ``extra``:
    more columns for the row (the row is built once, with them)."""
    stamp = _stored_time(record.timestamp)
    if stamp is None:
        return None, "timestamp: not a valid RFC 3339 time or Unix epoch seconds"
    level_name = _LEVEL_NAMES.get(record.level) if type(record.level) is str else None
    if level_name is None:
        level = parse_level(record.level)
        if level is None:
            return None, f"level: {record.level[:40]!r} is not one of DEBUG, INFO, WARN, ERROR, CRITICAL"
        level_name = level.name
    source = record.source
    if not source or len(source) > 256:
        return None, "source: must be 1–256 characters"
    message = record.message
    # At most 4 bytes a character: only long messages need encoding to be measured.
    if len(message) * 4 > MAX_MESSAGE_BYTES and len(message.encode("utf-8")) > MAX_MESSAGE_BYTES:
        return None, f"message: larger than the 10 KB limit ({MAX_MESSAGE_BYTES} bytes)"
    context = "{}"
    if record.context:
        context_bytes = orjson.dumps(record.context)
        if len(context_bytes) > MAX_CONTEXT_BYTES:
            return None, f"context: larger than the 50 KB limit ({MAX_CONTEXT_BYTES} bytes as JSON)"
        context = context_bytes.decode("utf-8")
    user_id, session_id, request_id = record.user_id, record.session_id, record.request_id
    ip_address, user_agent = record.ip_address, record.user_agent
    # One test for the usual case, where none of them is long.
    if (user_id is not None and len(user_id) > MAX_FIELD_CHARS) \
            or (session_id is not None and len(session_id) > MAX_FIELD_CHARS) \
            or (request_id is not None and len(request_id) > MAX_FIELD_CHARS) \
            or (ip_address is not None and len(ip_address) > MAX_FIELD_CHARS) \
            or (user_agent is not None and len(user_agent) > MAX_FIELD_CHARS):
        name = next(n for n in _OPTIONAL_TEXT if len(getattr(record, n) or "") > MAX_FIELD_CHARS)
        return None, f"{name}: longer than {MAX_FIELD_CHARS} characters"
    error_stack = record.error_stack
    if error_stack is not None and len(error_stack) > MAX_ERROR_STACK_BYTES:
        return None, f"error_stack: larger than {MAX_ERROR_STACK_BYTES} bytes"
    tags = record.tags
    if not tags:
        tags = []
    elif len(tags) > MAX_TAGS or max(map(len, tags)) > 256:
        return None, f"tags: at most {MAX_TAGS} tags of at most 256 characters"
    duration_ms = record.duration_ms
    if duration_ms is not None and not (0 <= duration_ms < 1e12):
        return None, "duration_ms: must be a non-negative number"
    row = {
        "timestamp": stamp,
        "level": level_name,
        "source": source,
        "message": message,
        "context": context,
        "user_id": user_id,
        "session_id": session_id,
        "request_id": request_id,
        "ip_address": ip_address,
        "user_agent": user_agent,
        "duration_ms": duration_ms,
        "error_stack": error_stack,
        "tags": tags,
        "host": record.host or "",
        "file": record.file or "",
        "offset": record.offset or 0,
    }
    if extra:
        row.update(extra)
    return row, None


SUPPORTED_ENCODINGS = ("", "identity", "zstd", "gzip", "x-gzip", "deflate")


# Told to agents in every ingest answer (see agent.wire.LINES_FEATURE):
# the formats whose lines this collector parses when shipped as read.
FEATURES = sorted([*(lines_feature(fmt) for fmt in SHIPPED_FORMATS), MULTILINE_FEATURE])


class UnsupportedMedia(Exception):
    pass


def decode_body(body: bytes, content_type: str) -> DecodedBatch:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack"):
        return decode_msgpack_batch(body)
    if ctype == "application/json":
        return decode_json_batch(body)
    if ctype in ("application/x-ndjson", "application/ndjson", "application/jsonl"):
        return decode_ndjson(body)
    raise UnsupportedMedia(
        f"Content-Type {ctype or '(none)'!r} is not supported "
        "(use application/msgpack, application/json or application/x-ndjson)"
    )


MAX_FUTURE = dt.timedelta(days=1)


def add_shipped_lines(batch: DecodedBatch, redactor: Redactor | None = None) -> tuple[int, int]:
    """Parse the lines an agent shipped as read (``batch.lines``) into
    ``batch.records``, numbered after the body's records; a group whose
    settings are invalid rejects each of its lines with the reason.
    ``redactor``: redacts the records of JOINED_FORMATS groups (for a batch
    the rest of which is not redacted here). Returns the number of lines and
    of lines that did not parse."""
    index = batch.lines_index
    total = parse_errors = 0
    for group in batch.lines:
        try:
            numbered, count, errors = parse_shipped_lines(group, batch.host)
        except Exception as exc:  # invalid settings (ValueError), or a parser bug: reject, never a 500
            if not isinstance(exc, ValueError):
                log.error("cannot parse shipped lines", extra={"error": f"{type(exc).__name__}: {exc}"[:300],
                                                               "source": group.source[:200]})
            reason = str(exc) if isinstance(exc, ValueError) else f"lines: cannot be parsed ({type(exc).__name__})"
            count = group.data.count(b"\n") + (1 if group.data[-1:] not in (b"\n", b"") else 0)
            batch.errors.extend((index + i, reason) for i in range(count))
        else:
            if redactor is not None and group.format in JOINED_FORMATS:
                numbered = [(i, redactor.redact_record(record)) for i, record in numbered]
            batch.records.extend((index + i, record) for i, record in numbered)
            parse_errors += errors
        index += count
        total += count
    return total, parse_errors


def build_rows(batch: DecodedBatch, redactor: Redactor | None, retention: RetentionPolicy,
               now: dt.datetime | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows to store and the rejected records (index and reason)."""
    rejected: list[dict[str, Any]] = [{"index": i, "error": e} for i, e in batch.errors]
    rows: list[dict[str, Any]] = []
    append = rows.append
    now = now or dt.datetime.now(dt.UTC)
    newest = _ts(now + MAX_FUTURE)
    # Per source: its retention days and the oldest timestamp they keep.
    by_source: dict[str, tuple[int, str]] = {}
    # Ids derived from (batch_id, index): a resent batch gets the same ids.
    id_prefix = str(uuid.uuid5(BATCH_NAMESPACE, batch.batch_id))[:24] if batch.batch_id else None
    # The columns every row of the batch shares, set with the row's own.
    shared = {"agent_id": batch.agent_id, "batch_id": batch.batch_id}
    batch_host = batch.host
    redact = redactor.redact_record if redactor is not None else None
    for index, record in batch.records:
        if redact is not None:
            record = redact(record)
        row, error = validate_record(record, shared)
        if row is None:
            rejected.append({"index": index, "error": error})
            continue
        source = row["source"]
        kept = by_source.get(source)
        if kept is None:
            days = retention.days_for(source)
            kept = by_source[source] = (days, _ts(now - dt.timedelta(days=days)))
        days, cutoff = kept
        stamp = row["timestamp"]
        # Rows past their retention would be dropped by the TTL at the next
        # merge: say so now instead of acknowledging data that then vanishes.
        if stamp < cutoff:
            rejected.append({"index": index, "error": f"timestamp: older than the {days}-day retention of "
                                                      f"source {source!r}"})
            continue
        if stamp > newest:
            rejected.append({"index": index, "error": "timestamp: more than a day in the future"})
            continue
        row["id"] = f"{id_prefix}{index:012x}" if id_prefix is not None else str(uuid.uuid4())
        if not row["host"]:
            row["host"] = batch_host
        row["retention_days"] = days
        append(row)
    rejected.sort(key=lambda r: r["index"])
    return rows, rejected


ROWS_PER_SLICE = 1000


async def build_rows_in_slices(batch: DecodedBatch, redactor: Redactor | None,
                               retention: RetentionPolicy) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`build_rows` a thousand records at a time, letting other requests
    run in between: a batch of many thousand lines costs ~9 ms per thousand."""
    if len(batch.records) <= ROWS_PER_SLICE:
        return build_rows(batch, redactor, retention)
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    now = dt.datetime.now(dt.UTC)
    records = batch.records
    for start in range(0, len(records), ROWS_PER_SLICE):
        part = msgspec.structs.replace(batch, records=records[start:start + ROWS_PER_SLICE],
                                       errors=batch.errors if start == 0 else [])
        more_rows, more_rejected = build_rows(part, redactor, retention, now)
        rows.extend(more_rows)
        rejected.extend(more_rejected)
        await asyncio.sleep(0)
    rejected.sort(key=lambda r: r["index"])
    return rows, rejected


def stored_events(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows as pipeline events: ApplicationLog field names, typed values."""
    events = []
    for row in rows:
        event = dict(row)
        event["timestamp"] = dt.datetime.fromisoformat(row["timestamp"]).replace(tzinfo=dt.UTC)
        event["context"] = orjson.loads(row["context"])
        events.append(event)
    return events


async def duplicate_answer(app: web.Application, batch_id: str) -> web.StreamResponse:
    """The answer to a batch stored before: nothing stored again, and the
    rejections the first answer carried, for an agent that never got it."""
    app[appkeys.METRICS].inc("logferry_ingest_duplicate_batches_total")
    try:
        rejected = await app[appkeys.LOG_WRITER].stored_rejections(batch_id)
    except Exception as exc:
        log.error("ingest: cannot read a duplicate's rejections", extra={"error": str(exc)[:300]})
        return json_error(503, "storage_unavailable", "storage is not answering; retry later",
                          headers={"Retry-After": "2"})
    return web.Response(body=orjson.dumps({"accepted": 0, "rejected": rejected, "duplicate": True,
                                           "features": FEATURES}), content_type="application/json")


@requires("ingest", "admin")
async def handle_ingest(request: web.Request) -> web.StreamResponse:
    """POST /v1/ingest (ingest or admin token)."""
    app = request.app
    config = app[appkeys.CONFIG]
    limits = config.ingest
    metrics = app[appkeys.METRICS]
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in SUPPORTED_ENCODINGS:
        return json_error(415, "unsupported_media_type",
                          f"Content-Encoding {encoding!r} is not supported (use zstd or gzip)")
    if request.content_length is not None and request.content_length > limits.max_body:
        return json_error(413, "body_too_large", f"body is larger than the {int(limits.max_body)}-byte limit")
    # aiohttp decompresses zstd/gzip incrementally as we read, so counting the
    # bytes read bounds the decompressed size too: a bomb stops at the limit.
    limit = int(limits.max_decompressed if encoding not in ("", "identity") else limits.max_body)
    body = bytearray()
    try:
        async for chunk in request.content.iter_chunked(256 * 1024):
            body.extend(chunk)
            if len(body) > limit:
                what = "decompressed body" if limit == limits.max_decompressed else "body"
                return json_error(413, "body_too_large", f"{what} is larger than the {limit}-byte limit")
    except Exception as exc:  # a corrupt compressed stream surfaces here
        return json_error(400, "bad_request", f"cannot read the {encoding or 'request'} body: {exc}")
    try:
        batch = decode_body(bytes(body), request.headers.get("Content-Type", ""))
    except UnsupportedMedia as exc:
        return json_error(415, "unsupported_media_type", str(exc))
    except WireError as exc:
        return json_error(400, "bad_request", str(exc))
    writer = app[appkeys.LOG_WRITER]
    if batch.batch_id and len(batch.batch_id) > 128:
        return json_error(400, "bad_request", "batch_id: longer than 128 characters")
    if batch.batch_id and await writer.already_stored(batch.batch_id):
        return await duplicate_answer(app, batch.batch_id)
    # Agents redact before shipping: a batch redacted with the same rules as
    # this collector's has nothing left to find (but in the records of
    # JOINED_FORMATS lines). Everything else is redacted here.
    redactor: Redactor | None = app[appkeys.REDACTOR]
    agent_redacted = None
    if batch.redacted or (batch.redacted_with and redactor is not None
                          and hmac.compare_digest(batch.redacted_with.encode(), redactor.fingerprint.encode())):
        redactor, agent_redacted = None, redactor
    lines = 0
    if batch.lines:
        lines, parse_errors = add_shipped_lines(batch, agent_redacted)
        metrics.inc("logferry_ingest_lines_total", lines)
        if parse_errors:
            metrics.inc("logferry_ingest_parse_errors_total", parse_errors)
    rows, rejected = await build_rows_in_slices(batch, redactor, app[appkeys.RETENTION])
    try:
        stored = await writer.write_batch(batch.batch_id, batch.agent_id, rows, checked=True, rejected=rejected)
    except Overloaded:
        metrics.inc("logferry_ingest_throttled_total")
        return json_error(429, "overloaded", "the collector is busy storing; retry later",
                          headers={"Retry-After": "1"})
    except Exception as exc:
        log.error("ingest store failed", extra={"error": str(exc)[:300]})
        return json_error(503, "storage_unavailable", "storage is not accepting writes; retry later",
                          headers={"Retry-After": "2"})
    if not stored:
        return await duplicate_answer(app, batch.batch_id)
    metrics.inc("logferry_ingest_records_total", len(rows))
    metrics.inc("logferry_ingest_rejected_total", len(rejected))
    events = app[appkeys.EVENTS]
    if rows and events.has_subscribers(LOG):
        events.publish(LOG, stored_events(rows))
    answer: dict[str, Any] = {"accepted": len(rows), "rejected": rejected, "duplicate": False,
                              "features": FEATURES}
    if batch.lines:
        answer["lines"] = lines
    return web.Response(body=orjson.dumps(answer), content_type="application/json")
