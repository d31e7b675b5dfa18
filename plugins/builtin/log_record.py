"""The ``log`` step: write a derived log record.

::

    - type: log
      options:
        level: WARN
        source: alerts
        message: "{{ count }} errors from {{ group.source }} in {{ rule.window | duration }}"
        context: {pipeline: "{{ pipeline }}"}

The record is validated like an ingested one, stored through the collector's
log writer and published to the event bus, so other pipelines can act on it.
Its ``context.derived_from`` names the pipeline and run; a pipeline never
triggers on its own derived records.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec

from plugins import hookimpl
from plugins.types import PermanentError, StepContext

LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL")


class LogOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    message: str
    level: str = "INFO"
    # Default: `pipeline.<name>`.
    source: str = ""
    context: dict[str, Any] = {}
    tags: list[str] = []
    user_id: str | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        if "{{" not in self.level and self.level.upper() not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}")


def _record(options: LogOptions, context: StepContext) -> Any:
    from agent.wire import Record

    return Record(
        timestamp=dt.datetime.now(dt.UTC).isoformat(),
        level=options.level,
        source=options.source or f"pipeline.{context.pipeline}",
        message=options.message,
        context={**options.context, "derived_from": {"pipeline": context.pipeline, "run_id": context.run_id}},
        user_id=options.user_id,
        request_id=options.request_id,
        tags=list(options.tags),
    )


class LogStep:
    name = "log"
    Options = LogOptions

    async def run(self, event: Mapping[str, Any], options: LogOptions,
                  context: StepContext) -> Mapping[str, Any]:
        from collector import appkeys
        from collector.events import LOG
        from collector.ingest import stored_events, validate_record

        app = context.app
        if app is None or appkeys.LOG_WRITER not in app:
            raise PermanentError("the log step needs a running collector (no log writer)")
        row, problem = validate_record(_record(options, context))
        if row is None:
            raise PermanentError(f"derived record rejected: {problem}")
        row["id"] = str(uuid.uuid4())
        row["agent_id"] = "pipelines"
        row["batch_id"] = ""
        retention = app.get(appkeys.RETENTION)
        if retention is not None:
            row["retention_days"] = retention.days_for(row["source"])
        await app[appkeys.LOG_WRITER].write([row])
        events = app.get(appkeys.EVENTS)
        if events is not None:
            events.publish(LOG, stored_events([row]))
        return {"id": row["id"], "source": row["source"], "level": row["level"]}

    def describe(self, event: Mapping[str, Any], options: LogOptions, context: StepContext) -> str:
        source = options.source or f"pipeline.{context.pipeline}"
        return f"write a {options.level.upper()} log to source {source!r}: {options.message[:300]}"


@hookimpl
def logferry_register_steps(register: Any) -> None:
    register(LogStep())
