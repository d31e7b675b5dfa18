"""The collector feature that runs pipelines: ``setup(app)`` for the app factory.

Loads every file of ``collector.pipelines`` (start-up fails with every
error if one is invalid), then while the app runs: rebuilds rule windows
from storage, subscribes the engine to the event bus, runs the dispatcher,
the per-pipeline workers and the clock tick, and reloads on SIGHUP (keeping
the state of pipelines whose trigger, match and rule did not change; a
reload with errors logs them and keeps the running pipelines).

Needs ``plugins.host`` set up first (``app[appkeys.PLUGINS]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import msgspec
import orjson
from aiohttp import web

from agent.configfile import ConfigInvalid
from collector import appkeys
from collector.auth import requires
from collector.errors import ApiError
from collector.events import CONTACT_FORM, EMAIL_EVENT, LOG, NOTIFICATION_EVENT
from pipelines.engine import PipelineEngine, Recorder
from pipelines.loader import Pipeline, load_pipelines
from pipelines.state import StorageRecorder, erase_user_runs, last_schedule_runs, rebuild
from pipelines.templates import Templates

log = logging.getLogger("logferry.pipelines")

PIPELINES = web.AppKey("pipelines", PipelineEngine)
EVENT_KINDS = (LOG, CONTACT_FORM, EMAIL_EVENT, NOTIFICATION_EVENT)
#: Published by collector.erasure after a user's data is erased.
USER_ERASED = "user_erased"


class ReloadResult(msgspec.Struct, kw_only=True):
    ok: bool
    kept: list[str] = []
    fresh: list[str] = []
    removed: list[str] = []
    errors: list[str] = []


def load_configured(app: web.Application, templates: Templates) -> list[Pipeline]:
    """The pipelines of ``collector.pipelines``; raises ConfigInvalid with every error."""
    config = app[appkeys.CONFIG]
    manager = app[appkeys.PLUGINS]
    return load_pipelines(config.pipelines, manager.steps(), templates)


def setup(app: web.Application, *, tick_interval: float = 1.0) -> PipelineEngine:
    """Load the pipelines and hook the engine into the app's lifecycle."""
    manager = app[appkeys.PLUGINS]
    templates = Templates(manager.template_filters())
    pipelines = load_configured(app, templates)
    engine = PipelineEngine(templates=templates, app=app, tick_interval=tick_interval)
    app[PIPELINES] = engine
    app.cleanup_ctx.append(_make_lifecycle(pipelines))
    app.router.add_get("/v1/pipelines", list_pipelines)
    app.router.add_post("/v1/pipelines/reload", reload_pipelines)
    return engine


def _describe(engine: PipelineEngine) -> list[dict[str, Any]]:
    stats = engine.stats()["pipelines"]
    out = []
    for name, runtime in sorted(engine.runtimes.items()):
        spec = runtime.spec
        out.append({
            "name": name, "description": spec.description, "file": runtime.pipeline.file, "on": spec.on,
            "rule": spec.rule.type, "steps": [p.spec.type for p in runtime.pipeline.steps],
            "next_run": runtime.next_due, "stats": stats.get(name, {}),
        })
    return out


@requires("admin")
async def list_pipelines(request: web.Request) -> web.Response:
    """GET /v1/pipelines: every running pipeline with its counters and the
    latest runs that failed or were dropped (``?limit=`` of them, default 20)."""
    engine = request.app[PIPELINES]
    try:
        limit = max(0, min(int(request.query.get("limit", "20")), 1000))
    except ValueError:
        raise ApiError(400, "bad_parameter", "limit: must be a number") from None
    failed = [msgspec.to_builtins(r) for r in reversed(engine.recorder.runs) if r.status in ("failed", "dropped")]
    return web.json_response({"pipelines": _describe(engine), "engine": engine.stats()["engine"],
                              "recent_failures": failed[:limit]}, dumps=_dumps)


@requires("admin")
async def reload_pipelines(request: web.Request) -> web.Response:
    """POST /v1/pipelines/reload: what SIGHUP does; 422 with every error, the
    running pipelines unchanged, when a file is invalid."""
    result = await reload(request.app)
    return web.json_response(msgspec.to_builtins(result), status=200 if result.ok else 422)


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _make_lifecycle(pipelines: list[Pipeline]) -> Any:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        engine = app[PIPELINES]
        engine.http = app.get(appkeys.HTTP)
        storage = app.get(appkeys.STORAGE)
        if storage is not None:
            engine.recorder = StorageRecorder(storage)
            scheduled = [p.name for p in pipelines if p.spec.schedule is not None]
            last_runs = await last_schedule_runs(storage, scheduled)
        else:
            engine.recorder = Recorder()
            last_runs = {}
        engine.set_pipelines(pipelines, last_runs=last_runs)
        if storage is not None:
            replayed = await rebuild(storage, engine)
            for name, count in replayed.items():
                if count:
                    log.info("pipeline state rebuilt", extra={"pipeline": name, "replayed": count})
        events = app[appkeys.EVENTS]
        unsubscribe = [events.subscribe(kind, engine.subscriber(kind), wants=engine.wants(kind))
                       for kind in EVENT_KINDS]
        erasures: set[asyncio.Task[None]] = set()

        def on_user_erased(batch: Sequence[Mapping[str, Any]]) -> None:
            for item in batch:
                user_id = str(item.get("user_id") or "")
                if not user_id:
                    continue
                engine.forget_user(user_id)
                if storage is not None:
                    task = asyncio.get_running_loop().create_task(erase_user_runs(storage, user_id))
                    erasures.add(task)
                    task.add_done_callback(erasures.discard)

        unsubscribe.append(events.subscribe(USER_ERASED, on_user_erased))
        _register_metrics(app, engine)
        await engine.start()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[Any]] = set()

        def on_sighup() -> None:
            task = loop.create_task(reload(app), name="pipelines:reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        sighup = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
            sighup = True
        log.info("pipelines running", extra={"pipelines": sorted(engine.runtimes)})
        try:
            yield
        finally:
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            for task in list(reloads):
                task.cancel()
            await asyncio.gather(*reloads, return_exceptions=True)
            for undo in unsubscribe:
                undo()
            await asyncio.gather(*erasures, return_exceptions=True)
            await engine.stop()

    return lifecycle


async def reload(app: web.Application) -> ReloadResult:
    """Reload ``collector.pipelines`` (what SIGHUP does). On errors, log each and
    keep the running pipelines unchanged."""
    engine = app[PIPELINES]
    async with engine.reload_lock:
        return await _reload(app, engine)


async def _reload(app: web.Application, engine: PipelineEngine) -> ReloadResult:
    try:
        pipelines = load_configured(app, engine.templates)
    except ConfigInvalid as exc:
        for error in exc.errors:
            log.error("pipeline reload rejected: %s", error)
        return ReloadResult(ok=False, errors=[str(e) for e in exc.errors])
    before = set(engine.runtimes)
    storage = app.get(appkeys.STORAGE)
    last_runs: dict[str, float] = {}
    if storage is not None:
        scheduled = [p.name for p in pipelines if p.spec.schedule is not None]
        last_runs = await last_schedule_runs(storage, scheduled)
    kept, fresh = engine.set_pipelines(pipelines, last_runs=last_runs)
    if storage is not None and fresh:
        await rebuild(storage, engine, fresh)
    removed = sorted(before - set(engine.runtimes))
    log.info("pipelines reloaded", extra={"kept": kept, "fresh": fresh, "removed": removed})
    return ReloadResult(ok=True, kept=kept, fresh=fresh, removed=removed)


def _register_metrics(app: web.Application, engine: PipelineEngine) -> None:
    metrics = app.get(appkeys.METRICS)
    if metrics is None:
        return

    def total(counter: str) -> Any:
        return lambda: sum(r.counters[counter] for r in engine.runtimes.values())

    counters = ("matched", "fired", "runs", "runs_failed", "runs_dropped", "steps_failed", "steps_retried")
    for counter in counters:
        metrics.gauge(f"logferry_pipeline_{counter}_total", total(counter))
    metrics.gauge("logferry_pipelines_loaded", lambda: len(engine.runtimes))
    metrics.gauge("logferry_pipeline_queued_runs",
                  lambda: sum(r.queue.qsize() for r in engine.runtimes.values()))

    def p99() -> float:
        values = sorted(engine.latencies)
        return values[int(len(values) * 0.99)] if values else 0.0

    metrics.gauge("logferry_pipeline_dispatch_latency_p99_seconds", p99)
