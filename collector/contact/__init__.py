"""Contact forms: public intake with spam scoring, the hosted form page, and
the admin triage API with email responses.

``setup(app)`` adds the routes and, while the app runs, the
:class:`~collector.contact.intake.ContactService` under ``app[appkeys.CONTACT]``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

# Nothing from the rest of the collector at import time: collector.config
# imports this package (for ContactConfig) while it is itself being imported.
log = logging.getLogger("logferry.collector.contact")


def setup(app: web.Application) -> None:
    from collector import appkeys
    from collector.contact.routes import add_routes

    add_routes(app, app[appkeys.CONFIG].contact)
    app.cleanup_ctx.append(_contact_ctx)


async def _contact_ctx(app: web.Application) -> AsyncIterator[None]:
    from collector import appkeys
    from collector.contact.intake import ContactService
    from plugins.manager import build_plugin_manager

    config = app[appkeys.CONFIG]
    manager = app.get(appkeys.PLUGINS)
    if manager is None:
        # The plugin host feature is not set up: load the same plugins it would.
        manager = build_plugin_manager(block=config.plugins.block)
    classifiers = [(name, entry.obj) for name, entry in manager.spam_classifiers().items()]
    service = ContactService(
        app[appkeys.STORAGE], config.contact, secret_key=config.secret_key, events=app[appkeys.EVENTS],
        classifiers=classifiers, app=app, http=app.get(appkeys.HTTP), email=lambda: app.get(appkeys.EMAIL),
        public_url=config.public_url, metrics=app.get(appkeys.METRICS),
    )
    rebuilt = await service.warm_up()
    log.info("contact forms ready", extra={"classifiers": [n for n, _ in service.classifiers],
                                           "recent_submissions": rebuilt})
    app[appkeys.CONTACT] = service
    yield
