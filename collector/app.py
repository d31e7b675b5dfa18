"""The collector's aiohttp application: the composition root.

``create_app`` wires storage, token checking, ingest and every feature; tests
call it directly. Resources open and close in ``cleanup_ctx`` (one per
resource) and background tasks are cancelled and awaited on shutdown.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from agent.redact import Redactor
from collector import appkeys
from collector.auth import TokenService, parse_networks, usage_flusher
from collector.config import CollectorConfig
from collector.errors import error_middleware, json_error
from collector.events import EventBus
from collector.ingest import LogWriter, RetentionPolicy, handle_ingest
from collector.metrics import Metrics
from collector.schema import migrate
from collector.storage import LOGS_TABLE, Storage, default_journal_dir, is_embedded, open_storage

log = logging.getLogger("logferry.collector")

# Modules whose ``setup(app)`` adds a feature, in this order (services that
# others use come first; pipelines last, since their steps use the services).
FEATURES: tuple[str, ...] = (
    # First: email, notifications and contact read app[PLUGINS] in their setup.
    "plugins.host",
    "collector.logs_api",
    "collector.tokens_api",
    "collector.histogram",
    "collector.tail",
    "collector.erasure",
    "collector.retention",
    "collector.email",
    "collector.notifications",
    "collector.contact",
    # Last: starts after the services its steps use, stops before them.
    "pipelines.service",
)

# Email attachments may total 25 MB, which is about 34 MB as base64 JSON.
MAX_REQUEST_BODY = 40 * 1024 * 1024


async def _storage_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[appkeys.CONFIG]
    owned = appkeys.STORAGE not in app
    if owned:
        loop = asyncio.get_running_loop()
        storage = await loop.run_in_executor(
            None, lambda: open_storage(config.storage.dsn, config.storage.database,
                                       query_timeout=config.storage.query_timeout))
        app[appkeys.STORAGE] = storage
    storage = app[appkeys.STORAGE]
    applied = await storage.run(migrate, storage)
    if applied:
        log.info("schema migrated", extra={"applied": [m.version for m in applied]})
    journaled = False
    if config.storage.journal != "off":
        # After migrations, before anything reads: replays what a crash left.
        folder = config.storage.journal or default_journal_dir(storage.dsn, storage.database)
        tidy = not config.storage.journal and is_embedded(storage.dsn)
        journaled = await asyncio.get_running_loop().run_in_executor(
            None, lambda: storage.attach_journal(folder, flush_interval=float(config.storage.journal_flush_interval),
                                                 remove_when_empty=tidy,
                                                 max_unflushed_rows=config.storage.journal_max_unflushed_rows,
                                                 logs=True, max_unflushed_logs=config.ingest.max_pending_rows))
        metrics = app.get(appkeys.METRICS)
        if journaled and metrics is not None:
            def journal_stat(name: str) -> Callable[[], float]:
                return lambda: float(storage.journal.stats[name]) if storage.journal is not None else 0.0

            for name in ("records", "fsyncs", "flushes", "flush_failures", "replayed_rows", "rejected_rows"):
                metrics.gauge(f"logferry_journal_{name}_total", journal_stat(name))
    yield
    if journaled:
        await asyncio.get_running_loop().run_in_executor(None, storage.detach_journal)
    if owned:
        await asyncio.get_running_loop().run_in_executor(None, storage.close)


async def _tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    service = TokenService(app[appkeys.STORAGE], app[appkeys.CONFIG].secret_key)
    await service.load()
    app[appkeys.TOKENS] = service
    task = asyncio.get_running_loop().create_task(usage_flusher(service), name="token-usage")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    await service.storage.run(service.flush_usage_sync)


async def _writer_ctx(app: web.Application) -> AsyncIterator[None]:
    writer = LogWriter(app[appkeys.STORAGE], app[appkeys.CONFIG].ingest)
    writer.start()
    await writer.preload()
    app[appkeys.LOG_WRITER] = writer
    metrics = app[appkeys.METRICS]
    metrics.gauge("logferry_ingest_pending_rows", lambda: (
        writer.journal.unflushed(LOGS_TABLE) if writer.journal is not None else writer.logs.pending_rows))
    metrics.gauge("logferry_gc_collections_total", lambda: sum(g["collections"] for g in gc.get_stats()))
    metrics.gauge("logferry_gc_frozen_objects", gc.get_freeze_count)
    yield
    await writer.stop()


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    app[appkeys.HTTP] = session
    yield
    await session.close()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if await request.app[appkeys.STORAGE].ping():
        return web.json_response({"status": "ready"})
    return json_error(503, "storage_unavailable", "storage is not reachable")


async def metrics_endpoint(request: web.Request) -> web.Response:
    app = request.app
    if app[appkeys.CONFIG].metrics_require_token:
        from collector.auth import AuthError, bearer, client_ip

        token = bearer(request)
        if token is None:
            raise AuthError(401)
        principal = await app[appkeys.TOKENS].verify(token, client_ip(request, app[appkeys.TRUSTED_PROXIES]))
        if principal.kind != "admin":
            raise AuthError(403, "forbidden")
    return web.Response(text=app[appkeys.METRICS].render(), content_type="text/plain")


def create_app(config: CollectorConfig, *, storage: Storage | None = None) -> web.Application:
    """The collector application. With ``storage`` given (tests), the caller
    owns it; otherwise it is opened from ``config.storage`` and closed on exit."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_REQUEST_BODY)
    app[appkeys.CONFIG] = config
    if storage is not None:
        app[appkeys.STORAGE] = storage
    app[appkeys.EVENTS] = EventBus()
    app[appkeys.METRICS] = Metrics()
    app[appkeys.REDACTOR] = Redactor.from_config(config.redact)
    app[appkeys.RETENTION] = RetentionPolicy(config)
    app[appkeys.TRUSTED_PROXIES] = parse_networks(config.trusted_proxies)
    app.cleanup_ctx.append(_storage_ctx)
    app.cleanup_ctx.append(_http_ctx)
    app.cleanup_ctx.append(_tokens_ctx)
    app.cleanup_ctx.append(_writer_ctx)
    app.router.add_post("/v1/ingest", handle_ingest)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    for name in FEATURES:
        importlib.import_module(name).setup(app)
    return app


#: Young-generation threshold of the serving process (Python's default: 700).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Garbage collection for the serving process, called once it is set up.

    Ingest allocates a few container objects per log (records, rows, tags)
    and keeps many alive for a while (rows waiting in the journal), so with
    Python's defaults the collector spent ~25% of its time collecting: 1.1-1.3
    s per 200k ingested logs, ~1,190 collections of which 9 full ones scanning
    every object since start-up (measured in-process like bench_ingest, 4
    connections). Freezing what start-up made (modules, config, the app) keeps
    it out of every later collection, and a young generation of 50,000
    objects makes collections rare: 0.12-0.17 s in 3-4 collections, none full,
    and ~35% more logs per second. Cyclic garbage still goes, within 50,000
    allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
