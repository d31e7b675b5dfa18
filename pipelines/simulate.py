"""Run one pipeline over a list of events, synchronously and in order.

Used by ``pipelines test`` (dry run) and by plugin tests (live steps): no
background tasks; the clock follows the events' own timestamps, and after
the last event moves on one window so flatline and spike-down rules can
fire. Runs happen inline, one after another.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipelines.engine import PipelineEngine, RunRecord
from pipelines.loader import Pipeline


class EventClock:
    """A clock that is wherever the events are (never going back)."""

    def __init__(self, start: float | None = None):
        self.now = dt.datetime.now(dt.UTC).timestamp() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance_to(self, ts: float) -> None:
        self.now = max(self.now, ts)


def _time_of(event: Mapping[str, Any], field: str) -> float | None:
    value = event.get(field)
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def clock_for(pipeline: Pipeline, events: Sequence[Mapping[str, Any]]) -> EventClock:
    first = _time_of(events[0], pipeline.time_field) if events else None
    return EventClock(first)


async def simulate(engine: PipelineEngine, pipeline: Pipeline, events: Sequence[Mapping[str, Any]], *,
                   clock: EventClock | None = None,
                   on_run: Callable[[RunRecord], None] | None = None) -> list[RunRecord]:
    """Feed ``events`` to ``pipeline`` (already installed in ``engine``) and run
    what fires, inline. ``clock`` must be the engine's clock if given."""
    if pipeline.name not in engine.runtimes:
        engine.set_pipelines([pipeline])
    runtime = engine.runtimes.get(pipeline.name)
    if runtime is None:
        return []
    runs: list[RunRecord] = []

    async def run_queued() -> None:
        while not runtime.queue.empty():
            request = runtime.queue.get_nowait()
            try:
                record = await engine.run(runtime, request)
            finally:
                runtime.queue.task_done()
            runs.append(record)
            if on_run is not None:
                on_run(record)

    if pipeline.spec.on == "schedule":
        runtime.next_due = engine.clock()
        await engine.tick()
        await run_queued()
        return runs
    for event in events:
        ts = _time_of(event, pipeline.time_field)
        if clock is not None and ts is not None:
            clock.advance_to(ts)
        await engine.process(pipeline.spec.on, [event])
        await engine.tick()
        await run_queued()
    if clock is not None:
        clock.advance_to(clock.now + float(pipeline.spec.rule.window or 0))
        await engine.tick()
        await run_queued()
    return runs
