"""The notification feature's lifecycle: build the service and the users
directory when the app starts, resume, dispatch, and stop cleanly.

Tests may set ``app[CLOCK]`` (a callable returning an aware UTC datetime) and
``app[HOT_STATE]`` before the app starts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from agent.configfile import ConfigError, ConfigInvalid, convert
from collector import appkeys
from collector.notifications.config import NotificationsConfig

log = logging.getLogger("logferry.notifications")

#: The built-in plugins of this feature (also listed in plugins.manager.DEFAULT_PLUGINS).
BUILTIN_PLUGINS = (
    "collector.notifications.channels.email",
    "collector.notifications.channels.sms",
    "collector.notifications.channels.push",
    "collector.notifications.channels.in_app",
    "collector.notifications.channels.notify",
    "collector.notifications.channels.digest",
)

CLOCK: web.AppKey[Callable[[], dt.datetime]] = web.AppKey("notifications_clock")
HOT_STATE: web.AppKey[Any] = web.AppKey("notifications_hot_state")


def _manager(app: web.Application) -> Any:
    manager = app.get(appkeys.PLUGINS)
    if manager is None:
        from plugins.manager import build_plugin_manager

        manager = build_plugin_manager(entry_points=False, default_plugins=BUILTIN_PLUGINS)
    return manager


def channel_options(config: NotificationsConfig, registry: Mapping[str, Any],
                    base_path: str = "collector.notifications.channels") -> dict[str, Any]:
    """Each usable channel's validated ``Options``.

    A channel listed in ``config.channels`` must validate (errors name the
    YAML path); one not listed is enabled when its Options need nothing
    (``email``, ``in_app``). ``enabled: false`` turns a channel off. Raises
    ``ConfigInvalid`` with every error.
    """
    errors: list[ConfigError] = []
    found: dict[str, Any] = {}
    for name in config.channels:
        if name not in registry:
            errors.append(ConfigError(f"{base_path}.{name}",
                                      f"no channel plugin named {name!r} (registered: {', '.join(sorted(registry))})"))
    for name, channel in registry.items():
        raw = config.channels.get(name)
        if not CHANNEL_NAME.match(name):
            # Stored as a delivery's channel: a plugin with an unusable name stays off.
            if raw is not None:
                errors.append(ConfigError(f"{base_path}.{name}", f"channel plugin name {name!r} must be 1–31 "
                                          "lowercase letters, digits and '_', starting with a letter"))
            continue
        if raw is None:
            try:
                found[name] = convert({}, channel.Options, base_path=f"{base_path}.{name}")
            except ConfigInvalid:
                continue  # needs settings it was not given: not configured
            continue
        raw = dict(raw or {})
        enabled = raw.pop("enabled", True)
        if enabled is False:
            continue
        try:
            found[name] = convert(raw, channel.Options, base_path=f"{base_path}.{name}")
        except ConfigInvalid as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigInvalid(errors)
    return found


def _on_erasure(app: web.Application, callback: Callable[[str], None]) -> Callable[[], None]:
    try:
        from collector.erasure import on_erasure
    except ImportError:  # a collector without the erasure feature
        return lambda: None
    return on_erasure(app, callback)


CHANNEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


async def _make_storable(storage: Any, channels: Mapping[str, Any]) -> None:
    """Let ``notification_deliveries.channel`` hold every configured channel.

    Migration 1 declares it an Enum8 of the built-in channels (it is a key
    column, so it cannot become a String); adding Enum values is a metadata
    change ClickHouse allows, so a plugin's channel gets its value here."""
    rows = await storage.query(
        "SELECT type FROM system.columns WHERE database = currentDatabase() "
        "AND table = 'notification_deliveries' AND name = 'channel'")
    kind = rows[0]["type"] if rows else ""
    if not kind.startswith("Enum8("):
        return
    values = {name: int(number) for name, number in re.findall(r"'([^']+)' = (-?\d+)", kind)}
    missing = [name.upper() for name in channels if name.upper() not in values]
    if not missing:
        return
    for name in missing:
        values[name] = max(values.values(), default=0) + 1
    if max(values.values()) > 127:
        raise ConfigInvalid([ConfigError("collector.notifications.channels", "too many channel plugins (127 at most)")])
    enum = ", ".join(f"'{name}' = {number}" for name, number in sorted(values.items(), key=lambda kv: kv[1]))
    await storage.command(f"ALTER TABLE notification_deliveries MODIFY COLUMN channel Enum8({enum})")
    log.info("delivery channels added", extra={"channels": missing})


async def _notifications_ctx(app: web.Application) -> AsyncIterator[None]:
    from collector.events import NOTIFICATION_EVENT
    from collector.notifications.channels.base import ChannelContext
    from collector.notifications.channels.digest import TemplateDigestRenderer
    from collector.notifications.hotstate import MemoryHotState
    from collector.notifications.repository import NotificationRepository
    from collector.notifications.routes import CHANNEL_OPTIONS
    from collector.notifications.service import NotificationService, system_clock
    from collector.notifications.users import UsersDirectory
    from collector.pii import PiiCipher

    config = app[appkeys.CONFIG]
    settings = config.notifications
    storage = app[appkeys.STORAGE]
    clock = app.get(CLOCK, system_clock)
    hot = app.get(HOT_STATE) or MemoryHotState()
    manager = _manager(app)

    resolve_hook = None
    if manager.has_impls("logferry_resolve_user_address"):
        async def resolve_hook(user_id: str, channel: str) -> Any:
            return await manager.first("logferry_resolve_user_address", user_id=user_id, channel=channel)

    users = UsersDirectory(storage, PiiCipher(config.secret_key), hot, clock=clock,
                           cache_ttl=float(settings.cache_ttl), resolve_hook=resolve_hook)
    app[appkeys.USERS] = users
    own_session: list[aiohttp.ClientSession] = []

    def http() -> aiohttp.ClientSession:
        session = app.get(appkeys.HTTP)
        if session is not None:
            return session
        if not own_session:
            own_session.append(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))
        return own_session[0]

    registry = {name: entry.obj for name, entry in manager.channels().items()}
    options = channel_options(settings, registry)
    await _make_storable(storage, options)
    context = ChannelContext(app=app, http=http, users=users, clock=clock, public_url=config.public_url,
                             logger=logging.getLogger("logferry.notifications.channels"))
    senders = {name: registry[name].create(opts, context) for name, opts in options.items()}
    app[CHANNEL_OPTIONS] = options
    events = app.get(appkeys.EVENTS)

    def on_event(kind: str, event: Mapping[str, Any]) -> None:
        if events is not None:
            events.publish(NOTIFICATION_EVENT, [event])

    async def on_sent(notification: Mapping[str, Any], delivery: Mapping[str, Any]) -> None:
        await manager.notify("logferry_notification_sent", notification=notification, delivery=delivery)

    service = NotificationService(
        repository=NotificationRepository(storage), hot=hot, users=users, senders=senders, config=settings,
        renderer=TemplateDigestRenderer(senders), clock=clock, on_event=on_event,
        on_sent=on_sent if manager.has_impls("logferry_notification_sent") else None,
    )
    app[appkeys.NOTIFIER] = service
    forgetting: set[asyncio.Task[None]] = set()

    def erased(user_id: str) -> None:
        # Event-bus callbacks only enqueue: the forgetting runs as a task.
        task = asyncio.get_running_loop().create_task(service.forget_user(user_id))
        forgetting.add(task)
        task.add_done_callback(forgetting.discard)

    stop_listening = _on_erasure(app, erased)
    await service.recover()
    service.start()
    metrics = app.get(appkeys.METRICS)
    if metrics is not None:
        def stat(name: str) -> Callable[[], float]:
            return lambda: float(service.stats[name])

        for name in service.stats:
            metrics.gauge(f"logferry_notifications_{name}_total", stat(name))
        metrics.gauge("logferry_notifications_in_flight", lambda: float(service.in_flight))
    log.info("notifications ready", extra={"channels": sorted(senders)})
    try:
        yield
    finally:
        stop_listening()
        if forgetting:
            await asyncio.wait(forgetting)
        await service.stop()
        for session in own_session:
            await session.close()


def setup(app: web.Application) -> None:
    from collector.notifications.routes import add_routes

    app.cleanup_ctx.append(_notifications_ctx)
    add_routes(app)
