"""``GET /v1/logs/tail``: new matching logs as server-sent events, live.

Ingest publishes every stored batch on the event bus; :class:`TailHub`
filters it once per open tail (same filters and token scope as ``GET
/v1/logs``, see :func:`collector.logquery.matches`) into a bounded queue, and
the handler writes what is queued at once, so a log reaches a tail within
milliseconds of being stored. Each event's ``id`` is a signed cursor: a client
that reconnects with ``Last-Event-ID`` gets what it missed from storage first
(up to ``tail_resume_max`` logs), then the live stream, without duplicates.

Limits: ``tail_max_per_token`` and ``tail_max_total`` concurrent tails (429
beyond), ``tail_buffer`` logs queued for a slow client (beyond it the stream
ends with an ``overflow`` event and the client resumes from storage). A
revoked or expired token's tails end within a second.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import msgspec
import orjson
from aiohttp import web

from collector import appkeys
from collector.auth import Principal, TokenScope, principal_of, requires
from collector.errors import ApiError
from collector.events import LOG, EventBus
from collector.logquery import (
    FILTER_PARAMS,
    INGEST_ORDER,
    Cursor,
    LogQuery,
    QueryError,
    apply_scope,
    cursor_after,
    cursor_from_line,
    decode_cursor,
    encode_cursor,
    ingest_cursor,
    matches,
    parse_filters,
    render_log,
    select_ingested_sql,
    select_json_sql,
)
from collector.logs_api import cursor_secret, json_lines, query_settings
from collector.logs_config import QueryConfig

log = logging.getLogger("logferry.collector.tail")

TAIL_PARAMS = FILTER_PARAMS | {"last_event_id"}
_FAR_FUTURE = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)


class TailSubscriber:
    """One open tail: its filters, scope and queue of matching logs."""

    def __init__(self, principal: Principal, query: LogQuery, scope: TokenScope | None, capacity: int):
        self.principal = principal
        self.query = query
        self.scope = scope
        self.capacity = capacity
        self.rows: collections.deque[Mapping[str, Any]] = collections.deque()
        self.wakeup = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Called from the publisher: filter and enqueue, never wait."""
        if self.overflowed or self.closed:
            return
        levels = self.query.levels
        for row in rows:
            if levels is not None and row.get("level") not in levels:
                continue
            if matches(self.query, self.scope, row):
                if len(self.rows) >= self.capacity:
                    self.overflowed = True
                    break
                self.rows.append(row)
        if self.rows or self.overflowed:
            self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


class TooManyTails(Exception):
    pass


class TailHub:
    """Fans ingest's ``log`` events out to the open tails."""

    def __init__(self, events: EventBus, config: QueryConfig):
        self.config = config
        self.subscribers: set[TailSubscriber] = set()
        self.per_token: collections.Counter[str] = collections.Counter()
        self._events = events
        # Subscribed only while a tail is open: ingest skips building events
        # nobody listens to.
        self._unsubscribe: Callable[[], None] | None = None

    def _on_logs(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for sub in list(self.subscribers):
            sub.offer(rows)

    def attach(self, sub: TailSubscriber) -> None:
        token = sub.principal.token_id
        if self.per_token[token] >= self.config.tail_max_per_token:
            raise TooManyTails(f"this token already has {self.config.tail_max_per_token} open tails (the limit)")
        if len(self.subscribers) >= self.config.tail_max_total:
            raise TooManyTails(f"this collector already serves {self.config.tail_max_total} tails (the limit)")
        self.per_token[token] += 1
        self.subscribers.add(sub)
        if self._unsubscribe is None:
            self._unsubscribe = self._events.subscribe(LOG, self._on_logs)

    def detach(self, sub: TailSubscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            token = sub.principal.token_id
            self.per_token[token] -= 1
            if self.per_token[token] <= 0:
                del self.per_token[token]
        if not self.subscribers and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def close_all(self) -> None:
        for sub in list(self.subscribers):
            sub.close()

    def stop(self) -> None:
        self.close_all()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


def _ingest_order(row: Mapping[str, Any]) -> tuple[str, str]:
    return str(row.get("ingested_at", "")), str(row["id"])


def _event(event_id: str | None, name: str, data: bytes) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return head.encode() + f"event: {name}\n".encode() + b"data: " + data + b"\n\n"


def _parse_tail(request: web.Request) -> tuple[LogQuery, Cursor | None]:
    try:
        fields = parse_filters(request.query, allowed=TAIL_PARAMS)
        last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        cursor = None
        if last:
            try:
                cursor = decode_cursor(cursor_secret(request.app), last.strip())
            except QueryError:
                raise QueryError("Last-Event-ID", "not an event id this collector issued") from None
    except QueryError as exc:
        raise ApiError(400, "bad_parameter", str(exc)) from None
    now = dt.datetime.now(dt.UTC)
    return LogQuery(start=now, end=_FAR_FUTURE, order="asc", **fields), cursor


async def _replay(app: web.Application, query: LogQuery, scope: TokenScope | None,
                  cursor: Cursor) -> AsyncIterator[list[tuple[Cursor, bytes]]]:
    """Stored logs after ``cursor`` up to now, in the order the tail sends
    them (ingest order), in pages of (event id, rendered log). Logs stored
    while the client was away are found even when their own timestamps are
    older than the last one it saw (late or backfilled logs). Cursors of the
    older, timestamp-ordered kind are resumed by timestamp."""
    config = app[appkeys.CONFIG].query
    now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    oldest = now - dt.timedelta(seconds=config.max_range)
    left = config.tail_resume_max
    storage = app[appkeys.STORAGE]
    settings = query_settings(app)
    if cursor.order == INGEST_ORDER:
        window = msgspec.structs.replace(query, start=oldest, end=now, after=None)
        while left > 0:
            size = min(left, 5000)
            sql, params = select_ingested_sql(window, scope, cursor, limit=size)
            page = []
            for line in await json_lines(storage, sql, params, settings):
                log_line, _, ingested = line.rpartition(b"\t")
                cursor = Cursor(timestamp=ingested.decode(), id=orjson.loads(log_line)["id"], order=INGEST_ORDER)
                page.append((cursor, log_line))
            if page:
                yield page
            left -= len(page)
            if len(page) < size:
                return
        yield []  # the cap was reached: tell the caller
        return
    position = dt.datetime.fromisoformat(cursor.timestamp).replace(tzinfo=dt.UTC)
    replay = msgspec.structs.replace(query, start=max(oldest, position), end=now,
                                     after=Cursor(timestamp=cursor.timestamp, id=cursor.id, order="asc"))
    while left > 0:
        size = min(left, 5000)
        sql, params = select_json_sql(replay, scope, limit=size)
        lines = await json_lines(storage, sql, params, settings)
        if lines:
            yield [(cursor_from_line(line, replay), line) for line in lines]
        left -= len(lines)
        if len(lines) < size:
            return
        replay = msgspec.structs.replace(replay, after=cursor_from_line(lines[-1], replay))
    yield []  # the cap was reached: tell the caller


@requires("admin", "logs")
async def tail_logs(request: web.Request) -> web.StreamResponse:
    app = request.app
    hub = app[appkeys.TAIL_HUB]
    config = app[appkeys.CONFIG].query
    tokens = app[appkeys.TOKENS]
    principal = principal_of(request)
    wanted, cursor = _parse_tail(request)
    query = apply_scope(wanted, principal.scope)
    sub = TailSubscriber(principal, query or msgspec.structs.replace(wanted, levels=[]), principal.scope,
                         config.tail_buffer)
    try:
        hub.attach(sub)
    except TooManyTails as exc:
        raise ApiError(429, "too_many_tails", str(exc), headers={"Retry-After": "5"}) from None
    secret = cursor_secret(app)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
    })
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n: tailing\n\n")
        replayed: set[str] = set()
        if cursor is not None and query is not None:
            async for page in _replay(app, query, principal.scope, cursor):
                if not page:
                    await response.write(_event(None, "truncated", orjson.dumps(
                        {"message": f"more than {config.tail_resume_max} logs were missed; "
                                    "use GET /v1/logs to read the rest"})))
                    break
                chunk = []
                for position, line in page:
                    replayed.add(position.id)
                    chunk.append(_event(encode_cursor(secret, position), "log", line))
                await response.write(b"".join(chunk))
        loop = asyncio.get_running_loop()
        last_beat = loop.time()
        while not sub.closed:
            if not tokens.is_active(principal.token_id):
                await response.write(_event(None, "error", b'{"code":"unauthorized"}'))
                break
            if sub.rows:
                rows = list(sub.rows)
                sub.rows.clear()
                # Ingest order, as a resume reads storage: batches come stamped in
                # increasing ingested_at (LogWriter.stamp); within one, by id.
                rows.sort(key=_ingest_order)
                chunk = []
                for row in rows:
                    if replayed and str(row["id"]) in replayed:
                        continue
                    event_id = encode_cursor(secret, ingest_cursor(row) if "ingested_at" in row
                                             else cursor_after(row, wanted))
                    chunk.append(_event(event_id, "log", orjson.dumps(render_log(row), default=str)))
                if chunk:
                    await response.write(b"".join(chunk))
            if sub.overflowed:
                await response.write(_event(None, "overflow", orjson.dumps(
                    {"message": "the client fell more than tail_buffer logs behind; reconnect with Last-Event-ID"})))
                break
            if loop.time() - last_beat >= config.tail_heartbeat:
                await response.write(b": ping\n\n")
                last_beat = loop.time()
            sub.wakeup.clear()
            if not sub.rows and not sub.overflowed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # not wait_for: see NotificationService._run
                        await sub.wakeup.wait()
    finally:
        hub.detach(sub)
    return response


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    hub = TailHub(app[appkeys.EVENTS], app[appkeys.CONFIG].query)
    app[appkeys.TAIL_HUB] = hub
    yield
    hub.stop()


async def _close_tails(app: web.Application) -> None:
    # Before the server waits for handlers to finish: end every stream.
    if appkeys.TAIL_HUB in app:
        app[appkeys.TAIL_HUB].close_all()


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_hub_ctx)
    app.on_shutdown.append(_close_tails)
    app.router.add_get("/v1/logs/tail", tail_logs)
