"""The ``notify`` pipeline step: create a notification.

::

    - type: notify
      options:
        user_id: oncall                        # or user_ids: [alice, bob]
        type: payments.errors
        priority: HIGH                         # LOW | MEDIUM | HIGH | CRITICAL
        title: "{{ count }} errors in {{ group.source }}"
        message: "{{ event.message }}"
        channels: [email, in_app]
        data: {source: "{{ group.source }}"}
        dedup_key: "payments-errors-{{ group.source }}"   # optional

The notification goes through the user's preferences, quiet hours and
digests like any other. Without a ``dedup_key`` the step uses one derived
from the pipeline run and step, so an engine retry of this step never
creates a second notification.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import msgspec

from collector.notifications.model import Priority
from plugins import hookimpl
from plugins.types import PermanentError, StepContext, TransientError


class NotifyOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    title: str
    message: str
    type: str = "pipeline"
    user_id: str | None = None
    user_ids: list[str] = []
    priority: str = "MEDIUM"
    channels: list[str] = msgspec.field(default_factory=lambda: ["email", "in_app"])
    data: dict[str, Any] | None = None
    dedup_key: str | None = None
    # RFC 3339 instant to deliver at (held until then).
    scheduled_for: str | None = None

    def __post_init__(self) -> None:
        if self.user_id is None and not self.user_ids:
            raise ValueError("set user_id or user_ids")
        if "{{" not in self.priority and self.priority.upper() not in Priority.__members__:
            raise ValueError(f"priority must be one of {', '.join(Priority.__members__)}")
        if not self.channels:
            raise ValueError("channels must name at least one channel")

    def recipients(self) -> list[str]:
        found = ([self.user_id] if self.user_id else []) + list(self.user_ids)
        return list(dict.fromkeys(u.strip() for u in found if u and u.strip()))


class NotifyStep:
    name = "notify"
    Options = NotifyOptions

    async def run(self, event: Mapping[str, Any], options: NotifyOptions,
                  context: StepContext) -> Mapping[str, Any]:
        from collector import appkeys
        from collector.notifications.model import CreateNotification

        app = context.app
        service = app.get(appkeys.NOTIFIER) if app is not None else None
        if service is None:
            raise PermanentError("the notify step needs a running collector (no notification service)")
        scheduled = None
        if options.scheduled_for:
            try:
                scheduled = dt.datetime.fromisoformat(options.scheduled_for.replace("Z", "+00:00"))
            except ValueError:
                raise PermanentError(f"scheduled_for is not an RFC 3339 instant: {options.scheduled_for!r}") from None
        results = []
        for user_id in options.recipients():
            dedup = options.dedup_key or f"pipeline:{context.pipeline}:{context.run_id}:{context.step_id}"
            try:
                request = CreateNotification(
                    user_id=user_id, type=options.type, priority=options.priority, title=options.title[:200],
                    message=options.message, channels=options.channels, data=options.data,
                    scheduled_for=scheduled, dedup_key=dedup[:200],
                )
            except (ValueError, msgspec.ValidationError) as exc:
                raise PermanentError(f"notification rejected: {exc}") from None
            try:
                notification, created = await service.create(request, created_by=f"pipeline:{context.pipeline}")
            except ValueError as exc:
                raise PermanentError(str(exc)) from None
            except OSError as exc:
                raise TransientError(f"storage: {exc}") from exc
            results.append({"id": notification["id"], "user_id": user_id, "created": created,
                            "status": notification["status"]})
        return {"notifications": results, "ids": [r["id"] for r in results]}

    def describe(self, event: Mapping[str, Any], options: NotifyOptions, context: StepContext) -> str:
        who = ", ".join(options.recipients())
        return (f"notify {who} ({options.priority.upper()}, type {options.type!r}) by "
                f"{', '.join(options.channels)}: {options.title[:200]}")


@hookimpl
def logferry_register_steps(register: Any) -> None:
    register(NotifyStep())
