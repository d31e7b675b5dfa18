"""When a scheduled pipeline runs next: cron (in a time zone) or a fixed interval."""

from __future__ import annotations

import datetime as dt

from croniter import croniter

from pipelines.model import ScheduleSpec


def next_run(spec: ScheduleSpec, after: float) -> float:
    """The first scheduled time strictly after ``after`` (epoch seconds).

    Cron expressions are read in the schedule's time zone, so ``0 8 * * *`` in
    ``Europe/Berlin`` is 08:00 Berlin time on both sides of a DST change.
    Intervals are aligned to the epoch (``every: 1h`` runs on the hour), so
    restarts do not shift them.
    """
    if spec.every is not None:
        step = float(spec.every)
        return (after // step + 1) * step
    assert spec.cron is not None
    start = dt.datetime.fromtimestamp(after, spec.tz)
    return float(croniter(spec.cron, start).get_next(float))


def previous_run(spec: ScheduleSpec, before: float) -> float:
    """The last scheduled time at or before ``before``."""
    if spec.every is not None:
        step = float(spec.every)
        return (before // step) * step
    assert spec.cron is not None
    start = dt.datetime.fromtimestamp(before + 1e-3, spec.tz)
    return float(croniter(spec.cron, start).get_prev(float))


def first_due(spec: ScheduleSpec, now: float, last_run: float | None) -> float:
    """When to run first after a start at ``now``: a run missed since
    ``last_run`` (at most ``catch_up`` late) is due at once, else the next one."""
    if last_run is not None and spec.catch_up > 0:
        missed = previous_run(spec, now)
        if missed > last_run and now - missed <= spec.catch_up:
            return missed
    return next_run(spec, now)
