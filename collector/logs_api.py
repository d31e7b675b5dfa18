"""Log reading endpoints: ``GET /v1/logs`` (page or NDJSON stream)."""

from __future__ import annotations

import datetime as dt
import hashlib

import orjson
from aiohttp import web

from collector import appkeys
from collector.auth import principal_of, requires
from collector.errors import ApiError
from collector.logquery import (
    LogQuery,
    QueryError,
    apply_scope,
    cursor_after,
    encode_cursor,
    parse_query,
    render_log,
    select_sql,
)

NDJSON_PAGE = 10_000
MAX_RANGE = dt.timedelta(days=31)


def cursor_secret(app: web.Application) -> bytes:
    return hashlib.sha256(b"cursor:" + app[appkeys.CONFIG].secret_key.encode()).digest()


def query_from_request(request: web.Request) -> tuple[LogQuery | None, object]:
    """The request's query narrowed to the caller's scope (None: nothing can match)."""
    principal = principal_of(request)
    try:
        query = parse_query(request.query, now=dt.datetime.now(dt.UTC), cursor_secret=cursor_secret(request.app),
                            max_range=MAX_RANGE)
    except QueryError as exc:
        raise ApiError(400, "bad_parameter", str(exc)) from None
    return apply_scope(query, principal.scope), principal.scope


def _settings(app: web.Application) -> dict[str, object]:
    return {"max_execution_time": int(app[appkeys.CONFIG].storage.query_timeout) or 10}


@requires("admin", "logs")
async def get_logs(request: web.Request) -> web.StreamResponse:
    query, scope = query_from_request(request)
    if "application/x-ndjson" in request.headers.get("Accept", ""):
        return await _stream_ndjson(request, query, scope)
    if query is None:
        return web.json_response({"logs": [], "next_cursor": None})
    storage = request.app[appkeys.STORAGE]
    sql, params = select_sql(query, scope, limit=query.limit + 1)  # type: ignore[arg-type]
    rows = await storage.query(sql, params, settings=_settings(request.app))
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    next_cursor = None
    if more and rows:
        next_cursor = encode_cursor(cursor_secret(request.app), cursor_after(rows[-1], query.order))
    body = orjson.dumps({"logs": [render_log(r) for r in rows], "next_cursor": next_cursor})
    return web.Response(body=body, content_type="application/json")


async def _stream_ndjson(request: web.Request, query: LogQuery | None, scope: object) -> web.StreamResponse:
    """Every match, one log per line, paged by keyset so memory stays bounded."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    storage = request.app[appkeys.STORAGE]
    while query is not None:
        sql, params = select_sql(query, scope, limit=NDJSON_PAGE)  # type: ignore[arg-type]
        rows = await storage.query(sql, params, settings=_settings(request.app))
        if rows:
            await response.write(b"\n".join(orjson.dumps(render_log(r)) for r in rows) + b"\n")
        if len(rows) < NDJSON_PAGE:
            break
        query = LogQuery(**{**{f: getattr(query, f) for f in query.__struct_fields__},
                            "after": cursor_after(rows[-1], query.order)})
    await response.write_eof()
    return response


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/logs", get_logs)
