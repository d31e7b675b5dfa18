"""Plugin tests use the same fixtures plugin authors get from ``plugins.testing``."""

from __future__ import annotations

from plugins.testing import collector_app, http_receiver, logferry_plugins, run_pipeline, step_context

__all__ = ["collector_app", "http_receiver", "logferry_plugins", "run_pipeline", "step_context"]
