"""Log reading: request parameters → a bounded, parameterised ClickHouse query.

Every value a user sends reaches ClickHouse as a bound parameter
(``{p0:String}``); the SQL text is built only from our own fragments. A
``logs`` token's scope is ANDed into the query; a request may narrow it and
never widen it. Paging is keyset over ``(timestamp, id)`` with an HMAC-signed
cursor that also pins the range of the first page, so pages stay stable while
logs arrive and a cursor cannot be forged or edited.

This module is pure (no aiohttp, no storage): :mod:`collector.logs_api`,
:mod:`collector.histogram` and :mod:`collector.tail` call into it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import math
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import msgspec
import orjson
from multidict import MultiMapping

from agent.configfile import Duration
from agent.wire import Level, parse_level, parse_timestamp
from collector.auth import TokenScope
from collector.source_globs import glob_match, glob_to_like, is_glob

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
DEFAULT_RANGE = dt.timedelta(hours=1)
MAX_PARAM_CHARS = 4096
MAX_Q_CHARS = 1000
MAX_TERMS = 32
MAX_SOURCES = 50
MAX_TAGS = 20
LOG_COLUMNS = (
    "id", "timestamp", "level", "source", "message", "context", "user_id", "session_id", "request_id",
    "ip_address", "user_agent", "duration_ms", "error_stack", "tags", "host", "file", "offset",
)
FILTER_PARAMS = frozenset({"level", "source", "q", "tag", "user_id", "session_id", "request_id"})
QUERY_PARAMS = FILTER_PARAMS | {"start", "end", "limit", "cursor", "order"}
_RELATIVE = re.compile(r"^(?:now)?\s*-\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$")
# ClickHouse's splitByNonAlpha: separators are the non-alphanumeric ASCII
# characters; bytes of other UTF-8 characters belong to tokens.
_SEPARATORS = re.compile(r"[\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+")
# lower() in ClickHouse (the index's preprocessor) folds ASCII letters only.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class QueryError(ValueError):
    """A bad parameter: ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class Cursor(msgspec.Struct, array_like=True):
    """Position after the last row returned, plus the range of the first page."""

    timestamp: str
    id: str
    order: str
    start_ms: int = 0
    end_ms: int = 0


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


# --- parsing --------------------------------------------------------------------


def parse_time(value: str, param: str, now: dt.datetime) -> dt.datetime:
    """RFC 3339, Unix seconds, ``now`` or a relative time (``-1h``, ``now-15m``)."""
    text = value.strip()
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m:
        return now - dt.timedelta(seconds=Duration.parse(f"{m.group(1)}{m.group(2)}"))
    ts = parse_timestamp(text)
    if ts is None:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        ts = parse_timestamp(number) if math.isfinite(number) else None
    if ts is None or not dt.datetime(1970, 1, 2, tzinfo=dt.UTC) <= ts <= dt.datetime(2261, 1, 1, tzinfo=dt.UTC):
        raise QueryError(param, "expected an RFC 3339 time, Unix seconds, `now` or a relative time such as `-1h`")
    return ts


def tokens_of(text: str) -> list[str]:
    """The text index's tokens of ``text`` (splitByNonAlpha, ASCII-lowered)."""
    return [t for t in _SEPARATORS.split(text.translate(_ASCII_LOWER)) if t]


def split_search(q: str) -> tuple[list[str], list[str]]:
    """``q`` as required words (index tokens) and quoted phrases."""
    phrases = [p.strip() for p in re.findall(r'"([^"]*)"', q) if p.strip()]
    rest = re.sub(r'"[^"]*"?', " ", q)
    words = list(dict.fromkeys(tokens_of(rest)))
    return words, phrases


def _sign(secret: bytes, payload: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(secret, payload, hashlib.sha256).digest()[:18]).decode()


def encode_cursor(secret: bytes, cursor: Cursor) -> str:
    payload = msgspec.msgpack.encode(cursor)
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{body}.{_sign(secret, payload)}"


def decode_cursor(secret: bytes, text: str) -> Cursor:
    """The cursor, or QueryError when it was not issued by us (or was edited)."""
    error = QueryError("cursor", "not a cursor this collector issued")
    body, dot, signature = text.partition(".")
    if not dot or len(text) > 1024:
        raise error
    try:
        payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise error from None
    if not hmac.compare_digest(_sign(secret, payload).encode(), signature.encode()):
        raise error
    try:
        return msgspec.msgpack.decode(payload, type=Cursor)
    except msgspec.DecodeError:
        raise error from None


def _ms(value: dt.datetime) -> int:
    return int(value.timestamp() * 1000)


def _from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _check_text(name: str, value: str, limit: int = MAX_PARAM_CHARS) -> str:
    if len(value) > limit:
        raise QueryError(name, f"longer than {limit} characters")
    if "\x00" in value:
        raise QueryError(name, "contains a NUL character")
    return value


def parse_filters(params: MultiMapping[str], *, allowed: Collection[str] = FILTER_PARAMS) -> dict[str, Any]:
    """The filter parameters (level, source, q, tag, ids) as LogQuery fields."""
    for key in params:
        if key not in allowed:
            raise QueryError(key, "unknown parameter")
    for key in ("level", "q", "user_id", "session_id", "request_id"):
        if len(params.getall(key, [])) > 1:
            raise QueryError(key, "given more than once")
    fields: dict[str, Any] = {}
    if "level" in params:
        level = parse_level(params["level"])
        if level is None or params["level"].strip().isdigit():
            raise QueryError("level", "expected one of DEBUG, INFO, WARN, ERROR, CRITICAL")
        fields["levels"] = [lv.name for lv in Level if lv >= level]
    sources = [_check_text("source", s, 200) for s in params.getall("source", [])]
    if len(sources) > MAX_SOURCES:
        raise QueryError("source", f"at most {MAX_SOURCES} sources")
    if any(not s for s in sources):
        raise QueryError("source", "must not be empty")
    fields["sources"] = sources
    if "q" in params:
        words, phrases = split_search(_check_text("q", params["q"], MAX_Q_CHARS))
        if not words and not any(tokens_of(p) for p in phrases):
            raise QueryError("q", "has no word to search for (letters or digits); leave it out to match everything")
        if len(words) + len(phrases) > MAX_TERMS:
            raise QueryError("q", f"at most {MAX_TERMS} words and phrases")
        fields["words"], fields["phrases"] = words, phrases
    tags = [_check_text("tag", t, 256) for t in params.getall("tag", [])]
    if len(tags) > MAX_TAGS:
        raise QueryError("tag", f"at most {MAX_TAGS} tags")
    fields["tags"] = tags
    for name in ("user_id", "session_id", "request_id"):
        if name in params:
            fields[name] = _check_text(name, params[name])
    return fields


def parse_query(params: MultiMapping[str], *, now: dt.datetime, cursor_secret: bytes,
                max_range: dt.timedelta, limit_max: int = MAX_LIMIT,
                allowed: Collection[str] = QUERY_PARAMS) -> LogQuery:
    """Validate request parameters into a :class:`LogQuery` (QueryError names the bad one)."""
    fields = parse_filters(params, allowed=allowed)
    for key in ("start", "end", "limit", "cursor", "order"):
        if len(params.getall(key, [])) > 1:
            raise QueryError(key, "given more than once")
    limit = DEFAULT_LIMIT
    if "limit" in params:
        text = params["limit"].strip()
        if not text.isdigit() or not 1 <= int(text) <= limit_max:
            raise QueryError("limit", f"expected a whole number from 1 to {limit_max}")
        limit = int(text)
    order = params.get("order", "desc").strip().lower()
    if order not in ("asc", "desc"):
        raise QueryError("order", "expected asc or desc")
    after = None
    if params.get("cursor"):
        after = decode_cursor(cursor_secret, params["cursor"])
        if after.order != order:
            raise QueryError("cursor", "was issued for the other order")
    if after is not None and after.end_ms > after.start_ms:
        # The range of the first page: a relative `start`/`end` must not move
        # under a client that is paging.
        start, end = _from_ms(after.start_ms), _from_ms(after.end_ms)
    else:
        end = parse_time(params["end"], "end", now) if "end" in params else now
        start = parse_time(params["start"], "start", now) if "start" in params else end - DEFAULT_RANGE
    if start >= end:
        raise QueryError("start", "must be before end")
    if end - start > max_range:
        raise QueryError("start", f"the range from start to end is longer than the maximum of {_human(max_range)}")
    return LogQuery(start=start, end=end, limit=limit, order=order, after=after, **fields)


def _human(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def apply_scope(query: LogQuery, scope: TokenScope | None) -> LogQuery | None:
    """The query narrowed to a token's levels, or None when nothing can match.
    (The token's sources are ANDed in SQL and in :func:`matches`.)"""
    if scope is None:
        return query
    allowed = scope.allowed_levels()
    if allowed is not None:
        levels = allowed if query.levels is None else [lv for lv in query.levels if lv in allowed]
        if not levels:
            return None
        query = msgspec.structs.replace(query, levels=levels)
    return query


# --- SQL --------------------------------------------------------------------------


class SqlBuilder:
    """Collects WHERE fragments and their bound parameters."""

    def __init__(self) -> None:
        self.where: list[str] = []
        self.params: dict[str, Any] = {}

    def bind(self, value: Any, ch_type: str) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"{{{name}:{ch_type}}}"

    def any_source(self, globs: Iterable[str]) -> None:
        exact = [g for g in globs if not is_glob(g)]
        parts = [f"source LIKE {self.bind(glob_to_like(g), 'String')}" for g in globs if is_glob(g)]
        if exact:
            parts.append(f"source IN {self.bind(exact, 'Array(String)')}")
        self.where.append("(" + " OR ".join(parts) + ")")

    def sql(self) -> str:
        return " AND ".join(self.where) if self.where else "1"


def ch_time(value: dt.datetime) -> str:
    """A bound DateTime64(3) value (UTC, millisecond precision)."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def word_match(b: SqlBuilder, word: str) -> str:
    """A search word matches a token of the message or of a tag."""
    lowered = b.bind([word], "Array(String)")
    return f"(hasAllTokens(message, {lowered}) OR hasAnyTokens(tags, {lowered}))"


def build_filters(b: SqlBuilder, query: LogQuery, scope: TokenScope | None) -> None:
    """Everything but the time range: levels, sources (ANDed with the token's),
    full text, tags and ids."""
    if query.levels is not None:
        b.where.append(f"level IN {b.bind(query.levels, 'Array(String)')}")
    if query.sources:
        b.any_source(query.sources)
    if scope is not None and scope.sources:
        # The token's own sources, ANDed: a request's `source` can only narrow.
        b.any_source(scope.sources)
    for word in query.words:
        b.where.append(word_match(b, word))
    for phrase in query.phrases:
        words = tokens_of(phrase)
        if words:
            b.where.append(f"hasAllTokens(message, {b.bind(words, 'Array(String)')})")
        b.where.append(f"positionCaseInsensitiveUTF8(message, {b.bind(phrase, 'String')}) > 0")
    for tag in query.tags:
        b.where.append(f"has(tags, {b.bind(tag, 'String')})")
    for name in ("user_id", "session_id", "request_id"):
        value = getattr(query, name)
        if value is not None:
            b.where.append(f"{name} = {b.bind(value, 'String')}")


def build_where(query: LogQuery, scope: TokenScope | None, *, start: dt.datetime | None = None,
                end: dt.datetime | None = None) -> SqlBuilder:
    """The full WHERE of a page query; ``start``/``end`` narrow it to a window."""
    b = SqlBuilder()
    lower = b.bind(ch_time(start or query.start), "DateTime64(3)")
    upper = b.bind(ch_time(end or query.end), "DateTime64(3)")
    # The sorting key starts with toStartOfHour(timestamp); ClickHouse does not
    # derive a bound on it from bounds on timestamp (measured: a 1-hour range read
    # the whole day's partition), so state it.
    b.where.append(f"toStartOfHour(timestamp) BETWEEN toStartOfHour({lower}) AND toStartOfHour({upper})")
    b.where.append(f"timestamp >= {lower}")
    b.where.append(f"timestamp < {upper}")
    build_filters(b, query, scope)
    if query.after is not None:
        ts = b.bind(query.after.timestamp, "DateTime64(3)")
        uid = b.bind(query.after.id, "UUID")
        op = "<" if query.order == "desc" else ">"
        # The plain bound lets the primary key skip what the tuple comparison cannot.
        b.where.append(f"timestamp {op}= {ts}")
        b.where.append(f"(timestamp, id) {op} ({ts}, {uid})")
    return b


def _json_field(name: str, expr: str) -> str:
    return f"',\"{name}\":', {expr}"


def _nullable(column: str) -> str:
    return _json_field(column, f"ifNull(toJSONString({column}), 'null')")


# The API's log object rendered by ClickHouse as one JSON line per row, so
# pages and exports never build Python objects per row.
_JSON_LINE = "concat(" + ", ".join((
    "'{\"id\":\"', toString(id), '\"'",
    _json_field("timestamp", "'\"', formatDateTime(timestamp, '%Y-%m-%dT%H:%i:%S', 'UTC'), '.', "
                "leftPad(toString(toUnixTimestamp64Milli(timestamp) % 1000), 3, '0'), 'Z\"'"),
    _json_field("level", "'\"', toString(level), '\"'"),
    _json_field("source", "toJSONString(toString(source))"),
    _json_field("message", "toJSONString(message)"),
    # Stored by ingest as a JSON object; anything else renders as {}.
    _json_field("context", "if(isValidJSON(context) AND startsWith(context, '{'), context, '{}')"),
    *(_nullable(c) for c in ("user_id", "session_id", "request_id", "ip_address", "user_agent", "duration_ms",
                             "error_stack")),
    _json_field("tags", "toJSONString(CAST(tags, 'Array(String)'))"),
    _json_field("host", "toJSONString(toString(host))"),
    _json_field("file", "toJSONString(file)"),
    _json_field("offset", "toString(offset)"),
    "'}'",
)) + ")"


def select_json_sql(query: LogQuery, scope: TokenScope | None, *, limit: int, start: dt.datetime | None = None,
                    end: dt.datetime | None = None) -> tuple[str, dict[str, Any]]:
    """SQL whose result (``FORMAT TSVRaw``) is one JSON log per line, in page order."""
    b = build_where(query, scope, start=start, end=end)
    direction = "DESC" if query.order == "desc" else "ASC"
    sql = (
        f"SELECT {_JSON_LINE} FROM application_logs WHERE {b.sql()} "
        f"ORDER BY timestamp {direction}, id {direction} LIMIT {int(limit)}"
    )
    return sql, b.params


# A tail's event ids are cursors in ingest order: `timestamp` then holds the
# row's ingested_at (see collector.ingest.LogWriter.stamp).
INGEST_ORDER = "ingest"


def ingest_cursor(row: Mapping[str, Any]) -> Cursor:
    """The tail event id of a stored row or ingest event: its place in ingest order."""
    return Cursor(timestamp=str(row["ingested_at"]), id=str(row["id"]), order=INGEST_ORDER)


def select_ingested_sql(query: LogQuery, scope: TokenScope | None, after: Cursor, *,
                        limit: int) -> tuple[str, dict[str, Any]]:
    """The logs matching ``query`` (within its time range) stored after
    ``after`` in ingest order, oldest first; each output line is the rendered
    log, a tab, and its ingested_at (the next cursor)."""
    b = build_where(query, scope)
    at = b.bind(after.timestamp, "DateTime64(3)")
    uid = b.bind(after.id, "UUID")
    # The plain bound lets the ingested_at index skip what the tuple comparison cannot.
    b.where.append(f"ingested_at >= {at}")
    b.where.append(f"(ingested_at, id) > ({at}, {uid})")
    sql = (
        f"SELECT {_JSON_LINE}, toString(ingested_at) FROM application_logs WHERE {b.sql()} "
        f"ORDER BY ingested_at, id LIMIT {int(limit)}"
    )
    return sql, b.params


def select_sql(query: LogQuery, scope: TokenScope | None, *, limit: int) -> tuple[str, dict[str, Any]]:
    """SQL returning the stored columns (for callers that want Python rows)."""
    b = build_where(query, scope)
    direction = "DESC" if query.order == "desc" else "ASC"
    sql = (
        f"SELECT {', '.join(LOG_COLUMNS)} FROM application_logs WHERE {b.sql()} "
        f"ORDER BY timestamp {direction}, id {direction} LIMIT {int(limit)}"
    )
    return sql, b.params


class SearchWindows:
    """Time windows to search a page in, from the leading edge of the range.

    A page of the newest matches rarely needs the whole range: the first
    window is the last hour, the second the rest of the last day, the third
    the rest of the range. A query that fills its page in the first hour
    reads only that hour; a sparse one costs at most three queries (measured:
    sizing windows by the density found so far costs more, because every
    query pays the text index's per-part lookup again).
    """

    EDGES = (dt.timedelta(hours=1), dt.timedelta(days=1))

    def __init__(self, query: LogQuery, edges: tuple[dt.timedelta, ...] | None = None):
        # ``edges``: EDGES less those a search's words are known to be too rare to fill.
        self.edges = self.EDGES if edges is None else edges
        self.order = query.order
        self.start, self.end = query.start, query.end
        if query.after is not None:
            pos = dt.datetime.fromisoformat(query.after.timestamp).replace(tzinfo=dt.UTC)
            if query.order == "desc":
                self.end = min(self.end, pos + dt.timedelta(milliseconds=1))
            else:
                self.start = max(self.start, pos)
        self.covered = dt.timedelta(0)

    def next(self, found: int, wanted: int) -> tuple[dt.datetime, dt.datetime] | None:
        """The next window, given the rows found so far; None when the range is done."""
        total = self.end - self.start
        if self.covered >= total or found >= wanted:
            return None
        target = next((edge for edge in self.edges if edge > self.covered), total)
        if target >= total * 0.8:
            target = total
        span = target - self.covered
        if self.order == "desc":
            w_end = self.end - self.covered
            w_start = max(self.start, w_end - span)
        else:
            w_start = self.start + self.covered
            w_end = min(self.end, w_start + span)
        self.covered += w_end - w_start
        return w_start, w_end


def cursor_from_line(line: bytes, query: LogQuery) -> Cursor:
    """The cursor after a rendered log line (its timestamp and id)."""
    row = orjson.loads(line)
    ts = row["timestamp"].replace("T", " ").rstrip("Z")
    return Cursor(timestamp=ts, id=row["id"], order=query.order, start_ms=_ms(query.start), end_ms=_ms(query.end))


# --- Python-side matching (tails) ----------------------------------------------------------


def matches(query: LogQuery, scope: TokenScope | None, row: Mapping[str, Any]) -> bool:
    """Whether a stored row (an ingest event) satisfies the query's filters and
    the token's scope, with the same meaning as the SQL of :func:`build_filters`."""
    if query.levels is not None and row.get("level") not in query.levels:
        return False
    source = row.get("source") or ""
    if query.sources and not any(glob_match(g, source) for g in query.sources):
        return False
    if scope is not None and scope.sources and not any(glob_match(g, source) for g in scope.sources):
        return False
    for name in ("user_id", "session_id", "request_id"):
        wanted = getattr(query, name)
        if wanted is not None and row.get(name) != wanted:
            return False
    tags = row.get("tags") or []
    if any(t not in tags for t in query.tags):
        return False
    if query.words or query.phrases:
        message = row.get("message") or ""
        message_tokens = set(tokens_of(message))
        tag_tokens = {t for tag in tags for t in tokens_of(tag)}
        for word in query.words:
            if word not in message_tokens and word not in tag_tokens:
                return False
        folded = message.lower()
        for phrase in query.phrases:
            if not set(tokens_of(phrase)) <= message_tokens or phrase.lower() not in folded:
                return False
    return True


def render_log(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row or ingest event as the API's log object (the spec's field names)."""
    out = {name: row.get(name) for name in LOG_COLUMNS}
    ts = row["timestamp"]
    if isinstance(ts, dt.datetime):
        ts = ts.astimezone(dt.UTC) if ts.tzinfo else ts
        out["timestamp"] = ts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    else:
        out["timestamp"] = str(ts).replace(" ", "T") + "Z"
    out["id"] = str(row["id"])
    context = row.get("context")
    if isinstance(context, str | bytes):
        try:
            context = orjson.loads(context) if context else {}
        except orjson.JSONDecodeError:
            context = {}
    out["context"] = context if isinstance(context, dict) else {}
    out["tags"] = list(row.get("tags") or [])
    out["host"] = row.get("host") or ""
    out["file"] = row.get("file") or ""
    out["offset"] = row.get("offset") or 0
    return out


def cursor_after(row: Mapping[str, Any], query: LogQuery) -> Cursor:
    """The cursor after a stored row or ingest event."""
    ts = row["timestamp"]
    if isinstance(ts, dt.datetime):
        text = ts.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if ts.tzinfo else (
            ts.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])
    else:
        text = str(ts)
    return Cursor(timestamp=text, id=str(row["id"]), order=query.order, start_ms=_ms(query.start),
                  end_ms=_ms(query.end))
