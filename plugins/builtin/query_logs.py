"""The ``query_logs`` step: count stored logs, grouped, for digests and reports.

::

    - type: query_logs
      id: top_errors
      options: {since: 24h, min_level: ERROR, group_by: [source, message], top: 10}

Later steps read ``steps.top_errors``:

- ``rows``: ``[{source, message, count, first_seen, last_seen, sample}]``, the
  ``top`` most frequent per value of the first ``group_by`` field;
- ``groups``: the same rows under each value of the first field
  (``{"payments": [...], "web": [...]}``), the natural shape for "per source";
- ``total``: every matching log in the period; ``since`` / ``until``.

With ``normalize: true`` (the default) messages that differ only in numbers
or hex ids count as one (``timeout after 31 ms`` and ``… 45 ms``); ``sample``
shows one real message. In a scheduled pipeline the period ends at the
scheduled time, so a run made up after downtime reports the right day.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from agent.configfile import Duration
from plugins import hookimpl
from plugins.types import PermanentError, StepContext

LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL")
GroupField = Literal["source", "message", "level", "host", "user_id", "request_id"]
_NORMALIZE = r"replaceRegexpAll(message, '[0-9a-fA-F]{8}-[0-9a-fA-F-]{27}|0x[0-9a-fA-F]+|[0-9]+', '#')"


class QueryLogsOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The period: from `since` before its end to `until` before now (or the scheduled time).
    since: Duration = Duration(86400.0)
    until: Duration = Duration(0.0)
    min_level: str = "ERROR"
    # Source globs; empty means every source.
    sources: list[str] = []
    # Only messages containing this text (case-insensitive).
    contains: str | None = None
    group_by: Annotated[list[GroupField], msgspec.Meta(min_length=1, max_length=4)] = msgspec.field(
        default_factory=lambda: ["source", "message"])
    # Rows per value of the first group_by field.
    top: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.min_level.upper() not in LEVELS:
            raise ValueError(f"min_level must be one of {', '.join(LEVELS)}")
        if self.since <= self.until:
            raise ValueError("`since` must be longer ago than `until`")


def _like(glob: str) -> str:
    out = []
    for ch in glob:
        out.append({"%": "\\%", "_": "\\_", "\\": "\\\\", "*": "%", "?": "_"}.get(ch, ch))
    return "".join(out)


def _period(options: QueryLogsOptions, context: StepContext) -> tuple[dt.datetime, dt.datetime]:
    schedule = context.variables.get("schedule") or {}
    end = schedule.get("scheduled_at") if isinstance(schedule, Mapping) else None
    if not isinstance(end, dt.datetime):
        now = context.variables.get("now")
        end = now if isinstance(now, dt.datetime) else dt.datetime.now(dt.UTC)
    end = end.astimezone(dt.UTC) - dt.timedelta(seconds=float(options.until))
    return end - dt.timedelta(seconds=float(options.since) - float(options.until)), end


def build_query(options: QueryLogsOptions, since: dt.datetime,
                until: dt.datetime) -> tuple[str, str, dict[str, Any]]:
    """(grouped query, total query, parameters); parameterised, never interpolated."""
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    params: dict[str, Any] = {
        "since": since.strftime(fmt)[:-3], "until": until.strftime(fmt)[:-3],
        "rank": LEVELS.index(options.min_level.upper()) + 1, "top": options.top, "limit": options.limit,
    }
    where = ["timestamp > {since:DateTime64(3)}", "timestamp <= {until:DateTime64(3)}",
             "toInt8(level) >= {rank:Int8}"]
    if options.sources:
        ors = " OR ".join(f"source LIKE {{src{i}:String}}" for i in range(len(options.sources)))
        where.append(f"({ors})")
        params.update({f"src{i}": _like(g) for i, g in enumerate(options.sources)})
    if options.contains:
        where.append("positionCaseInsensitiveUTF8(message, {contains:String}) > 0")
        params["contains"] = options.contains
    # Grouping expressions get aliases of their own: ClickHouse aliases are
    # query-wide, and `any(message)` must still see the raw message.
    columns, keys = [], []
    for field in options.group_by:
        if field == "message" and options.normalize:
            columns.append(f"{_NORMALIZE} AS g_message")
        elif field == "level":
            columns.append("toString(level) AS g_level")
        else:
            columns.append(f"{field} AS g_{field}")
        keys.append(f"g_{field}")
    names = ", ".join(keys)
    first = keys[0]
    order = f"{first}, count DESC" if len(options.group_by) > 1 else "count DESC"
    limit_by = f"LIMIT {{top:UInt32}} BY {first}" if len(options.group_by) > 1 else ""
    grouped = (
        f"SELECT {', '.join(columns)}, count() AS count, min(timestamp) AS first_seen, "
        f"max(timestamp) AS last_seen, any(message) AS sample "
        f"FROM application_logs WHERE {' AND '.join(where)} GROUP BY {names} "
        f"ORDER BY {order} {limit_by} LIMIT {{limit:UInt32}}"
    )
    if len(options.group_by) == 1:
        grouped = grouped.replace("LIMIT {limit:UInt32}", "LIMIT {top:UInt32}")
    total = f"SELECT count() AS total FROM application_logs WHERE {' AND '.join(where)}"
    return grouped, total, params


class QueryLogsStep:
    name = "query_logs"
    Options = QueryLogsOptions

    async def run(self, event: Mapping[str, Any], options: QueryLogsOptions,
                  context: StepContext) -> Mapping[str, Any]:
        from collector import appkeys

        app = context.app
        if app is None or appkeys.STORAGE not in app:
            raise PermanentError("query_logs needs a running collector (no storage)")
        storage = app[appkeys.STORAGE]
        since, until = _period(options, context)
        grouped, total_sql, params = build_query(options, since, until)
        rows = await storage.query(grouped, params)
        total = (await storage.query(total_sql, params))[0]["total"]
        first = options.group_by[0]
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            for field in options.group_by:
                row[field] = row.pop(f"g_{field}")
            for key in ("first_seen", "last_seen"):
                value = row.get(key)
                if isinstance(value, dt.datetime) and value.tzinfo is None:
                    row[key] = value.replace(tzinfo=dt.UTC)
            row["count"] = int(row["count"])
            groups.setdefault(str(row.get(first)), []).append(row)
        return {"rows": rows, "groups": groups, "total": int(total), "since": since, "until": until}

    def describe(self, event: Mapping[str, Any], options: QueryLogsOptions, context: StepContext) -> str:
        since, until = _period(options, context)
        where = f" from {', '.join(options.sources)}" if options.sources else ""
        return (f"count {options.min_level.upper()}+ logs{where} between {since:%Y-%m-%d %H:%M} and "
                f"{until:%Y-%m-%d %H:%M} UTC by {', '.join(options.group_by)}, top {options.top}")


@hookimpl
def logferry_register_steps(register: Any) -> None:
    register(QueryLogsStep())
