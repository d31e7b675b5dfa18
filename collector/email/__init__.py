"""Email: providers with failover, templates, tracking, signed webhooks, suppression.

``setup(app)`` is the feature's entry for the app factory. This module stays
import-light (``collector.config`` imports :mod:`collector.email.config`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web


def setup(app: web.Application) -> None:
    """Routes, and the EmailService under ``app[appkeys.EMAIL]`` while the app runs."""
    from collector.email.routes import setup as setup_routes

    setup_routes(app)
