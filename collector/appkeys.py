"""Typed application state (aiohttp ``AppKey``\\ s): no module-level singletons.

Each feature adds the keys of the services it owns here, one line each.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from collector.config import CollectorConfig
from collector.events import EventBus
from collector.storage import Storage

if TYPE_CHECKING:
    from agent.redact import Redactor
    from collector.auth import TokenService
    from collector.contact.intake import ContactService
    from collector.email.service import EmailService
    from collector.erasure import UserEraser
    from collector.ingest import LogWriter, RetentionPolicy
    from collector.logs_api import WindowMemory
    from collector.metrics import Metrics
    from collector.notifications.service import NotificationService
    from collector.notifications.users import UsersDirectory
    from collector.tail import TailHub

CONFIG = web.AppKey("config", CollectorConfig)
STORAGE = web.AppKey("storage", Storage)
EVENTS = web.AppKey("events", EventBus)
TOKENS: web.AppKey[TokenService] = web.AppKey("tokens")
LOG_WRITER: web.AppKey[LogWriter] = web.AppKey("log_writer")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
HTTP = web.AppKey("http", aiohttp.ClientSession)
REDACTOR: web.AppKey[Redactor] = web.AppKey("redactor")
RETENTION: web.AppKey[RetentionPolicy] = web.AppKey("retention")
TRUSTED_PROXIES: web.AppKey[Sequence[IPv4Network | IPv6Network]] = web.AppKey("trusted_proxies")
# The pluggy manager (plugins.manager.LogferryPluginManager), set by the pipelines/plugins feature.
PLUGINS: web.AppKey[Any] = web.AppKey("plugins")
EMAIL: web.AppKey[EmailService] = web.AppKey("email")
NOTIFIER: web.AppKey[NotificationService] = web.AppKey("notifier")
USERS: web.AppKey[UsersDirectory] = web.AppKey("users")
CONTACT: web.AppKey[ContactService] = web.AppKey("contact")
TAIL_HUB: web.AppKey[TailHub] = web.AppKey("tail_hub")
ERASER: web.AppKey[UserEraser] = web.AppKey("eraser")
WINDOW_MEMORY: web.AppKey[WindowMemory] = web.AppKey("window_memory")
