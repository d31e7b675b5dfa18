"""Fixtures for pipeline tests: a controllable clock, events, and the
plugin-testing fixtures of ``plugins.testing`` (the same ones plugin authors use)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from plugins.testing import collector_app, http_receiver, logferry_plugins, run_pipeline, step_context
from tests.helpers import FakeClock

__all__ = ["collector_app", "http_receiver", "logferry_plugins", "run_pipeline", "step_context"]

T0 = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC).timestamp()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def log_event(at: float, *, level: str = "ERROR", source: str = "payments", message: str = "boom",
              **fields: Any) -> dict[str, Any]:
    """A log event as ingest publishes it."""
    event: dict[str, Any] = {
        "id": None, "timestamp": dt.datetime.fromtimestamp(at, dt.UTC), "level": level, "source": source,
        "message": message, "context": {}, "user_id": None, "session_id": None, "request_id": None,
        "ip_address": None, "user_agent": None, "duration_ms": None, "error_stack": None, "tags": [],
        "host": "",
    }
    event.update(fields)
    return event
