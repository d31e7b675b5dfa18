"""The engine: off the ingest path, per-pipeline isolation, retries, timeouts,
on_error, step outputs, and failures that are recorded, never lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from collector.events import EventBus
from pipelines.engine import PipelineEngine, RunRecord
from pipelines.loader import load_pipeline_text
from pipelines.templates import Templates
from plugins.manager import build_plugin_manager
from plugins.testing import Receiver
from tests.pipelines.conftest import T0, FakeClock, log_event

MANAGER = build_plugin_manager(entry_points=False)


class Harness:
    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.sleeps: list[float] = []
        self.bus = EventBus()

        async def no_sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.engine = PipelineEngine(templates=Templates(MANAGER.template_filters()), clock=clock,
                                     sleep=no_sleep, tick_interval=3600)
        self.bus.subscribe("log", self.engine.subscriber("log"))

    def install(self, *texts: str) -> None:
        templates = self.engine.templates
        self.engine.set_pipelines([load_pipeline_text(t, MANAGER.steps(), templates) for t in texts])

    def runs(self, pipeline: str) -> list[RunRecord]:
        return [r for r in self.engine.recorder.runs if r.pipeline == pipeline]


@pytest.fixture
async def harness(clock: FakeClock) -> AsyncIterator[Harness]:
    h = Harness(clock)
    yield h
    await h.engine.stop(drain_timeout=0.1)


def webhook_pipeline(name: str, url: str, *, extra: str = "", step: str = "") -> str:
    return f"""\
name: {name}
on: log
match: {{level: ERROR}}
{extra}
steps:
  - type: webhook
    id: hook
    retry: {{attempts: 3, backoff: 1s}}
    {step}
    options: {{url: "{url}/{name}"}}
"""


async def test_publish_never_waits_and_a_slow_pipeline_stalls_no_other(
        harness: Harness, http_receiver: Callable[[], Any]) -> None:
    slow: Receiver = await http_receiver()
    fast: Receiver = await http_receiver()
    slow.gate = asyncio.Event()
    harness.install(webhook_pipeline("slow", slow.url, extra="concurrency: 1"),
                    webhook_pipeline("fast", fast.url))
    await harness.engine.start()
    started = time.perf_counter()
    for i in range(5):
        harness.bus.publish("log", [log_event(T0 + i)])
    assert time.perf_counter() - started < 0.05  # enqueue only
    await fast.wait_for(5)
    await slow.wait_for(1)
    await asyncio.sleep(0.05)
    assert len(slow.requests) == 1  # concurrency 1: the rest wait in its own queue
    assert len(harness.runs("fast")) == 5
    slow.gate.set()
    await slow.wait_for(5)
    await harness.engine.drain()
    assert [r.status for r in harness.runs("slow")] == ["ok"] * 5


async def test_transient_failures_are_retried_with_backoff(harness: Harness,
                                                           http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    target.respond(503, times=1)
    target.respond(429, headers={"Retry-After": "7"})
    harness.install(webhook_pipeline("retry", target.url))
    await harness.engine.start()
    harness.bus.publish("log", [log_event(T0)])
    await harness.engine.drain()
    [run] = harness.runs("retry")
    assert run.status == "ok"
    assert run.steps[0].attempts == 3
    assert harness.sleeps == [1.0, 7.0]  # backoff, then the server's Retry-After
    deliveries = {r["headers"]["X-Logferry-Delivery"] for r in target.requests}
    assert len(deliveries) == 1  # the same delivery id on every attempt


async def test_a_step_that_times_out_fails_after_its_retries_and_is_recorded(
        harness: Harness, http_receiver: Callable[[], Any]) -> None:
    hang: Receiver = await http_receiver()
    hang.gate = asyncio.Event()
    after: Receiver = await http_receiver()
    text = f"""\
name: timeouts
on: log
steps:
  - type: webhook
    timeout: 200ms
    retry: {{attempts: 2, backoff: 1s}}
    on_error: continue
    options: {{url: "{hang.url}/x"}}
  - type: webhook
    id: after
    options: {{url: "{after.url}/y"}}
"""
    harness.install(text)
    await harness.engine.start()
    started = time.perf_counter()
    harness.bus.publish("log", [log_event(T0, message="the event that failed")])
    await harness.engine.drain()
    assert time.perf_counter() - started < 2
    [run] = harness.runs("timeouts")
    assert run.status == "failed"
    assert [(s.status, s.attempts) for s in run.steps] == [("failed", 2), ("ok", 1)]
    assert run.steps[0].error == "timed out after 0.2s"
    assert run.event["message"] == "the event that failed"  # kept with the failure
    counters = harness.engine.runtimes["timeouts"].counters
    assert counters["steps_failed"] == 1 and counters["steps_retried"] == 1


async def test_on_error_stop_skips_the_rest_and_permanent_errors_are_not_retried(
        harness: Harness, http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    target.respond(400, "bad payload")
    text = f"""\
name: stops
on: log
steps:
  - type: webhook
    options: {{url: "{target.url}/a"}}
  - type: log
    options: {{message: never}}
"""
    harness.install(text)
    await harness.engine.start()
    harness.bus.publish("log", [log_event(T0)])
    await harness.engine.drain()
    [run] = harness.runs("stops")
    assert [(s.id, s.status, s.attempts) for s in run.steps] == [("webhook", "failed", 1), ("log", "not_run", 0)]
    assert "answered 400: bad payload" in (run.error or "")
    assert len(target.requests) == 1


async def test_step_outputs_templates_and_when(harness: Harness, http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    target.respond(200, {"ticket": 42})
    text = f"""\
name: chain
on: log
match: {{source: "pay*"}}
rule: {{type: frequency, threshold: 2, window: 1m, group_by: [source]}}
steps:
  - type: webhook
    id: open
    options:
      url: "{target.url}/open"
      body: {{summary: "{{{{ count }}}} errors in {{{{ group.source }}}}: {{{{ event.message }}}}"}}
  - type: webhook
    id: comment
    when: "steps.open.json.ticket == 42"
    options:
      url: "{target.url}/tickets/{{{{ steps.open.json.ticket }}}}"
      body: "{{{{ rule.type }}}} {{{{ rule.window | duration }}}}"
  - type: webhook
    id: never
    when: "count > 100"
    options: {{url: "{target.url}/never"}}
"""
    harness.install(text)
    await harness.engine.start()
    harness.bus.publish("log", [log_event(T0, source="payments", message="first"),
                                log_event(T0 + 1, source="payments", message="second")])
    await harness.engine.drain()
    assert [r["path"] for r in target.requests] == ["/open", "/tickets/42"]
    assert target.json(0) == {"summary": "2 errors in payments: second"}
    assert target.requests[1]["body"] == b"frequency 1m"
    [run] = harness.runs("chain")
    assert [s.status for s in run.steps] == ["ok", "ok", "skipped"]


async def test_a_full_queue_records_dropped_runs(harness: Harness, http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    target.gate = asyncio.Event()
    harness.install(webhook_pipeline("tiny", target.url, extra="concurrency: 1\nmax_queue: 2"))
    await harness.engine.start()
    harness.bus.publish("log", [log_event(T0 + i) for i in range(6)])
    await target.wait_for(1)
    await asyncio.sleep(0.05)
    runtime = harness.engine.runtimes["tiny"]
    # The batch is matched at once: two runs fit the queue, four are recorded
    # as dropped, each with its event.
    assert runtime.counters["runs_dropped"] == 4
    dropped = [r for r in harness.runs("tiny") if r.status == "dropped"]
    assert len(dropped) == 4 and all(r.event and r.error == "run queue full" for r in dropped)
    target.gate.set()
    await harness.engine.drain()
    assert len([r for r in harness.runs("tiny") if r.status == "ok"]) == 2


async def test_options_invalid_after_rendering_fail_the_step(harness: Harness) -> None:
    text = """\
name: badlevel
on: log
steps:
  - type: log
    options: {message: x, level: "{{ event.message }}"}
"""
    harness.install(text)
    await harness.engine.start()
    harness.bus.publish("log", [log_event(T0, message="LOUD")])
    await harness.engine.drain()
    [run] = harness.runs("badlevel")
    assert run.status == "failed" and (run.error or "").startswith("options: level must be one of")


async def test_reload_keeps_state_of_unchanged_rules_and_resets_changed_ones(harness: Harness) -> None:
    base = "name: {n}\non: log\nrule: {{type: frequency, threshold: {t}, window: 1h}}\n" \
           "steps: [{{type: log, options: {{message: '{m}'}}}}]\n"
    harness.install(base.format(n="a", t=3, m="x"), base.format(n="b", t=3, m="x"))
    await harness.engine.process("log", [log_event(T0), log_event(T0 + 1)])
    kept, fresh = harness.engine.set_pipelines([
        load_pipeline_text(base.format(n="a", t=3, m="steps changed"), MANAGER.steps(), harness.engine.templates),
        load_pipeline_text(base.format(n="b", t=4, m="x"), MANAGER.steps(), harness.engine.templates),
    ])
    assert (kept, fresh) == (["a"], ["b"])
    queued = await harness.engine.process("log", [log_event(T0 + 2)])
    assert [q.firing.count for q in queued] == [3]  # a kept its two events; b starts afresh
    assert harness.engine.runtimes["a"].pipeline.steps[0].spec.options == {"message": "steps changed"}


async def test_shutdown_records_interrupted_and_unstarted_runs(harness: Harness,
                                                              http_receiver: Callable[[], Any]) -> None:
    hang: Receiver = await http_receiver()
    hang.gate = asyncio.Event()
    harness.install(webhook_pipeline("hangs", hang.url, extra="concurrency: 1"))
    await harness.engine.start()
    harness.bus.publish("log", [log_event(T0), log_event(T0 + 1)])
    await hang.wait_for(1)
    await harness.engine.stop(drain_timeout=0.1)
    runs = harness.runs("hangs")
    assert sorted((r.status, r.error) for r in runs) == [
        ("dropped", "the collector stopped before this run started"),
        ("failed", "interrupted: the collector stopped"),
    ]
    assert all(r.event for r in runs)


async def test_a_disabled_pipeline_is_loaded_but_never_runs(harness: Harness) -> None:
    harness.install("name: paused\nenabled: false\nsteps: [{type: log, options: {message: x}}]\n")
    assert harness.engine.runtimes == {}
    assert await harness.engine.process("log", [log_event(T0)]) == []


async def test_runs_of_one_group_keep_their_order_while_other_groups_proceed(
        harness: Harness, http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    target.gate = asyncio.Event()
    text = f"""\
name: ordered
on: log
rule: {{type: any, group_by: [source]}}
steps: [{{type: webhook, options: {{url: "{target.url}/{{{{ event.source }}}}/{{{{ event.message }}}}"}}}}]
"""
    harness.install(text)
    await harness.engine.start()
    harness.bus.publish("log", [log_event(T0, source="a", message="1"), log_event(T0, source="a", message="2"),
                                log_event(T0, source="b", message="1")])
    await target.wait_for(2)
    await asyncio.sleep(0.05)
    assert sorted(r["path"] for r in target.requests) == ["/a/1", "/b/1"]  # a/2 waits for a/1
    target.gate.set()
    await harness.engine.drain()
    assert [r["path"] for r in target.requests][-1] == "/a/2"
