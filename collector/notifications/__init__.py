"""Notifications: every channel, preferences, quiet hours, digests, dedup,
retries, the users directory and their HTTP API.

``setup(app)`` adds the routes and a ``cleanup_ctx`` that builds the
NotificationService (``app[appkeys.NOTIFIER]``) and the users directory
(``app[appkeys.USERS]``), resumes what a previous run left, runs the
dispatcher, and on shutdown lets sends in flight finish before cancelling
(see :mod:`collector.notifications.lifecycle`). This module stays import-light:
``collector.config`` imports :mod:`collector.notifications.config`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web


def setup(app: web.Application) -> None:
    from collector.notifications.lifecycle import setup as setup_feature

    setup_feature(app)
