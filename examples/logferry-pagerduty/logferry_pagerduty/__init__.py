"""A logferry plugin: the ``pagerduty`` step (PagerDuty Events API v2).

PagerDuty answers ``202 {"status": "success", "dedup_key": …}``; ``400`` for an
invalid event (not worth retrying), ``429`` when throttled and ``5xx`` when
unavailable (both retried by the pipeline engine, which honours Retry-After).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import aiohttp
import msgspec

from plugins import hookimpl
from plugins.types import PermanentError, StepContext, TransientError

EVENTS_API = "https://events.pagerduty.com/v2/enqueue"
SEVERITIES = {"DEBUG": "info", "INFO": "info", "WARN": "warning", "ERROR": "error", "CRITICAL": "critical"}


def pd_severity(level: Any) -> str:
    """A logferry level as a PagerDuty severity (``ERROR`` → ``error``)."""
    return SEVERITIES.get(str(level).upper(), "error")


class PagerDutyOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    routing_key: Annotated[str, msgspec.Meta(min_length=32, max_length=32)]
    summary: Annotated[str, msgspec.Meta(min_length=1)]
    action: Literal["trigger", "acknowledge", "resolve"] = "trigger"
    severity: Literal["critical", "error", "warning", "info", ""] = ""
    source: str = ""
    dedup_key: str = ""
    component: str | None = None
    group: str | None = None
    class_: str | None = msgspec.field(name="class", default=None)
    custom_details: dict[str, Any] = {}
    url: str = EVENTS_API


def build_event(event: Mapping[str, Any], options: PagerDutyOptions, context: StepContext) -> dict[str, Any]:
    group_key = context.variables.get("group_key") or ""
    body: dict[str, Any] = {
        "routing_key": options.routing_key,
        "event_action": options.action,
        "dedup_key": options.dedup_key or f"logferry:{context.pipeline}:{group_key}",
    }
    if options.action == "trigger":
        payload: dict[str, Any] = {
            "summary": options.summary[:1024],
            "source": options.source or str(event.get("source") or event.get("host") or "logferry"),
            "severity": options.severity or pd_severity(event.get("level", "ERROR")),
        }
        timestamp = event.get("timestamp")
        if timestamp is not None and hasattr(timestamp, "isoformat"):
            payload["timestamp"] = timestamp.isoformat()
        for name, value in (("component", options.component), ("group", options.group),
                            ("class", options.class_)):
            if value:
                payload[name] = value
        payload["custom_details"] = {"count": context.variables.get("count"), **options.custom_details}
        body["payload"] = payload
    return body


class PagerDutyStep:
    name = "pagerduty"
    Options = PagerDutyOptions

    async def run(self, event: Mapping[str, Any], options: PagerDutyOptions,
                  context: StepContext) -> Mapping[str, Any]:
        body = build_event(event, options, context)
        session = context.http
        own = session is None
        if own:
            session = aiohttp.ClientSession()
        try:
            async with session.post(options.url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as r:
                answer = await r.json(content_type=None) if r.content_length != 0 else {}
                status, retry_after = r.status, r.headers.get("Retry-After")
        except aiohttp.ClientError as exc:
            raise TransientError(f"PagerDuty unreachable: {exc}") from exc
        finally:
            if own:
                await session.close()
        if status == 429 or status >= 500:
            raise TransientError(f"PagerDuty answered {status}",
                                 retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None)
        if status >= 400:
            errors = "; ".join(answer.get("errors", [])) if isinstance(answer, dict) else ""
            raise PermanentError(f"PagerDuty refused the event ({status}): {errors or answer}")
        return {"dedup_key": answer.get("dedup_key", body["dedup_key"]), "status": answer.get("status")}

    def describe(self, event: Mapping[str, Any], options: PagerDutyOptions, context: StepContext) -> str:
        body = build_event(event, options, context)
        what = {"trigger": "trigger", "acknowledge": "acknowledge", "resolve": "resolve"}[options.action]
        severity = body.get("payload", {}).get("severity", "")
        return f"{what} PagerDuty incident {body['dedup_key']!r} ({severity}): {options.summary[:200]}"


@hookimpl
def logferry_register_steps(register: Any) -> None:
    register(PagerDutyStep())


@hookimpl
def logferry_register_template_filters(register: Any) -> None:
    register("pd_severity", pd_severity)
