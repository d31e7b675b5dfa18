"""``GET /v1/logs``: one page of logs (JSON) or every match (NDJSON export).

Both are served from JSON lines that ClickHouse renders itself, so neither a
page nor an export builds Python objects per row; an export pages by keyset
(``(timestamp, id)``), so its memory is bounded by one page whatever it streams.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson
from aiohttp import web

from collector import appkeys
from collector.auth import Principal, TokenScope, principal_of, requires
from collector.errors import ApiError
from collector.logquery import (
    LogQuery,
    QueryError,
    SearchWindows,
    apply_scope,
    ch_time,
    cursor_from_line,
    encode_cursor,
    matches,
    parse_query,
    render_log,
    select_json_sql,
)
from collector.storage import LOGS_TABLE, Storage

log = logging.getLogger("logferry.collector.logs")

NDJSON = "application/x-ndjson"


def cursor_secret(app: web.Application) -> bytes:
    return hashlib.sha256(b"logferry-cursor:" + app[appkeys.CONFIG].secret_key.encode()).digest()


def query_settings(app: web.Application) -> dict[str, Any]:
    """ClickHouse settings of every read: the configured time limit, and data
    files read through mmap. A page of logs reads a block of every column at
    each of its ~100 scattered rows (~2,700 small reads on 10M logs); mmap
    (files kept mapped by ClickHouse's mmap cache, dropped whenever parts are
    removed) saves a pread and a copy out of the page cache each: for the
    bench's rare word 21 MB copied -> 0 and 103 file opens -> 12 per query,
    ~6 ms of 44 (measured on 2 cores); histograms and scans read the same."""
    timeout = app[appkeys.CONFIG].query.query_timeout
    return {"max_execution_time": max(1, round(timeout)), "timeout_overflow_mode": "throw",
            "local_filesystem_read_method": "mmap", "min_bytes_to_use_mmap_io": 1}


def parse_log_query(request: web.Request, **kwargs: Any) -> LogQuery:
    """The request's query as sent (ApiError 400 naming a bad parameter)."""
    config = request.app[appkeys.CONFIG].query
    try:
        return parse_query(request.query, now=dt.datetime.now(dt.UTC), cursor_secret=cursor_secret(request.app),
                           max_range=dt.timedelta(seconds=config.max_range), limit_max=config.max_limit, **kwargs)
    except QueryError as exc:
        raise ApiError(400, "bad_parameter", str(exc)) from None


def parse_request(request: web.Request, **kwargs: Any) -> tuple[LogQuery | None, Principal]:
    """The request's query narrowed to the caller's scope (None: nothing can match)."""
    principal = principal_of(request)
    return apply_scope(parse_log_query(request, **kwargs), principal.scope), principal


def storage_error(exc: Exception, timeout: float) -> ApiError:
    """A storage failure as an API error; a timeout says which limit it hit."""
    text = str(exc)
    if "TIMEOUT_EXCEEDED" in text or "Timeout exceeded" in text or "(159)" in text:
        return ApiError(504, "query_timeout",
                        f"the query ran longer than the {timeout:g}s limit; narrow the range or the filters")
    if "TOO_MANY_ROWS" in text or "MEMORY_LIMIT" in text:
        return ApiError(507, "query_too_large", "the query needs more than the server allows; narrow it")
    log.error("log query failed", extra={"error": text[:500]})
    return ApiError(503, "storage_unavailable", "storage did not answer the query; retry later")


def settings_clause(settings: dict[str, Any]) -> str:
    """``settings`` as a query's own ``SETTINGS`` clause (names and values are
    ours: numbers and plain words). Passed beside the query instead, chDB's
    client applies each with ``SET`` and restores it after: a query of
    system.settings and four SETs more per read, ~3 ms (measured on 2 cores)."""
    parts = []
    for name, value in settings.items():
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"bad setting name {name!r}")
        if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.]*", value):
            parts.append(f"{name} = '{value}'")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{name} = {value!r}")
        else:
            raise ValueError(f"bad value for setting {name}: {value!r}")
    return " SETTINGS " + ", ".join(parts) if parts else ""


async def json_lines(storage: Storage, sql: str, params: dict[str, Any], settings: dict[str, Any], *,
                     barrier: bool = True) -> list[bytes]:
    """The output lines of a query in ``FORMAT TSVRaw`` (unescaped): rendered
    logs (see :func:`select_json_sql`) or histogram counts. ``settings``
    become the query's SETTINGS clause (``sql`` must not have one).
    ``barrier``: first wait until the logs acknowledged so far (still in the
    journal) are in ClickHouse; False when the caller merges them itself."""
    full = sql + settings_clause(settings)

    def run() -> bytes:
        if barrier:
            storage.barrier(sql)
        return bytes(storage.client.raw_query(full, parameters=params, fmt="TSVRaw"))

    raw = await storage.run(run)
    return raw.split(b"\n")[:-1] if raw else []


WINDOW_MEMORY_TTL = 60.0


class WindowMemory:
    """Which search windows a query shape could not fill lately, so that a
    search repeated or paged within WINDOW_MEMORY_TTL starts with the first
    window that can: each window is a query of its own (~12-17 ms of fixed
    cost on 10M logs), and the bench's rare word (~1 in 10,000) paid for the
    last hour to find 5 of 101 rows every time. Learnt from the searches
    themselves, so it costs no query; a shape is everything that decides
    which logs match (filters, words, the token's scope), not the time range."""

    def __init__(self) -> None:
        self._unfilled: dict[bytes, tuple[float, frozenset[dt.timedelta]]] = {}

    @staticmethod
    def shape(query: LogQuery, scope: TokenScope | None, wanted: int) -> bytes:
        fields = msgspec.structs.asdict(query)
        for name in ("start", "end", "limit", "after"):
            fields.pop(name, None)
        return msgspec.json.encode([fields, scope, wanted, round((query.end - query.start).total_seconds())])

    def edges(self, shape: bytes) -> tuple[dt.timedelta, ...] | None:
        """SearchWindows.EDGES less those recently too narrow; None: nothing known."""
        known = self._unfilled.get(shape)
        if known is None or known[0] < time.monotonic():
            return None
        return tuple(e for e in SearchWindows.EDGES if e not in known[1])

    def learn(self, shape: bytes, unfilled: frozenset[dt.timedelta]) -> None:
        if len(self._unfilled) >= 10_000:
            self._unfilled.clear()
        self._unfilled[shape] = (time.monotonic() + WINDOW_MEMORY_TTL, unfilled)


#: Beyond this many logs waiting in the journal, a page waits for them to reach
#: ClickHouse instead of matching them in Python (~0.3 µs each by level and
#: source; a full-text search tokenises each message, ~3 µs: a quarter as many).
MERGE_PENDING_MAX = 60_000


def pending_logs(storage: Storage, query: LogQuery) -> list[dict[str, Any]] | None:
    """The log rows acknowledged but not yet known to be in ClickHouse, or
    None when there are too many to match in memory (or no journal holds logs)."""
    journal = storage.journal
    if journal is None or not journal.journaled(LOGS_TABLE):
        return None
    limit = MERGE_PENDING_MAX // 4 if query.words or query.phrases else MERGE_PENDING_MAX
    if journal.unflushed(LOGS_TABLE) > limit:
        return None
    rows = journal.pending_rows(LOGS_TABLE)
    return rows if len(rows) <= limit else None


def uuid_order(value: str) -> str:
    """A key that orders UUID text as ClickHouse orders UUIDs: by the last 8
    bytes, then the first 8 (each as an unsigned number)."""
    digits = value.replace("-", "").lower()
    return digits[16:] + digits[:16]


def merge_pending(lines: list[bytes], pending: list[dict[str, Any]], query: LogQuery,
                  scope: TokenScope | None, limit: int) -> list[bytes]:
    """The first ``limit`` logs in page order of ``lines`` (ClickHouse's first
    ``limit`` matches) and the journal's ``pending`` rows that match the
    query, each log once (a row flushed meanwhile is in both)."""
    lower, upper = ch_time(query.start), ch_time(query.end)
    desc = query.order == "desc"
    after = (query.after.timestamp, uuid_order(query.after.id)) if query.after is not None else None
    extra: list[tuple[tuple[str, str], dict[str, Any]]] = []
    for row in pending:
        stamp = row["timestamp"]
        if not lower <= stamp < upper:
            continue
        key = (stamp, uuid_order(row["id"]))
        if after is not None and (key >= after if desc else key <= after):
            continue
        if matches(query, scope, row):
            extra.append((key, row))
    if not extra:
        return lines
    merged: list[tuple[tuple[str, str], bytes]] = []
    seen: set[str] = set()
    for line in lines:
        head = orjson.loads(line)
        seen.add(head["id"])
        merged.append(((head["timestamp"].replace("T", " ").rstrip("Z"), uuid_order(head["id"])), line))
    merged.extend((key, orjson.dumps(render_log(row), default=str)) for key, row in extra if row["id"] not in seen)
    merged.sort(key=lambda item: item[0], reverse=desc)
    return [line for _, line in merged[:limit]]


async def fetch_page(app: web.Application, query: LogQuery, scope: TokenScope | None, limit: int) -> list[bytes]:
    """Up to ``limit`` rendered logs in page order, searching from the leading edge
    of the range in growing windows (see :class:`SearchWindows`), skipping the
    windows this query's shape could not fill a moment ago (:class:`WindowMemory`).

    Logs acknowledged before the page was asked for are in it (read-your-writes):
    those still in the journal are matched in memory and merged (taken before
    ClickHouse is asked, so none falls between the two), rather than waiting
    for the journal's next insert, which under steady ingest cost a page
    ~40 ms (measured at 10k logs/s on 2 cores)."""
    storage = app[appkeys.STORAGE]
    pending = pending_logs(storage, query)
    settings = query_settings(app)
    timeout = app[appkeys.CONFIG].query.query_timeout
    memory = app[appkeys.WINDOW_MEMORY]
    shape = memory.shape(query, scope, limit) if query.after is None else None
    windows = SearchWindows(query, memory.edges(shape) if shape is not None else None)
    lines: list[bytes] = []
    unfilled: set[dt.timedelta] = set()
    while (window := windows.next(len(lines), limit)) is not None:
        sql, params = select_json_sql(query, scope, limit=limit - len(lines), start=window[0], end=window[1])
        try:
            lines.extend(await json_lines(storage, sql, params, settings, barrier=pending is None))
        except Exception as exc:
            raise storage_error(exc, timeout) from None
        if len(lines) < limit:
            unfilled.update(e for e in windows.edges if e <= windows.covered)
    if shape is not None and unfilled:
        # Kept for WINDOW_MEMORY_TTL from now, with the windows skipped on the
        # way; a search that fills its page learns nothing new and does not
        # extend it, so a shape's windows are checked again a minute later.
        skipped = {e for e in SearchWindows.EDGES if e not in windows.edges}
        memory.learn(shape, frozenset(unfilled | skipped))
    if pending:
        lines = merge_pending(lines, pending, query, scope, limit)
    return lines


@requires("admin", "logs")
async def get_logs(request: web.Request) -> web.StreamResponse:
    """One page (``{"logs": [...], "next_cursor"}``) or, with ``Accept:
    application/x-ndjson``, every match as one log per line."""
    query, principal = parse_request(request)
    if NDJSON in request.headers.get("Accept", ""):
        return await export_ndjson(request, query, principal.scope)
    if query is None:
        return web.json_response({"logs": [], "next_cursor": None})
    lines = await fetch_page(request.app, query, principal.scope, query.limit + 1)
    more = len(lines) > query.limit
    lines = lines[: query.limit]
    next_cursor = None
    if more:
        next_cursor = encode_cursor(cursor_secret(request.app), cursor_from_line(lines[-1], query))
    tail = b'],"next_cursor":' + (f'"{next_cursor}"'.encode() if next_cursor else b"null") + b"}"
    body = b'{"logs":[' + b",".join(lines) + tail
    return web.Response(body=body, content_type="application/json")


async def export_ndjson(request: web.Request, query: LogQuery | None,
                        scope: TokenScope | None) -> web.StreamResponse:
    """Every match, one log per line, in keyset pages; a final
    ``{"truncated": true, "next_cursor": …}`` line when the export cap stops it."""
    app = request.app
    config = app[appkeys.CONFIG].query
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
    storage = app[appkeys.STORAGE]
    settings = query_settings(app)
    page_rows = config.export_page_rows
    sent = 0
    first = True
    while query is not None:
        size = page_rows if not config.export_max_rows else min(page_rows, config.export_max_rows - sent)
        if size <= 0:
            cursor = encode_cursor(cursor_secret(app), query.after) if query.after else None
            await response.write(b'{"truncated":true,"next_cursor":' + (f'"{cursor}"'.encode() if cursor else b"null")
                                 + b"}\n")
            break
        sql, params = select_json_sql(query, scope, limit=size)
        try:
            lines = await json_lines(storage, sql, params, settings)
        except Exception as exc:
            error = storage_error(exc, config.query_timeout)
            if first:
                raise error from None
            # Headers are gone: say so in-band, as the last line.
            await response.write(b'{"error":{"code":"' + error.code.encode() + b'"}}\n')
            break
        if first:
            await response.prepare(request)
            first = False
        if lines:
            await response.write(b"\n".join(lines) + b"\n")
            sent += len(lines)
        if len(lines) < size:
            break
        query = msgspec.structs.replace(query, after=cursor_from_line(lines[-1], query))
    if first:
        await response.prepare(request)
    await response.write_eof()
    return response


async def _token_timing_ctx(app: web.Application) -> AsyncIterator[None]:
    # The token service is the app's (started before the features); give it
    # this section's reload and usage-flush intervals.
    service = app[appkeys.TOKENS]
    config = app[appkeys.CONFIG].query
    service.reload_interval = config.token_reload_interval
    service.flush_interval = config.token_usage_flush_interval
    yield


def setup(app: web.Application) -> None:
    app[appkeys.WINDOW_MEMORY] = WindowMemory()
    app.cleanup_ctx.append(_token_timing_ctx)
    app.router.add_get("/v1/logs", get_logs)
