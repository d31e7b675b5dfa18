"""The collector feature that hosts plugins: ``setup(app)`` for the app factory.

Builds the plugin manager from the config (built-ins, the ``logferry``
entry-point group, minus ``collector.plugins.block``) and stores it under
``app[appkeys.PLUGINS]``. While the app runs it calls ``logferry_startup`` /
``logferry_shutdown`` and forwards event-bus kinds to the observing hooks
(``log`` → ``logferry_logs_stored``, ``email_event`` → ``logferry_email_event``)
from a background task, so publishers never wait for plugins.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiohttp import web

from collector import appkeys
from collector.events import EMAIL_EVENT, LOG
from plugins.manager import LogferryPluginManager, build_plugin_manager

log = logging.getLogger("logferry.plugins")

#: ``(name, plugin)`` pairs registered in addition to the built-ins and entry
#: points by :func:`setup` in this context: ``plugins.testing`` sets it around
#: ``create_app`` so a test can run the collector with a plugin it defines.
EXTRA_PLUGINS: contextvars.ContextVar[tuple[tuple[str, object], ...]] = contextvars.ContextVar(
    "logferry_extra_plugins", default=())

# Observed batches waiting for the observing hooks; beyond this they are
# dropped (and counted): plugins must never hold back ingest.
OBSERVER_QUEUE_SIZE = 10_000


def setup(app: web.Application, *, entry_points: bool = True,
          extra: Sequence[tuple[str, object]] = ()) -> LogferryPluginManager:
    """Build the manager and hook it into ``app``'s lifecycle.

    Raises ``plugins.manager.PluginLoadError`` naming a broken plugin.
    ``entry_points=False`` and ``extra`` are for tests that want an exact set
    of plugins.
    """
    config = app[appkeys.CONFIG]
    extra = (*EXTRA_PLUGINS.get(), *extra)
    manager = build_plugin_manager(block=config.plugins.block, entry_points=entry_points, extra=extra)
    app[appkeys.PLUGINS] = manager
    for info in manager.plugins():
        log.info("plugin loaded",
                 extra={"plugin": info.name, "builtin": info.builtin, "version": info.version})
    app.cleanup_ctx.append(_plugin_lifecycle)
    return manager


class ObserverBridge:
    """Forwards event-bus batches to observing hooks, off the publisher's path."""

    def __init__(self, manager: LogferryPluginManager):
        self.manager = manager
        self.queue: asyncio.Queue[tuple[str, Sequence[Mapping[str, Any]]]] = asyncio.Queue(
            OBSERVER_QUEUE_SIZE)
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def enqueue(self, kind: str, events: Sequence[Mapping[str, Any]]) -> None:
        try:
            self.queue.put_nowait((kind, events))
        except asyncio.QueueFull:
            self.dropped += len(events)
            log.warning("plugin observers are behind; %d events not observed", len(events))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="plugins:observers")

    async def stop(self) -> None:
        """Deliver what is queued, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout=5)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            kind, events = await self.queue.get()
            try:
                if kind == LOG:
                    await self.manager.notify("logferry_logs_stored", records=list(events))
                elif kind == EMAIL_EVENT:
                    for event in events:
                        await self.manager.notify("logferry_email_event", event=event)
            finally:
                self.queue.task_done()


async def _plugin_lifecycle(app: web.Application) -> AsyncIterator[None]:
    manager: LogferryPluginManager = app[appkeys.PLUGINS]
    await manager.call("logferry_startup", app=app)
    bridge = ObserverBridge(manager)
    unsubscribe = []
    events = app.get(appkeys.EVENTS)
    if events is not None:
        for kind, hook in ((LOG, "logferry_logs_stored"), (EMAIL_EVENT, "logferry_email_event")):
            if manager.has_impls(hook):
                unsubscribe.append(events.subscribe(kind, functools.partial(bridge.enqueue, kind)))
    if unsubscribe:
        bridge.start()
    try:
        yield
    finally:
        for undo in unsubscribe:
            undo()
        await bridge.stop()
        # Every plugin gets its shutdown, even after another one failed.
        await manager.notify("logferry_shutdown", app=app)
