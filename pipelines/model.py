"""The shape of a pipeline file, as msgspec Structs (defaults live here).

A pipeline file is one YAML mapping::

    name: payments-error-burst
    on: log                     # log | contact_form | email_event | notification_event | schedule
    match: {level: ERROR, source: "payments*"}
    rule: {type: frequency, threshold: 5, window: 1m, group_by: [source], throttle: 15m}
    steps:
      - type: notify
        options: {user_id: oncall, title: "{{ count }} errors in {{ group.source }}"}

The match language is compiled by :mod:`pipelines.match`, rules live in
:mod:`pipelines.rules`, schedules in :mod:`pipelines.schedule`.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Annotated, Any, Literal

import msgspec

from agent.configfile import Duration

TRIGGERS = ("log", "contact_form", "email_event", "notification_event", "schedule")
Trigger = Literal["log", "contact_form", "email_event", "notification_event", "schedule"]
LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL")

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


class Retry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Attempts in all (1 = no retry). Only TransientError and timeouts are retried.
    attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    # Wait before the second attempt; doubles each time up to max_backoff.
    backoff: Duration = Duration(1.0)
    max_backoff: Duration = Duration(60.0)


class StepSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A registered step type (`pipelines check` lists them).
    type: str
    # Names this step's output for later steps: `steps.<id>`. Default: the type,
    # suffixed with its position when a type appears twice.
    id: str | None = None
    # A Jinja2 expression (`count > 10`, `event.level == "CRITICAL"`); the step
    # is skipped when it is false.
    when: str | None = None
    # The step type's own options; string values are Jinja2 templates.
    options: dict[str, Any] = {}
    retry: Retry = msgspec.field(default_factory=Retry)
    # Per attempt.
    timeout: Duration = Duration(30.0)
    # What a failed step (after its retries) does to the rest of the run.
    on_error: Literal["continue", "stop"] = "stop"


class RuleSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One rule; which fields apply depends on ``type`` (checked in __post_init__)."""

    type: Literal["any", "frequency", "spike", "flatline", "new_value"] = "any"
    # Record fields or context paths (`context.tenant`) that split the stream
    # into independent groups, each with its own window and throttle.
    group_by: list[str] = []
    # After a group fires, it stays quiet this long (ElastAlert's realert).
    throttle: Duration = Duration(0.0)
    # Also run the steps once an incident is over, with `resolved` true
    # (Alertmanager's send_resolved): for any/frequency/spike when the group had
    # no matches for `resolve_after` (default: the window); for flatline when
    # the group logs again.
    resolve: bool = False
    resolve_after: Duration | None = None
    # frequency: fire at `threshold` matches within `window`.
    # flatline: fire when fewer than `threshold` matches within `window`.
    threshold: Annotated[int, msgspec.Meta(ge=1)] | None = None
    window: Duration | None = None
    # spike: compare the last `window` with the `window` before it.
    direction: Literal["up", "down", "both"] = "up"
    ratio: Annotated[float, msgspec.Meta(gt=1.0)] = 3.0
    min_current: Annotated[int, msgspec.Meta(ge=0)] = 1
    min_reference: Annotated[int, msgspec.Meta(ge=0)] = 1
    # flatline: groups expected even if never seen (`[{source: payments}]`).
    expect: list[dict[str, str]] = []
    # flatline: a group not seen for this long is no longer expected.
    forget_after: Duration = Duration(86400.0)
    # new_value: the fields whose (combined) value is new within `window`.
    fields: list[str] = []

    def __post_init__(self) -> None:
        t = self.type
        if t in ("frequency", "flatline"):
            if self.threshold is None:
                raise ValueError(f"a {t} rule needs `threshold`")
            if not self.window:
                raise ValueError(f"a {t} rule needs `window`")
        if t in ("spike", "new_value") and not self.window:
            raise ValueError(f"a {t} rule needs `window`")
        if t == "new_value" and not self.fields:
            raise ValueError("a new_value rule needs `fields` (for example [message])")
        if t != "flatline" and self.expect:
            raise ValueError("`expect` applies to flatline rules only")
        if self.resolve and t == "new_value":
            raise ValueError("a new_value rule has nothing to resolve")
        if self.resolve_after is not None and (not self.resolve or t == "flatline"):
            raise ValueError("`resolve_after` needs `resolve: true` (flatline rules resolve when the group logs)")
        if self.resolve and t == "any" and not self.resolve_after:
            raise ValueError("an any rule with `resolve: true` needs `resolve_after`")
        if t == "spike" and self.threshold is not None:
            raise ValueError("a spike rule uses `ratio`, `min_current` and `min_reference`, not `threshold`")
        if t == "flatline" and self.expect:
            for group in self.expect:
                if set(group) != set(self.group_by):
                    raise ValueError(f"each `expect` entry must name exactly the group_by fields "
                                     f"{self.group_by}")


class ScheduleSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Five-field cron (`0 8 * * *`, `*/5 * * * 1-5`), or `every` — not both.
    cron: str | None = None
    every: Duration | None = None
    # IANA zone the cron expression is read in (`Europe/Berlin`).
    timezone: str = "UTC"
    # A run missed while the collector was down is made up if it is at most
    # this late (0 = never made up).
    catch_up: Duration = Duration(3600.0)

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every is None):
            raise ValueError("a schedule needs exactly one of `cron` or `every`")
        if self.every is not None and self.every < 1:
            raise ValueError("`every` must be at least 1s")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {self.timezone!r} (an IANA name like Europe/Berlin)") from None
        if self.cron is not None:
            from croniter import croniter

            if len(self.cron.split()) != 5 or not croniter.is_valid(self.cron):
                raise ValueError(f"invalid cron expression {self.cron!r} "
                                 "(five fields: minute hour day month weekday)")

    @property
    def tz(self) -> dt.tzinfo:
        return zoneinfo.ZoneInfo(self.timezone)


class PipelineSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    description: str = ""
    enabled: bool = True
    on: Trigger = "log"
    # The match language (see docs/plugins.md); an empty match matches everything.
    match: dict[str, Any] = {}
    rule: RuleSpec = msgspec.field(default_factory=RuleSpec)
    schedule: ScheduleSpec | None = None
    steps: Annotated[list[StepSpec], msgspec.Meta(min_length=1)]
    # Runs of this pipeline allowed at once (a slow step holds back only these).
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    # Runs waiting beyond this are recorded as dropped, never silently lost.
    max_queue: Annotated[int, msgspec.Meta(ge=1)] = 10_000

    def __post_init__(self) -> None:
        if self.on == "schedule":
            if self.schedule is None:
                raise ValueError("`on: schedule` needs a `schedule:` (cron or every)")
            if self.match:
                raise ValueError("a scheduled pipeline has no `match` (its steps query what they need)")
            if self.rule.type != "any":
                raise ValueError("a scheduled pipeline has no `rule`")
        elif self.schedule is not None:
            raise ValueError("`schedule` needs `on: schedule`")
        ids = [s.id for s in self.steps if s.id is not None]
        if len(ids) != len(set(ids)):
            raise ValueError("step ids must be unique")
