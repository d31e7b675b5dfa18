"""The ``digest`` plugin: how batched notifications read when their window closes.

A user whose preference for a type is BATCHED_5MIN, BATCHED_HOURLY or
DAILY_DIGEST gets one message per channel per window, rendered from this
plugin's templates (``collector/notifications/templates/digest.*.j2``):
``digest.subject.j2``, ``digest.text.j2``, ``digest.html.j2`` (email) and
``digest.sms.j2`` (sms, push and other short channels). A channel sender may
render its own digest by defining ``render_digest(items, frequency)``.

The plugin also registers the ``digest_period`` template filter
(``BATCHED_HOURLY`` → ``"the last hour"``) for pipeline and email templates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from collector.notifications.channels.base import DigestItem
from plugins import hookimpl

PERIODS = {
    "BATCHED_5MIN": "the last 5 minutes",
    "BATCHED_HOURLY": "the last hour",
    "DAILY_DIGEST": "today",
}
SHORT_CHANNELS = frozenset({"sms", "push"})


def digest_period(frequency: str) -> str:
    return PERIODS.get(str(frequency).upper(), "")


class TemplateDigestRenderer:
    """Renders a digest from the plugin's Jinja2 templates (HTML autoescaped)."""

    def __init__(self, senders: dict[str, Any] | None = None):
        loader = PackageLoader("collector.notifications", "templates")
        self._html_env = Environment(loader=loader, autoescape=select_autoescape(default=True),
                                     trim_blocks=True, lstrip_blocks=True)
        self._text_env = Environment(loader=loader, autoescape=False, trim_blocks=True,  # noqa: S701 - plain text
                                     lstrip_blocks=True, keep_trailing_newline=False)
        for env in (self._html_env, self._text_env):
            env.filters["digest_period"] = digest_period
        self.senders = senders or {}

    def render(self, *, channel: str, user_id: str, frequency: str,
               items: Sequence[DigestItem]) -> tuple[str, str, str | None]:
        custom: Callable[..., tuple[str, str, str | None]] | None = getattr(
            self.senders.get(channel), "render_digest", None)
        if custom is not None:
            return custom(items=items, frequency=frequency)
        variables = {"items": items, "period": digest_period(frequency), "user_id": user_id,
                     "frequency": frequency}
        subject = self._text_env.get_template("digest.subject.j2").render(**variables).strip()
        if channel in SHORT_CHANNELS:
            text = self._text_env.get_template("digest.sms.j2").render(**variables).strip()
            return subject, text, None
        text = self._text_env.get_template("digest.text.j2").render(**variables).strip()
        html = self._html_env.get_template("digest.html.j2").render(subject=subject, **variables)
        return subject, text, html


@hookimpl
def logferry_register_template_filters(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("digest_period", digest_period)
