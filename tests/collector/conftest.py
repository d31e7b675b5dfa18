"""Fixtures of the log-reading tests: logs written straight into storage."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from collector.storage import Storage

LogFactory = Callable[..., list[dict[str, Any]]]


def ts(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def log_row(**fields: Any) -> dict[str, Any]:
    """A stored log row with defaults for whatever is not given."""
    row: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "timestamp": dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
        "level": "INFO",
        "source": "web",
        "message": "hello",
        "context": "{}",
        "tags": [],
    }
    row.update(fields)
    if isinstance(row["timestamp"], dt.datetime):
        row["timestamp"] = ts(row["timestamp"])
    return row


@pytest.fixture
def add_logs(storage: Storage) -> LogFactory:
    """``add_logs(row_fields, ...)`` → the rows stored (each a dict of fields)."""

    def add(*rows: dict[str, Any]) -> list[dict[str, Any]]:
        stored = [log_row(**r) for r in rows]
        storage.insert_rows_sync("application_logs", stored)
        return stored

    return add
