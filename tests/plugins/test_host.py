"""The plugin host inside the real collector: lifecycle hooks, observers fed
from the event bus off the ingest path, and a broken plugin stopping start-up."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import pytest

from collector import appkeys
from plugins import hookimpl
from plugins.manager import PluginLoadError


class Recording:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.stored = asyncio.Event()
        self.release = asyncio.Event()

    @hookimpl
    async def logferry_startup(self, app: Any) -> None:
        self.calls.append(("startup", appkeys.STORAGE in app))

    @hookimpl
    def logferry_shutdown(self, app: Any) -> None:
        self.calls.append(("shutdown", None))

    @hookimpl
    async def logferry_logs_stored(self, records: list[Mapping[str, Any]]) -> None:
        self.calls.append(("logs", [(r["message"], r["timestamp"].tzinfo is not None) for r in records]))
        self.stored.set()
        await self.release.wait()  # a slow observer: ingest must not care

    @hookimpl
    def logferry_email_event(self, event: Mapping[str, Any]) -> None:
        self.calls.append(("email", event["type"]))


async def test_lifecycle_and_observer_hooks_run_off_the_ingest_path(collector_app: Callable[..., Any]) -> None:
    plugin = Recording()
    client = await collector_app(plugins=[("recording", plugin)])
    assert plugin.calls == [("startup", True)]
    tokens = client.app[appkeys.TOKENS]
    _, token = await tokens.storage.run(lambda: tokens.create_sync(kind="ingest", name="t", created_by="t"))
    await tokens.load()
    body = orjson.dumps({"timestamp": dt.datetime.now(dt.UTC).isoformat(), "level": "INFO", "source": "web",
                         "message": "hello"})
    for _ in range(2):  # the second is answered although the observer still holds the first
        response = await client.post("/v1/ingest", data=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"})
        assert response.status == 200
    await asyncio.wait_for(plugin.stored.wait(), 5)
    client.app[appkeys.EVENTS].publish("email_event", [{"type": "delivered", "email_id": "e1"}])
    plugin.release.set()
    await client.close()
    assert plugin.calls == [("startup", True), ("logs", [("hello", True)]), ("logs", [("hello", True)]),
                            ("email", "delivered"), ("shutdown", None)]


async def test_a_broken_plugin_stops_the_collector_from_starting(collector_app: Callable[..., Any]) -> None:
    class Broken:
        @hookimpl
        def logferry_register_channels(self, register: Any) -> None:
            register(object())

    with pytest.raises(PluginLoadError) as info:
        await collector_app(plugins=[("broken-channel", Broken())])
    assert str(info.value).startswith("plugin 'broken-channel': registered channel <object object")
    assert "lacks name, Options, create" in str(info.value)


async def test_a_startup_hook_that_fails_stops_start_up(collector_app: Callable[..., Any]) -> None:
    class NoDatabase:
        @hookimpl
        async def logferry_startup(self, app: Any) -> None:
            raise RuntimeError("cannot reach the CRM")

    with pytest.raises(RuntimeError, match="cannot reach the CRM"):
        await collector_app(plugins=[("crm", NoDatabase())])
