"""Template filters every pipeline and email template can use.

- ``tojson``: JSON of any value (datetimes as ISO 8601).
- ``datetime(fmt="%Y-%m-%d %H:%M:%S %Z", tz=None)``: format a datetime or epoch seconds, optionally in a zone.
- ``duration``: seconds as ``90s``, ``5m``, ``1h``, ``7d``.
- ``truncate_middle(n=200)``: shorten long text keeping both ends (stack traces, URLs).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

import orjson

from plugins import hookimpl


def tojson(value: Any) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def format_datetime(value: Any, fmt: str = "%Y-%m-%d %H:%M:%S %Z", tz: str | None = None) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    if not isinstance(value, dt.datetime):
        return "" if value is None else str(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    if tz:
        value = value.astimezone(zoneinfo.ZoneInfo(tz))
    return value.strftime(fmt)


def duration(seconds: Any) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return ""
    seconds = float(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= 1 or seconds == 0:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


def truncate_middle(value: Any, length: int = 200) -> str:
    text = "" if value is None else str(value)
    if len(text) <= length:
        return text
    half = max(1, (length - 1) // 2)
    return f"{text[:half]}…{text[-half:]}"


@hookimpl
def logferry_register_template_filters(register: Any) -> None:
    register("tojson", tojson)
    register("datetime", format_datetime)
    register("duration", duration)
    register("truncate_middle", truncate_middle)
