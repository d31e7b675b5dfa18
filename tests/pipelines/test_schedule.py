"""Schedules: cron in a time zone (across DST), intervals, catch-up after downtime."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from agent.configfile import convert
from pipelines.engine import PipelineEngine
from pipelines.loader import load_pipeline_text
from pipelines.model import ScheduleSpec
from pipelines.schedule import first_due, next_run
from pipelines.templates import Templates
from plugins.manager import build_plugin_manager
from tests.pipelines.conftest import FakeClock

BERLIN = ZoneInfo("Europe/Berlin")


def spec(**fields: Any) -> ScheduleSpec:
    return convert(fields, ScheduleSpec)


def at(*args: int, tz: dt.tzinfo = BERLIN) -> float:
    return dt.datetime(*args, tzinfo=tz).timestamp()  # type: ignore[misc]


def test_cron_runs_at_local_time_on_both_sides_of_dst() -> None:
    daily = spec(cron="0 8 * * *", timezone="Europe/Berlin")
    before = next_run(daily, at(2026, 3, 28, 9, 0))  # Saturday; DST starts Sunday 29 March
    assert dt.datetime.fromtimestamp(before, BERLIN) == dt.datetime(2026, 3, 29, 8, 0, tzinfo=BERLIN)
    after = next_run(daily, before)
    assert dt.datetime.fromtimestamp(after, BERLIN) == dt.datetime(2026, 3, 30, 8, 0, tzinfo=BERLIN)
    assert after - before == 24 * 3600  # both 08:00 local, both after the switch
    assert before - next_run(daily, at(2026, 3, 27, 9, 0)) == 23 * 3600  # the short night


def test_next_run_is_strictly_after() -> None:
    daily = spec(cron="0 8 * * *", timezone="UTC")
    eight = at(2026, 3, 2, 8, 0, tz=dt.UTC)
    assert next_run(daily, eight) == eight + 86400
    assert next_run(daily, eight - 0.001) == eight


def test_intervals_are_aligned_so_restarts_do_not_shift_them() -> None:
    hourly = spec(every="1h")
    assert next_run(hourly, at(2026, 3, 2, 10, 17, tz=dt.UTC)) == at(2026, 3, 2, 11, 0, tz=dt.UTC)


def test_a_run_missed_during_downtime_is_made_up_within_catch_up() -> None:
    daily = spec(cron="0 8 * * *", timezone="UTC", catch_up="2h")
    yesterday = at(2026, 3, 1, 8, 0, tz=dt.UTC)
    # Down from 07:50 to 09:30: the 08:00 run is due at once on start.
    assert first_due(daily, at(2026, 3, 2, 9, 30, tz=dt.UTC), yesterday) == at(2026, 3, 2, 8, 0, tz=dt.UTC)
    # Up again at 10:30: too late, wait for tomorrow.
    assert first_due(daily, at(2026, 3, 2, 10, 30, tz=dt.UTC), yesterday) == at(2026, 3, 3, 8, 0, tz=dt.UTC)
    # Today's run was made before the restart: nothing to make up.
    today = at(2026, 3, 2, 8, 0, tz=dt.UTC)
    assert first_due(daily, at(2026, 3, 2, 9, 30, tz=dt.UTC), today) == at(2026, 3, 3, 8, 0, tz=dt.UTC)
    # A pipeline that never ran waits for its first time.
    assert first_due(daily, at(2026, 3, 2, 9, 30, tz=dt.UTC), None) == at(2026, 3, 3, 8, 0, tz=dt.UTC)


async def test_the_engine_runs_a_schedule_once_per_due_time(clock: FakeClock) -> None:
    manager = build_plugin_manager(entry_points=False)
    templates = Templates(manager.template_filters())
    pipeline = load_pipeline_text(
        "name: tick\non: schedule\nschedule: {every: 1m}\n"
        "steps: [{type: log, options: {message: 'at {{ schedule.scheduled_at }} {{ now.tzname() }}'}}]\n",
        manager.steps(), templates)
    clock.set(at(2026, 3, 2, 10, 0, 30, tz=dt.UTC))
    engine = PipelineEngine(templates=templates, clock=clock, dry_run=True)
    engine.set_pipelines([pipeline])
    assert await engine.tick() == []
    clock.set(at(2026, 3, 2, 10, 1, 0, tz=dt.UTC))
    [request] = await engine.tick()
    assert request.firing.event is not None
    assert request.firing.event["scheduled_at"] == dt.datetime(2026, 3, 2, 10, 1, tzinfo=dt.UTC)
    assert await engine.tick() == []  # same minute: once
    clock.set(at(2026, 3, 2, 10, 3, 10, tz=dt.UTC))  # two due times passed (the loop was busy): one run
    assert len(await engine.tick()) == 1
    assert engine.runtimes["tick"].next_due == at(2026, 3, 2, 10, 4, tz=dt.UTC)
