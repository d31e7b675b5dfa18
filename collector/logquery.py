"""``GET /v1/logs``: parameters → a bounded, parameterised ClickHouse query.

Every value a user sends reaches ClickHouse as a bound parameter
(``{p0:String}``); the SQL text is built only from our own fragments. A
``logs`` token's scope is ANDed into the query; a request may narrow it and
never widen it. Paging is keyset over ``(timestamp, id)`` with an HMAC-signed
cursor, so pages stay stable while logs arrive and a cursor cannot be forged.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import orjson
from multidict import MultiMapping

from agent.configfile import Duration
from agent.wire import Level, parse_level, parse_timestamp
from collector.auth import TokenScope

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
DEFAULT_RANGE = dt.timedelta(hours=1)
LOG_COLUMNS = (
    "id", "timestamp", "level", "source", "message", "context", "user_id", "session_id", "request_id",
    "ip_address", "user_agent", "duration_ms", "error_stack", "tags", "host", "file", "offset",
)
_RELATIVE = re.compile(r"^(?:now)?\s*-\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$")
_TOKEN_SPLIT = re.compile(r"[^0-9A-Za-z]+")


class QueryError(ValueError):
    """A bad parameter: ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class Cursor(msgspec.Struct, array_like=True):
    timestamp: str
    id: str
    order: str


class LogQuery(msgspec.Struct, kw_only=True):
    start: dt.datetime
    end: dt.datetime
    levels: list[str] | None = None
    sources: list[str] = []
    words: list[str] = []
    phrases: list[str] = []
    tags: list[str] = []
    user_id: str | None = None
    session_id: str | None = None
    request_id: str | None = None
    limit: int = DEFAULT_LIMIT
    order: str = "desc"
    after: Cursor | None = None


def parse_time(value: str, param: str, now: dt.datetime) -> dt.datetime:
    text = value.strip()
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m:
        return now - dt.timedelta(seconds=Duration.parse(f"{m.group(1)}{m.group(2)}"))
    ts = parse_timestamp(text)
    if ts is None:
        try:
            ts = parse_timestamp(float(text))
        except ValueError:
            ts = None
    if ts is None:
        raise QueryError(param, "expected RFC 3339 time, Unix seconds, `now` or a relative time such as `-1h`")
    return ts


def glob_to_like(pattern: str) -> str:
    """A ``*``/``?`` glob as a LIKE pattern with LIKE's own metacharacters escaped."""
    out = []
    for ch in pattern:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def split_search(q: str) -> tuple[list[str], list[str]]:
    """Words (lower-cased tokens, all required) and quoted phrases."""
    phrases = [p.strip() for p in re.findall(r'"([^"]*)"', q) if p.strip()]
    rest = re.sub(r'"[^"]*"', " ", q)
    words = [w.lower() for w in _TOKEN_SPLIT.split(rest) if w]
    return words, phrases


def _sign(secret: bytes, payload: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(secret, payload, hashlib.sha256).digest()[:16]).decode().rstrip("=")


def encode_cursor(secret: bytes, cursor: Cursor) -> str:
    payload = msgspec.msgpack.encode(cursor)
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{body}.{_sign(secret, payload)}"


def decode_cursor(secret: bytes, text: str) -> Cursor:
    body, _, signature = text.partition(".")
    try:
        payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise QueryError("cursor", "not a cursor this collector issued") from None
    if not hmac.compare_digest(_sign(secret, payload), signature):
        raise QueryError("cursor", "not a cursor this collector issued")
    try:
        return msgspec.msgpack.decode(payload, type=Cursor)
    except msgspec.DecodeError:
        raise QueryError("cursor", "not a cursor this collector issued") from None


def parse_query(params: MultiMapping[str], *, now: dt.datetime, cursor_secret: bytes,
                max_range: dt.timedelta, limit_max: int = MAX_LIMIT) -> LogQuery:
    """Validate request parameters into a :class:`LogQuery`."""
    known = {"start", "end", "level", "source", "q", "tag", "user_id", "session_id", "request_id",
             "limit", "cursor", "order", "interval"}
    for key in params:
        if key not in known:
            raise QueryError(key, "unknown parameter")
    end = parse_time(params["end"], "end", now) if "end" in params else now
    start = parse_time(params["start"], "start", now) if "start" in params else end - DEFAULT_RANGE
    if start >= end:
        raise QueryError("start", "must be before end")
    if end - start > max_range:
        raise QueryError("start", f"the range is longer than the maximum of {max_range}")
    levels = None
    if "level" in params:
        level = parse_level(params["level"])
        if level is None:
            raise QueryError("level", "expected one of DEBUG, INFO, WARN, ERROR, CRITICAL")
        levels = [lv.name for lv in Level if lv >= level]
    sources = params.getall("source", [])
    for s in sources:
        if not s or len(s) > 200:
            raise QueryError("source", "each source must be 1–200 characters")
    words: list[str] = []
    phrases: list[str] = []
    if "q" in params:
        q = params["q"]
        if len(q) > 1000:
            raise QueryError("q", "longer than 1000 characters")
        words, phrases = split_search(q)
    tags = params.getall("tag", [])
    limit = DEFAULT_LIMIT
    if "limit" in params:
        try:
            limit = int(params["limit"])
        except ValueError:
            raise QueryError("limit", f"expected a whole number from 1 to {limit_max}") from None
        if not 1 <= limit <= limit_max:
            raise QueryError("limit", f"expected a whole number from 1 to {limit_max}")
    order = params.get("order", "desc").lower()
    if order not in ("asc", "desc"):
        raise QueryError("order", "expected asc or desc")
    after = None
    if params.get("cursor"):
        after = decode_cursor(cursor_secret, params["cursor"])
        if after.order != order:
            raise QueryError("cursor", "was issued for the other order")
    fields = {}
    for name in ("user_id", "session_id", "request_id"):
        if name in params:
            value = params[name]
            if len(value) > 4096:
                raise QueryError(name, "longer than 4096 characters")
            fields[name] = value
    return LogQuery(start=start, end=end, levels=levels, sources=sources, words=words, phrases=phrases,
                    tags=tags, limit=limit, order=order, after=after, **fields)


def apply_scope(query: LogQuery, scope: TokenScope | None) -> LogQuery | None:
    """The query narrowed to a token's scope, or None when nothing can match."""
    if scope is None:
        return query
    allowed = scope.allowed_levels()
    if allowed is not None:
        levels = allowed if query.levels is None else [lv for lv in query.levels if lv in allowed]
        if not levels:
            return None
        query = msgspec.structs.replace(query, levels=levels)
    return query


class SqlBuilder:
    """Collects WHERE fragments and their bound parameters."""

    def __init__(self) -> None:
        self.where: list[str] = []
        self.params: dict[str, Any] = {}

    def bind(self, value: Any, ch_type: str) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"{{{name}:{ch_type}}}"

    def any_like(self, column: str, globs: Iterable[str]) -> None:
        parts = []
        for g in globs:
            if any(c in g for c in "*?"):
                parts.append(f"{column} LIKE {self.bind(glob_to_like(g), 'String')}")
            else:
                parts.append(f"{column} = {self.bind(g, 'String')}")
        self.where.append("(" + " OR ".join(parts) + ")")


def _ts(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def build_where(query: LogQuery, scope: TokenScope | None) -> SqlBuilder:
    b = SqlBuilder()
    b.where.append(f"timestamp >= {b.bind(_ts(query.start), 'DateTime64(3)')}")
    b.where.append(f"timestamp < {b.bind(_ts(query.end), 'DateTime64(3)')}")
    if query.levels is not None:
        b.where.append(f"level IN {b.bind(query.levels, 'Array(String)')}")
    if query.sources:
        b.any_like("source", query.sources)
    if scope is not None and scope.sources:
        # The token's own sources, ANDed: a request's source can only narrow.
        b.any_like("source", scope.sources)
    for word in query.words:
        tokens = b.bind([word], "Array(String)")
        b.where.append(f"(hasAllTokens(message, {tokens}) OR hasAllTokens(tags, {tokens}))")
    for phrase in query.phrases:
        tokens = [w.lower() for w in _TOKEN_SPLIT.split(phrase) if w]
        if tokens:
            b.where.append(f"hasAllTokens(message, {b.bind(tokens, 'Array(String)')})")
        b.where.append(f"positionCaseInsensitiveUTF8(message, {b.bind(phrase, 'String')}) > 0")
    for tag in query.tags:
        b.where.append(f"has(tags, {b.bind(tag, 'String')})")
    for name in ("user_id", "session_id", "request_id"):
        value = getattr(query, name)
        if value is not None:
            b.where.append(f"{name} = {b.bind(value, 'String')}")
    if query.after is not None:
        op = "<" if query.order == "desc" else ">"
        b.where.append(
            f"(timestamp, id) {op} ({b.bind(query.after.timestamp, 'DateTime64(3)')}, "
            f"{b.bind(query.after.id, 'UUID')})"
        )
    return b


def select_sql(query: LogQuery, scope: TokenScope | None, *, limit: int) -> tuple[str, dict[str, Any]]:
    b = build_where(query, scope)
    direction = "DESC" if query.order == "desc" else "ASC"
    sql = (
        f"SELECT {', '.join(LOG_COLUMNS)} FROM application_logs WHERE {' AND '.join(b.where)} "
        f"ORDER BY timestamp {direction}, id {direction} LIMIT {int(limit)}"
    )
    return sql, b.params


def render_log(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row as the API's log object (the spec's field names)."""
    out = dict(row)
    ts = row["timestamp"]
    if isinstance(ts, dt.datetime):
        out["timestamp"] = ts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    else:
        out["timestamp"] = str(ts).replace(" ", "T") + "Z"
    out["id"] = str(row["id"])
    context = row.get("context")
    out["context"] = orjson.loads(context) if isinstance(context, str | bytes) and context else {}
    return out


def cursor_after(row: Mapping[str, Any], order: str) -> Cursor:
    ts = row["timestamp"]
    text = ts.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if isinstance(ts, dt.datetime) else str(ts)
    return Cursor(timestamp=text, id=str(row["id"]), order=order)
