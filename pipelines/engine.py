"""The pipeline engine: match events, feed rules, run steps, off the ingest path.

Flow::

    EventBus ──enqueue──▶ dispatch queue ──▶ dispatcher task: match + rules
                                                   │ Firing
                                                   ▼
                      one run queue and `concurrency` workers per pipeline ──▶ steps

* Publishers only ``put_nowait`` (:meth:`PipelineEngine.enqueue`); matching runs
  in the dispatcher task, yielding to the loop between slices of a batch.
* Each pipeline has its own run queue and workers, so a slow step holds back
  only its own pipeline, and only beyond its ``concurrency``.
* A step failing (after its retries) is logged, counted and recorded with the
  event in ``pipeline_runs``; a run the queue cannot take is recorded as
  ``dropped``. Nothing disappears silently.
* The clock is injected (``clock() -> epoch seconds``): tests drive windows,
  throttles and schedules without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import msgspec

from pipelines.loader import Pipeline, StepPlan, convert_options
from pipelines.match import LEVEL_RANK
from pipelines.model import PipelineSpec
from pipelines.rules import Firing, Rule, build_rule, event_time
from pipelines.schedule import first_due, next_run
from pipelines.templates import TemplateError, Templates, render_tree
from plugins.types import PermanentError, TransientError

log = logging.getLogger("logferry.pipelines")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

DISPATCH_SLICE = 256
#: Events waiting to be matched; beyond this, new batches are not matched
#: (they are stored all the same) and the shortfall is counted and logged.
MAX_PENDING_EVENTS = 1_000_000


class StepOutcome(msgspec.Struct, kw_only=True):
    id: str
    type: str
    # ok | failed | skipped | not_run | dry_run
    status: str
    attempts: int = 0
    duration_ms: float = 0.0
    error: str | None = None
    description: str | None = None
    output: Any = None


class RunRecord(msgspec.Struct, kw_only=True):
    """One run of a pipeline, as stored in ``pipeline_runs``."""

    run_id: str
    pipeline: str
    trigger: str
    group_key: str
    started_at: float
    finished_at: float
    # ok | failed | dropped | dry_run
    status: str
    steps: list[StepOutcome] = []
    count: int = 0
    event: Any = None
    error: str | None = None
    group: dict[str, Any] = {}


class RunRequest(msgspec.Struct, kw_only=True):
    firing: Firing
    kind: str
    # time.monotonic() when the triggering events reached the engine.
    arrived: float
    extra: dict[str, Any] = {}


class RunContext:
    """What a step receives as ``context`` (``plugins.types.StepContext``)."""

    def __init__(self, *, app: Any, http: Any, pipeline: str, step_id: str, dry_run: bool,
                 logger: logging.Logger, run_id: str, attempt: int, variables: dict[str, Any],
                 templates: Templates):
        self.app = app
        self.http = http
        self.pipeline = pipeline
        self.step_id = step_id
        self.dry_run = dry_run
        self.logger = logger
        self.run_id = run_id
        self.attempt = attempt
        self.variables = variables
        self._templates = templates

    def render(self, template: str, variables: Mapping[str, Any] | None = None) -> str:
        return self._templates.render(template, self.variables if variables is None else variables)


class Recorder:
    """Where runs, firings and rule state go. The base keeps them in memory
    (``pipelines test``, unit tests); :class:`pipelines.state.StorageRecorder`
    also writes them to ClickHouse."""

    def __init__(self, keep: int = 1000):
        self.runs: deque[RunRecord] = deque(maxlen=keep)
        self.firings: deque[dict[str, Any]] = deque(maxlen=keep)

    def run(self, record: RunRecord) -> None:
        self.runs.append(record)

    def firing(self, pipeline: str, rule_type: str, firing: Firing) -> None:
        self.firings.append({"pipeline": pipeline, "rule": rule_type, "group_key": firing.group_key,
                             "fired_at": firing.at, "count": firing.count})

    def groups(self, pipeline: str, groups: Mapping[str, float]) -> None:
        """Groups a flatline rule knows, with when each was last seen."""

    async def flush(self) -> None:
        pass


class RunQueue:
    """What outlives a reload of one pipeline: its queue of runs, its workers,
    the runs in progress, per-group order and its counters."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[RunRequest] = asyncio.Queue()
        self.workers: list[asyncio.Task[None]] = []
        self.active = 0
        self.group_locks: dict[str, asyncio.Lock] = {}
        self.counters: dict[str, int] = {
            "matched": 0, "fired": 0, "runs": 0, "runs_failed": 0, "runs_dropped": 0,
            "steps_ok": 0, "steps_failed": 0, "steps_retried": 0, "steps_skipped": 0,
        }

    @contextlib.asynccontextmanager
    async def in_group_order(self, key: str) -> AsyncIterator[None]:
        """Runs of one group happen one after another, in the order they fired
        (a trigger is never overtaken by its resolve); other groups run alongside."""
        lock = self.group_locks.get(key)
        if lock is None:
            lock = self.group_locks[key] = asyncio.Lock()
        try:
            async with lock:
                self.active += 1
                try:
                    yield
                finally:
                    self.active -= 1
        finally:
            if not lock.locked() and self.group_locks.get(key) is lock:
                del self.group_locks[key]


class PipelineRuntime:
    """A loaded pipeline with its rule state and its :class:`RunQueue`."""

    def __init__(self, pipeline: Pipeline, rule: Rule, runs: RunQueue | None = None):
        self.pipeline = pipeline
        self.rule = rule
        self.runs = runs or RunQueue()
        self.next_due: float | None = None
        self.logger = logging.getLogger(f"logferry.pipelines.{pipeline.name}")

    @property
    def queue(self) -> asyncio.Queue[RunRequest]:
        return self.runs.queue

    @property
    def workers(self) -> list[asyncio.Task[None]]:
        return self.runs.workers

    @workers.setter
    def workers(self, tasks: list[asyncio.Task[None]]) -> None:
        self.runs.workers = tasks

    @property
    def counters(self) -> dict[str, int]:
        return self.runs.counters

    @property
    def active(self) -> int:
        return self.runs.active

    @property
    def spec(self) -> PipelineSpec:
        return self.pipeline.spec

    @property
    def name(self) -> str:
        return self.pipeline.spec.name


def _enc(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(obj)  # Duration
    if isinstance(obj, int):
        return int(obj)  # ByteSize
    return str(obj)


def _jsonable(value: Any) -> Any:
    return msgspec.to_builtins(value, enc_hook=_enc, str_keys=True)


class PipelineEngine:
    """Runs loaded pipelines: :meth:`enqueue` (the event-bus callback) →
    matching and rules in the dispatcher task → runs in per-pipeline workers.

    Tests and ``pipelines test`` drive it without background tasks through
    :meth:`process`, :meth:`tick` and :meth:`run`, with an injected ``clock``
    and ``sleep``.
    """

    def __init__(
        self,
        *,
        templates: Templates,
        app: Any = None,
        http: Any = None,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        recorder: Recorder | None = None,
        dry_run: bool = False,
        tick_interval: float = 1.0,
    ):
        self.templates = templates
        self.app = app
        self.http = http
        self.clock = clock
        self.sleep = sleep
        self.recorder = recorder or Recorder()
        self.dry_run = dry_run
        self.tick_interval = tick_interval
        self.runtimes: dict[str, PipelineRuntime] = {}
        self._by_kind: dict[str, list[PipelineRuntime]] = {}
        self._dispatch: asyncio.Queue[tuple[str, Sequence[Mapping[str, Any]], float]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        # Seconds from an event reaching the engine to the first step of its run.
        self.latencies: deque[float] = deque(maxlen=10_000)
        self.counters: dict[str, int] = {"events": 0, "dispatch_dropped": 0}
        self.reload_lock = asyncio.Lock()
        self._pending_events = 0

    # --- pipelines --------------------------------------------------------

    def set_pipelines(self, pipelines: Iterable[Pipeline], *,
                      last_runs: Mapping[str, float] | None = None) -> tuple[list[str], list[str]]:
        """Install pipelines (at start and on reload).

        A pipeline whose trigger, match and rule are unchanged keeps its rule
        state (windows, throttles); a changed one starts afresh. A pipeline that
        stays keeps its run queue and workers, so runs already decided still
        happen, with the new steps. Returns (kept, fresh) pipeline names.
        """
        old = self.runtimes
        new: dict[str, PipelineRuntime] = {}
        kept, fresh = [], []
        for pipeline in pipelines:
            if not pipeline.spec.enabled:
                continue
            previous = old.get(pipeline.name)
            if previous is not None and previous.pipeline.state_fingerprint == pipeline.state_fingerprint:
                rule = previous.rule
                kept.append(pipeline.name)
            else:
                rule = build_rule(pipeline.spec.rule, clock=self.clock, time_field=pipeline.time_field)
                fresh.append(pipeline.name)
            runtime = PipelineRuntime(pipeline, rule, previous.runs if previous is not None else None)
            if previous is not None and previous.pipeline.spec.schedule == pipeline.spec.schedule:
                runtime.next_due = previous.next_due
            if pipeline.spec.schedule is not None and runtime.next_due is None:
                last = (last_runs or {}).get(pipeline.name)
                runtime.next_due = first_due(pipeline.spec.schedule, self.clock(), last)
            new[pipeline.name] = runtime
        self.runtimes = new
        by_kind: dict[str, list[PipelineRuntime]] = {}
        for runtime in new.values():
            by_kind.setdefault(runtime.spec.on, []).append(runtime)
        self._by_kind = by_kind
        if self._running:
            for name, runtime in old.items():
                if name not in new:
                    for task in runtime.workers:
                        task.cancel()
                    self._drop_queued(runtime, "the pipeline was removed by a reload")
            for runtime in new.values():
                surplus = len(runtime.workers) - runtime.spec.concurrency
                for _ in range(max(0, surplus)):
                    runtime.workers.pop().cancel()
                self._start_workers(runtime)
        return kept, fresh

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._dispatcher(), name="pipelines:dispatch"))
        self._tasks.append(loop.create_task(self._ticker(), name="pipelines:tick"))
        for runtime in self.runtimes.values():
            self._start_workers(runtime)

    def _start_workers(self, runtime: PipelineRuntime) -> None:
        loop = asyncio.get_running_loop()
        runtime.workers = [t for t in runtime.workers if not t.done()]
        while len(runtime.workers) < runtime.spec.concurrency:
            runtime.workers.append(loop.create_task(self._worker(runtime.name, runtime.runs),
                                                    name=f"pipeline:{runtime.name}"))

    async def stop(self, *, drain_timeout: float = 5.0) -> None:
        """Finish what is queued (up to ``drain_timeout``), then cancel and await every task."""
        if not self._running:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), timeout=drain_timeout)
        self._running = False
        tasks = list(self._tasks)
        for runtime in self.runtimes.values():
            tasks.extend(runtime.workers)
            runtime.workers = []
        self._tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runtime in self.runtimes.values():
            self._drop_queued(runtime, "the collector stopped before this run started")
        await self.recorder.flush()

    def _drop_queued(self, runtime: PipelineRuntime, reason: str) -> None:
        """Record runs decided but never started as dropped: not forgotten."""
        now = self.clock()
        while not runtime.queue.empty():
            request = runtime.queue.get_nowait()
            runtime.queue.task_done()
            runtime.counters["runs_dropped"] += 1
            self.recorder.run(RunRecord(
                run_id=str(uuid.uuid4()), pipeline=runtime.name, trigger=request.kind,
                group_key=request.firing.group_key, started_at=now, finished_at=now, status="dropped",
                count=request.firing.count, event=_jsonable(request.firing.event), error=reason,
                group=_jsonable(request.firing.group)))

    async def drain(self) -> None:
        """Wait until every enqueued event is matched and every run finished."""
        while True:
            await self._dispatch.join()
            for runtime in list(self.runtimes.values()):
                await runtime.queue.join()
            if self._dispatch.empty() and all(r.queue.empty() and not r.active
                                              for r in self.runtimes.values()):
                return

    # --- input ---------------------------------------------------------------

    def enqueue(self, kind: str, events: Sequence[Mapping[str, Any]]) -> None:
        """EventBus callback: never blocks, never raises into the publisher."""
        if kind not in self._by_kind:
            return
        if self._pending_events + len(events) > MAX_PENDING_EVENTS:
            # The events are stored; only their matching is given up, counted and logged.
            self.counters["dispatch_dropped"] += len(events)
            log.error("pipelines are behind: %d %s events not matched", len(events), kind)
            return
        self._pending_events += len(events)
        self._dispatch.put_nowait((kind, events, time.monotonic()))

    def subscriber(self, kind: str) -> Callable[[Sequence[Mapping[str, Any]]], None]:
        return lambda events: self.enqueue(kind, events)

    def wants(self, kind: str) -> Callable[[], bool]:
        """Whether a pipeline is triggered by ``kind`` now (the pipelines may be reloaded)."""
        return lambda: kind in self._by_kind

    async def _dispatcher(self) -> None:
        while True:
            kind, events, arrived = await self._dispatch.get()
            try:
                await self.process(kind, events, arrived=arrived)
            except Exception:
                log.exception("matching %d %s events failed", len(events), kind)
            finally:
                self._pending_events -= len(events)
                self._dispatch.task_done()

    async def process(self, kind: str, events: Sequence[Mapping[str, Any]], *,
                      arrived: float | None = None) -> list[RunRequest]:
        """Match events against every pipeline of ``kind``, feed the rules and
        queue the runs that fire. Returns the queued runs."""
        arrived = time.monotonic() if arrived is None else arrived
        runtimes = self._by_kind.get(kind, ())
        queued: list[RunRequest] = []
        self.counters["events"] += len(events)
        for start in range(0, len(events), DISPATCH_SLICE):
            chunk = events[start:start + DISPATCH_SLICE]
            now = self.clock()
            # Computed once per event, not once per pipeline.
            times: dict[str, list[float]] = {}
            derived = [_derived_from(e) for e in chunk] if kind == "log" else [None] * len(chunk)
            # Pipelines with a minimum level see only the records at or above it,
            # without a call per record: most logs are below an alert's level.
            ranks = [LEVEL_RANK.get(e.get("level") or "", -1) for e in chunk] if kind == "log" else None
            at_least: dict[int, list[int]] = {}
            everything = range(len(chunk))
            for runtime in runtimes:
                match = runtime.pipeline.match
                observe = runtime.rule.observe
                name = runtime.name
                field = runtime.pipeline.time_field
                stamps = times.get(field)
                if stamps is None:
                    stamps = times[field] = [event_time(e, field, now) for e in chunk]
                min_level = runtime.pipeline.prefilter.min_level
                indices: Sequence[int] = everything
                if ranks is not None and min_level is not None:
                    rank = LEVEL_RANK[min_level]
                    found = at_least.get(rank)
                    if found is None:
                        found = at_least[rank] = [i for i, r in enumerate(ranks) if r >= rank]
                    indices = found
                matched = 0
                for i in indices:
                    event = chunk[i]
                    if not match(event):
                        continue
                    origin = derived[i]
                    if origin is not None and origin == name:
                        continue  # a pipeline never triggers itself through its own derived logs
                    matched += 1
                    firing = observe(event, ts=stamps[i])
                    if firing is not None:
                        queued.append(self._submit(runtime, firing, kind, arrived))
                runtime.counters["matched"] += matched
            if start + DISPATCH_SLICE < len(events):
                await asyncio.sleep(0)
        return queued

    async def tick(self) -> list[RunRequest]:
        """Clock-driven work: flatline and spike-down rules, schedules, pruning."""
        now = self.clock()
        queued: list[RunRequest] = []
        for runtime in list(self.runtimes.values()):
            if runtime.spec.schedule is not None:
                if runtime.next_due is not None and now >= runtime.next_due:
                    queued.append(self._submit_schedule(runtime, runtime.next_due, now))
                    runtime.next_due = next_run(runtime.spec.schedule, max(now, runtime.next_due))
                continue
            try:
                firings = runtime.rule.tick() + runtime.rule.resolutions()
            except Exception:
                log.exception("rule of pipeline %r failed on tick", runtime.name)
                continue
            for firing in firings:
                queued.append(self._submit(runtime, firing, runtime.spec.on, time.monotonic()))
            known = getattr(runtime.rule, "known_groups", None)
            if known is not None:
                self.recorder.groups(runtime.name, known())
        return queued

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                await self.tick()
                await self.recorder.flush()
            except Exception:
                log.exception("pipeline tick failed")

    # --- runs ------------------------------------------------------------------

    def _submit(self, runtime: PipelineRuntime, firing: Firing, kind: str, arrived: float,
                extra: dict[str, Any] | None = None) -> RunRequest:
        request = RunRequest(firing=firing, kind=kind, arrived=arrived, extra=extra or {})
        runtime.counters["fired"] += 1
        rule = runtime.rule
        # Firings are stored where a restart needs them: throttles, frequency
        # resets and schedules. An unthrottled `any` rule would only add load.
        if kind == "schedule":
            self.recorder.firing(runtime.name, "schedule", firing)
        elif firing.details.get("resolved"):
            self.recorder.firing(runtime.name, "resolved", firing)
        elif rule.effective_throttle > 0 or rule.type == "frequency" or rule.spec.resolve:
            self.recorder.firing(runtime.name, rule.type, firing)
        if runtime.queue.qsize() >= runtime.spec.max_queue:
            runtime.counters["runs_dropped"] += 1
            now = self.clock()
            log.error("pipeline %r has %d runs waiting; run dropped", runtime.name, runtime.queue.qsize())
            self.recorder.run(RunRecord(
                run_id=str(uuid.uuid4()), pipeline=runtime.name, trigger=kind, group_key=firing.group_key,
                started_at=now, finished_at=now, status="dropped", count=firing.count,
                event=_jsonable(firing.event), error="run queue full",
            ))
            return request
        runtime.queue.put_nowait(request)
        return request

    def _submit_schedule(self, runtime: PipelineRuntime, due: float, now: float) -> RunRequest:
        schedule = runtime.spec.schedule
        assert schedule is not None
        scheduled_at = dt.datetime.fromtimestamp(due, schedule.tz)
        event = {"scheduled_at": scheduled_at, "fired_at": dt.datetime.fromtimestamp(now, schedule.tz),
                 "late_seconds": max(0.0, now - due), "pipeline": runtime.name}
        firing = Firing(group_key="", group={}, count=1, at=due, event=event, events=[event])
        return self._submit(runtime, firing, "schedule", time.monotonic(),
                            extra={"schedule": {"scheduled_at": scheduled_at, "timezone": schedule.timezone,
                                                "cron": schedule.cron, "every": schedule.every}})

    async def _worker(self, name: str, runs: RunQueue) -> None:
        queue = runs.queue
        while True:
            request = await queue.get()
            try:
                async with runs.in_group_order(request.firing.group_key):
                    # Looked up per run: after a reload the new steps apply.
                    runtime = self.runtimes.get(name)
                    if runtime is None or runtime.runs is not runs:
                        continue
                    await self.run(runtime, request)
            except Exception:
                log.exception("pipeline %r run crashed", name)
            finally:
                queue.task_done()

    def variables_for(self, runtime: PipelineRuntime, request: RunRequest, run_id: str) -> dict[str, Any]:
        firing = request.firing
        tz = runtime.spec.schedule.tz if runtime.spec.schedule is not None else dt.UTC
        rule = {**_jsonable(runtime.spec.rule), **firing.details}
        return {
            "event": firing.event or {},
            "events": firing.events,
            "group": firing.group,
            "group_key": firing.group_key,
            "count": firing.count,
            "suppressed": firing.suppressed,
            "rule": rule,
            "steps": {},
            "pipeline": runtime.name,
            "now": dt.datetime.fromtimestamp(self.clock(), tz),
            "run_id": run_id,
            "schedule": request.extra.get("schedule"),
            "resolved": bool(firing.details.get("resolved")),
        }

    async def run(self, runtime: PipelineRuntime, request: RunRequest) -> RunRecord:
        """Run a pipeline's steps for one firing and record the outcome."""
        run_id = str(uuid.uuid4())
        started = self.clock()
        variables = self.variables_for(runtime, request, run_id)
        outcomes: list[StepOutcome] = []
        failed = False
        first = True
        interrupted = False
        try:
            for plan in runtime.pipeline.steps:
                if failed and _stopped(outcomes, runtime.pipeline.steps):
                    outcomes.append(StepOutcome(id=plan.id, type=plan.spec.type, status="not_run"))
                    continue
                if first:
                    self.latencies.append(time.monotonic() - request.arrived)
                    first = False
                outcome = await self._run_step(runtime, plan, request, variables, run_id)
                outcomes.append(outcome)
                if outcome.status == "failed":
                    failed = True
        except asyncio.CancelledError:
            # Shutdown cut this run short: record how far it got, then stop.
            interrupted = failed = True
            done = {o.id for o in outcomes}
            outcomes.extend(StepOutcome(id=p.id, type=p.spec.type, status="failed" if i == 0 else "not_run",
                                        error="interrupted: the collector stopped" if i == 0 else None)
                            for i, p in enumerate(p for p in runtime.pipeline.steps if p.id not in done))
        status = "dry_run" if self.dry_run else ("failed" if failed else "ok")
        runtime.counters["runs"] += 1
        if failed:
            runtime.counters["runs_failed"] += 1
        record = RunRecord(
            run_id=run_id, pipeline=runtime.name, trigger=request.kind, group_key=request.firing.group_key,
            started_at=started, finished_at=self.clock(), status=status, steps=outcomes,
            count=request.firing.count, event=_jsonable(request.firing.event),
            error=next((o.error for o in outcomes if o.status == "failed"), None),
            group=_jsonable(request.firing.group),
        )
        self.recorder.run(record)
        if interrupted:
            raise asyncio.CancelledError
        return record

    async def _run_step(self, runtime: PipelineRuntime, plan: StepPlan, request: RunRequest,
                        variables: dict[str, Any], run_id: str) -> StepOutcome:
        spec = plan.spec
        step_type = plan.step_type
        counters = runtime.counters
        event = request.firing.event or {}
        begun = time.perf_counter()

        def outcome(status: str, **kw: Any) -> StepOutcome:
            return StepOutcome(id=plan.id, type=spec.type, status=status,
                               duration_ms=round((time.perf_counter() - begun) * 1000, 3), **kw)

        def fail(error: str, attempts: int) -> StepOutcome:
            counters["steps_failed"] += 1
            runtime.logger.error("step %s (%s) failed after %d attempt(s): %s", plan.id, spec.type,
                                 attempts, error, extra={"pipeline": runtime.name, "run_id": run_id})
            variables["steps"][plan.id] = {"error": error}
            return outcome("failed", attempts=attempts, error=error)

        try:
            if spec.when is not None and not self.templates.evaluate(spec.when, variables):
                counters["steps_skipped"] += 1
                variables["steps"][plan.id] = {"skipped": True}
                return outcome("skipped")
            rendered = render_tree(self.templates, spec.options, variables)
            options = convert_options(rendered, step_type.Options)
        except (TemplateError, msgspec.ValidationError) as exc:
            if self.dry_run and any(o.get("dry_run") for o in variables["steps"].values()):
                # Earlier steps only described themselves: their output is unknown.
                variables["steps"][plan.id] = {"dry_run": True}
                return outcome("dry_run", description=f"would run; its options depend on earlier steps' "
                                                      f"output, unknown in a dry run ({exc})")
            return fail(f"options: {exc}", 0)

        def context(attempt: int) -> RunContext:
            return RunContext(app=self.app, http=self.http, pipeline=runtime.name, step_id=plan.id,
                              dry_run=self.dry_run, logger=runtime.logger, run_id=run_id, attempt=attempt,
                              variables=variables, templates=self.templates)

        if self.dry_run:
            try:
                description = step_type.describe(event, options, context(1))
            except Exception as exc:
                return fail(f"describe: {exc!r}", 0)
            variables["steps"][plan.id] = {"dry_run": True}
            return outcome("dry_run", description=description)

        retry = spec.retry
        delay = float(retry.backoff)
        for attempt in range(1, retry.attempts + 1):
            try:
                async with asyncio.timeout(float(spec.timeout)):
                    output = await step_type.run(event, options, context(attempt))
            except (TransientError, TimeoutError) as exc:
                message = (f"timed out after {float(spec.timeout):g}s" if isinstance(exc, TimeoutError)
                           else str(exc) or type(exc).__name__)
                if attempt == retry.attempts:
                    return fail(message, attempt)
                counters["steps_retried"] += 1
                wait = delay
                if isinstance(exc, TransientError) and exc.retry_after is not None:
                    wait = max(wait, exc.retry_after)
                wait = min(wait, float(retry.max_backoff))
                runtime.logger.warning("step %s (%s) attempt %d failed: %s; retrying in %gs", plan.id,
                                       spec.type, attempt, message, wait)
                await self.sleep(wait)
                delay = min(delay * 2, float(retry.max_backoff))
            except PermanentError as exc:
                return fail(str(exc) or type(exc).__name__, attempt)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                runtime.logger.exception("step %s (%s) raised", plan.id, spec.type)
                return fail(f"{type(exc).__name__}: {exc}", attempt)
            else:
                counters["steps_ok"] += 1
                variables["steps"][plan.id] = dict(output) if output is not None else {}
                return outcome("ok", attempts=attempt,
                               output=_jsonable(output) if output is not None else None)
        raise AssertionError("unreachable")

    def forget_user(self, user_id: str) -> int:
        """Drop a user's events from rule state (GDPR erasure): recent events
        with that ``user_id`` and groups keyed by it. Returns groups dropped."""
        dropped = 0
        for runtime in self.runtimes.values():
            rule = runtime.rule
            for key, state in list(rule.groups.items()):
                group = rule.group_from_key(rule.spec.group_by, key) if key else {}
                if user_id in group.values():
                    del rule.groups[key]
                    rule.last_fired.pop(key, None)
                    getattr(rule, "counts", {}).pop(key, None)
                    dropped += 1
                    continue
                kept = [e for e in state.recent if e.get("user_id") != user_id]
                if len(kept) != len(state.recent):
                    state.recent.clear()
                    state.recent.extend(kept)
        return dropped

    # --- introspection -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "engine": {**self.counters, "pending_events": self._pending_events},
            "pipelines": {
                name: {**r.counters, "queued": r.queue.qsize(), "active": r.active, **r.rule.stats()}
                for name, r in self.runtimes.items()
            },
        }


def _stopped(outcomes: list[StepOutcome], plans: list[StepPlan]) -> bool:
    """True once a failed step with ``on_error: stop`` has run."""
    by_id = {p.id: p for p in plans}
    return any(o.status == "failed" and by_id[o.id].spec.on_error == "stop" for o in outcomes)


def _derived_from(event: Mapping[str, Any]) -> str | None:
    context = event.get("context")
    if type(context) is dict and "derived_from" in context:
        derived = context["derived_from"]
        if isinstance(derived, Mapping):
            pipeline = derived.get("pipeline")
            return pipeline if isinstance(pipeline, str) else None
    return None
