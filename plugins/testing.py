"""Fixtures for testing logferry plugins against real logferry parts.

Use them from a plugin's ``conftest.py``::

    pytest_plugins = ["plugins.testing"]

Nothing here is a fake of logferry: ``run_pipeline`` uses the real loader,
match, rules and engine; ``collector_app`` is the real collector app on real
(embedded) ClickHouse; ``http_receiver`` is a real HTTP server. See
docs/plugins.md, "Testing a plugin".
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pipelines.engine import PipelineEngine, RunContext, RunRecord
from pipelines.loader import load_pipeline_text
from pipelines.simulate import clock_for, simulate
from pipelines.templates import Templates
from plugins.manager import LogferryPluginManager, build_plugin_manager

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP, Envelope, Session

TEST_SECRET = "plugin-tests-secret-key-0123456789abcdef"


@pytest.fixture
def logferry_plugins() -> Callable[..., LogferryPluginManager]:
    """``logferry_plugins(*("name", plugin))`` → a loaded manager: the built-ins,
    every installed entry-point plugin, and the given extra plugins."""

    def make(*extra: tuple[str, object], entry_points: bool = True) -> LogferryPluginManager:
        return build_plugin_manager(extra=extra, entry_points=entry_points)

    return make


@pytest.fixture
def step_context() -> Callable[..., RunContext]:
    """``step_context(variables=None, app=None, http=None, dry_run=False)`` → a
    context to call a step's ``run`` or ``describe`` directly."""

    def make(variables: Mapping[str, Any] | None = None, *, app: Any = None, http: Any = None,
             dry_run: bool = False, pipeline: str = "test", step_id: str = "step",
             manager: LogferryPluginManager | None = None) -> RunContext:
        import logging

        filters = (manager or build_plugin_manager()).template_filters()
        run_id = str(uuid.uuid4())
        base: dict[str, Any] = {"event": {}, "events": [], "group": {}, "group_key": "", "count": 1, "suppressed": 0,
                "rule": {"type": "any"}, "steps": {}, "pipeline": pipeline, "run_id": run_id,
                "now": None, "schedule": None}
        base.update(variables or {})
        return RunContext(app=app, http=http, pipeline=pipeline, step_id=step_id, dry_run=dry_run,
                          logger=logging.getLogger(f"logferry.pipelines.{pipeline}"), run_id=run_id,
                          attempt=1, variables=base, templates=Templates(filters))

    return make


@pytest.fixture
async def run_pipeline() -> AsyncIterator[Callable[..., Any]]:
    """``await run_pipeline(yaml_text, events, plugins=(), app=None, dry_run=False)``
    → the RunRecords of running the pipeline over the events, in order.

    Steps run for real (with a shared aiohttp session) unless ``dry_run``; the
    clock follows the events' timestamps. Retries wait no time."""
    sessions: list[aiohttp.ClientSession] = []

    async def no_wait(seconds: float) -> None:
        return None

    async def run(text: str, events: Sequence[Mapping[str, Any]], *, plugins: Iterable[tuple[str, object]] = (),
                  app: Any = None, dry_run: bool = False) -> list[RunRecord]:
        manager = build_plugin_manager(extra=tuple(plugins))
        templates = Templates(manager.template_filters())
        pipeline = load_pipeline_text(text, manager.steps(), templates, file="<test pipeline>")
        if app is not None:
            from collector import appkeys

            http = app.get(appkeys.HTTP)
        else:
            http = aiohttp.ClientSession()
            sessions.append(http)
        clock = clock_for(pipeline, events)
        engine = PipelineEngine(templates=templates, app=app, http=http, dry_run=dry_run, clock=clock,
                                sleep=no_wait)
        engine.set_pipelines([pipeline])
        return await simulate(engine, pipeline, list(events), clock=clock)

    yield run
    for session in sessions:
        await session.close()


class Receiver:
    """A real HTTP server on 127.0.0.1 that records what it receives."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._responses: list[tuple[int, Any, dict[str, str]]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""
        #: While set to an unset asyncio.Event, requests wait for it before
        #: being answered (a slow or hanging target).
        self.gate: asyncio.Event | None = None
        self.arrived = asyncio.Event()

    def respond(self, status: int, body: Any = None, headers: Mapping[str, str] | None = None,
                times: int = 1) -> None:
        """Answer the next ``times`` requests so (then 200 again)."""
        self._responses.extend([(status, body, dict(headers or {}))] * times)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append({"method": request.method, "path": request.path_qs,
                              "headers": dict(request.headers), "body": raw})
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self._responses:
            status, body, headers = self._responses.pop(0)
        else:
            status, body, headers = 200, {"ok": True}, {}
        if isinstance(body, str | bytes) or body is None:
            return web.Response(status=status, body=body, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def wait_for(self, count: int, within: float = 5.0) -> list[dict[str, Any]]:
        """Wait until ``count`` requests have arrived; return them."""
        async with asyncio.timeout(within):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.requests

    def json(self, index: int = -1) -> Any:
        import orjson

        return orjson.loads(self.requests[index]["body"])

    async def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def http_receiver() -> AsyncIterator[Callable[[], Any]]:
    """``await http_receiver()`` → a started :class:`Receiver` (closed after the test)."""
    made: list[Receiver] = []

    async def make() -> Receiver:
        receiver = await Receiver().start()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        await receiver.close()


async def ship_logs(client: TestClient[Any, Any], *records: Mapping[str, Any]) -> int:
    """POST records to the collector's ``/v1/ingest`` as an agent would (with an
    ingest token minted for this app); fills ``timestamp`` (now), ``level``
    (ERROR) and ``source`` (test) when absent. Returns how many were accepted."""
    import datetime as dt

    import orjson

    from collector import appkeys

    tokens = client.app[appkeys.TOKENS]
    _, token = await tokens.storage.run(
        lambda: tokens.create_sync(kind="ingest", name="plugin-tests", created_by="plugins.testing"))
    await tokens.load()
    now = dt.datetime.now(dt.UTC).isoformat()
    body = b"\n".join(orjson.dumps({"timestamp": now, "level": "ERROR", "source": "test", **r}) for r in records)
    response = await client.post("/v1/ingest", data=body, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"})
    assert response.status == 200, await response.text()
    return int((await response.json())["accepted"])


class DatabasePool:
    """Migrated databases reused across tests: creating one costs 0.4–1 s of
    DDL in chDB, emptying one with TRUNCATE about 6 ms (measured). A database
    is handed to one test at a time and emptied before the next gets it."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._free: list[str] = []

    def acquire(self) -> Any:
        from collector.schema import migrate
        from collector.storage import Storage

        if self._free:
            return Storage(self.dsn, self._free.pop())
        store = Storage(self.dsn, f"t_{uuid.uuid4().hex[:12]}")
        migrate(store)
        return store

    def release(self, store: Any) -> None:
        try:
            tables = [r["name"] for r in store.query_sync("SHOW TABLES")]
            for table in tables:
                if table != "schema_migrations":
                    store.command_sync(f"TRUNCATE TABLE `{table}`")
        except Exception:
            store.command_sync(f"DROP DATABASE IF EXISTS `{store.database}`")
        else:
            self._free.append(store.database)
        finally:
            store.close()


@pytest.fixture(scope="session")
def database_pool(chdb_dsn: str) -> DatabasePool:
    """The session's pool of migrated databases (see :class:`DatabasePool`)."""
    return DatabasePool(chdb_dsn)


@pytest.fixture(scope="session")
def chdb_dsn() -> Iterator[str]:
    """One embedded ClickHouse folder for the test session (chDB allows one
    per process). A project's own ``chdb_dsn`` fixture takes precedence."""
    with tempfile.TemporaryDirectory(prefix="logferry-plugin-tests-") as path:
        yield f"chdb://{path}"


@pytest.fixture
async def collector_app(chdb_dsn: str, database_pool: DatabasePool, tmp_path: Path,
                        ) -> AsyncIterator[Callable[..., Any]]:
    """``await collector_app(pipelines=[yaml_text, …], plugins=(), config={})`` →
    an aiohttp TestClient over the real collector app, on a database of this
    test's own, with the installed plugins, ``plugins`` (``(name, plugin)``
    pairs) and the given pipelines. ``client.app`` reaches every service."""
    from agent.configfile import convert
    from collector import appkeys
    from collector.app import create_app
    from collector.config import CollectorConfig
    from collector.schema import migrate
    from collector.storage import Storage
    from pipelines.service import PIPELINES
    from pipelines.service import setup as setup_pipelines
    from plugins.host import EXTRA_PLUGINS
    from plugins.host import setup as setup_plugins

    clients: list[TestClient[Any, Any]] = []
    stores: list[Storage] = []

    async def make(pipelines: Sequence[str] = (), *, plugins: Iterable[tuple[str, object]] = (),
                   config: Mapping[str, Any] | None = None, database: str | None = None) -> TestClient[Any, Any]:
        folder = tmp_path / f"pipelines-{len(clients)}"
        folder.mkdir()
        for i, text in enumerate(pipelines):
            (folder / f"pipeline-{i}.yaml").write_text(text)
        data: dict[str, Any] = {
            "secret_key": TEST_SECRET, "listen": "127.0.0.1:8080",
            "storage": {"dsn": chdb_dsn, "database": "unused"},
            "pipelines": [str(folder / "*.yaml")],
        }
        data.update(config or {})
        collector_config = convert(data, CollectorConfig)
        if database is None:
            store = database_pool.acquire()
            stores.append(store)
        elif any(s.database == database for s in stores):
            store = next(s for s in stores if s.database == database)
        else:
            store = Storage(chdb_dsn, database)
            migrate(store)
            stores.append(store)
        token = EXTRA_PLUGINS.set(tuple(plugins))
        try:
            app = create_app(collector_config, storage=store)
            # Collectors whose app factory does not list the plugin and pipeline
            # features yet still get them (in the documented order).
            if appkeys.PLUGINS not in app:
                setup_plugins(app)
            if PIPELINES not in app:
                setup_pipelines(app)
        finally:
            EXTRA_PLUGINS.reset(token)
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        try:
            await client.start_server()
        except BaseException:
            # Start-up failed part-way: close what did start (sessions, writers).
            await client.close()
            raise
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
    for store in stores:
        database_pool.release(store)


class SmtpHandler:
    """What a real SMTP server (aiosmtpd) received, with refusals on demand."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, EmailMessage]] = []
        self.refuse: set[str] = set()
        self.defer: set[str] = set()
        # Answer DATA with this (e.g. "451 try later") instead of accepting.
        self.data_reply: str | None = None

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such mailbox"
        if address in self.defer:
            return "450 4.2.0 mailbox busy"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply is not None:
            return self.data_reply
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        parsed = message_from_bytes(raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append((envelope, parsed))
        return "250 2.0.0 Message accepted"


class SmtpServer:
    """A running SMTP server on 127.0.0.1 and what it received."""

    def __init__(self, handler: SmtpHandler, port: int):
        self.handler = handler
        self.port = port
        self.host = "127.0.0.1"

    @property
    def messages(self) -> list[tuple[Envelope, EmailMessage]]:
        return self.handler.messages

    def to(self, address: str) -> list[EmailMessage]:
        """The messages delivered to one recipient."""
        return [m for env, m in self.messages if address in env.rcpt_tos]

    def provider(self, **extra: Any) -> dict[str, Any]:
        """A ``collector.email.providers`` entry that sends here."""
        return {"type": "smtp", "host": self.host, "port": self.port, "starttls": "off", "timeout": "5s",
                "deadline": "10s", **extra}


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd, a dev dependency) on a free 127.0.0.1 port."""
    from aiosmtpd.controller import Controller

    handler = SmtpHandler()
    with socket.socket() as probe:  # aiosmtpd cannot take port 0
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    # 25 MB of attachments is about 34 MB as base64: above aiosmtpd's 32 MiB default.
    controller = Controller(handler, hostname="127.0.0.1", port=port, data_size_limit=64 * 1024 * 1024)
    controller.start()
    try:
        yield SmtpServer(handler, port)
    finally:
        controller.stop()
