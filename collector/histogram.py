"""``GET /v1/logs/histogram``: counts per level per interval over a range.

Buckets are aligned to multiples of the interval since the Unix epoch (UTC),
cover the whole range (zero-filled), and honour every filter of ``GET
/v1/logs`` and the token's scope. Whole-minute intervals are answered from the
``p_minute_counts`` projection (a few thousand rows per day) unless a filter
needs the logs themselves (full text, tags, ids).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import msgspec
import orjson
from aiohttp import web

from agent.configfile import Duration
from agent.wire import Level
from collector import appkeys
from collector.auth import TokenScope, principal_of, requires
from collector.errors import ApiError
from collector.logquery import (
    FILTER_PARAMS,
    LogQuery,
    QueryError,
    SqlBuilder,
    apply_scope,
    build_filters,
    ch_time,
)
from collector.logs_api import parse_log_query, query_settings, storage_error

HISTOGRAM_PARAMS = FILTER_PARAMS | {"start", "end", "interval"}
# Intervals an automatic choice picks from (seconds).
NICE_INTERVALS = (1, 5, 10, 30, 60, 300, 600, 900, 1800, 3600, 10800, 21600, 43200, 86400)
AUTO_MAX_BUCKETS = 1440


class Histogram(msgspec.Struct):
    start: dt.datetime
    end: dt.datetime
    interval: int
    levels: list[str]


def plan(query: LogQuery, interval_param: str | None, max_buckets: int) -> Histogram:
    """The aligned buckets of a histogram; QueryError names a bad ``interval``."""
    span = (query.end - query.start).total_seconds()
    if interval_param is None or interval_param.strip() in ("", "auto"):
        interval = next((i for i in NICE_INTERVALS if i >= 60 and span / i <= AUTO_MAX_BUCKETS), NICE_INTERVALS[-1])
        while span / interval > max_buckets:
            interval *= 2
    else:
        try:
            seconds = Duration.parse(interval_param)
        except ValueError:
            raise QueryError("interval", "expected a duration such as `10s`, `1m`, `1h` or `1d`") from None
        if seconds < 1 or seconds != int(seconds) or seconds > 366 * 86400:
            raise QueryError("interval", "must be a whole number of seconds from 1s to 366d")
        interval = int(seconds)
        if span / interval > max_buckets:
            raise QueryError("interval", f"gives more than {max_buckets} buckets over this range; use a larger one")
    start = math.floor(query.start.timestamp() / interval) * interval
    end = math.ceil(query.end.timestamp() / interval) * interval
    levels = query.levels if query.levels is not None else [lv.name for lv in Level]
    return Histogram(start=dt.datetime.fromtimestamp(start, dt.UTC), end=dt.datetime.fromtimestamp(end, dt.UTC),
                     interval=interval, levels=levels)


def histogram_sql(query: LogQuery, scope: TokenScope | None, h: Histogram) -> tuple[str, dict[str, Any]]:
    b = SqlBuilder()
    if h.interval % 60 == 0:
        # Grouping and bounds on whole minutes let the projection answer.
        column = "toStartOfMinute(timestamp)"
        b.where.append(f"{column} >= {b.bind(ch_time(h.start)[:19], 'DateTime')}")
        b.where.append(f"{column} < {b.bind(ch_time(h.end)[:19], 'DateTime')}")
        bucket = f"toStartOfInterval({column}, INTERVAL {int(h.interval)} SECOND)"
    else:
        b.where.append(f"timestamp >= {b.bind(ch_time(h.start), 'DateTime64(3)')}")
        b.where.append(f"timestamp < {b.bind(ch_time(h.end), 'DateTime64(3)')}")
        bucket = f"toStartOfInterval(timestamp, INTERVAL {int(h.interval)} SECOND)"
    build_filters(b, query, scope)
    sql = (f"SELECT toUnixTimestamp({bucket}) AS bucket, toString(level) AS level, count() AS n "
           f"FROM application_logs WHERE {b.sql()} GROUP BY bucket, level")
    return sql, b.params


def fill(h: Histogram, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every bucket of the range, in time order, with a count per level (0 when none)."""
    counts: dict[int, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(int(row["bucket"]), {})[row["level"]] = int(row["n"])
    buckets = []
    t = int(h.start.timestamp())
    end = int(h.end.timestamp())
    while t < end:
        found = counts.get(t, {})
        per_level = {lv: found.get(lv, 0) for lv in h.levels}
        buckets.append({"start": dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "total": sum(per_level.values()), "counts": per_level})
        t += h.interval
    return buckets


@requires("admin", "logs")
async def get_histogram(request: web.Request) -> web.Response:
    app = request.app
    config = app[appkeys.CONFIG].query
    principal = principal_of(request)
    base = parse_log_query(request, allowed=HISTOGRAM_PARAMS)
    if len(request.query.getall("interval", [])) > 1:
        raise ApiError(400, "bad_parameter", "interval: given more than once")
    query = apply_scope(base, principal.scope)
    if query is None:
        # Nothing is in the token's scope: an honest all-zero histogram.
        base = msgspec.structs.replace(base, levels=[])
    else:
        base = query
    try:
        h = plan(base, request.query.get("interval"), config.histogram_max_buckets)
    except QueryError as exc:
        raise ApiError(400, "bad_parameter", str(exc)) from None
    rows: list[dict[str, Any]] = []
    if query is not None:
        sql, params = histogram_sql(query, principal.scope, h)
        try:
            rows = await app[appkeys.STORAGE].query(sql, params, settings=query_settings(app))
        except Exception as exc:
            raise storage_error(exc, config.query_timeout) from None
    body = {
        "start": h.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "end": h.end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "interval": f"{h.interval}s",
        "interval_seconds": h.interval,
        "levels": h.levels,
        "buckets": fill(h, rows),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/logs/histogram", get_histogram)
