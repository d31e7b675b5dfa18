"""A small in-process publish/subscribe between the collector's parts.

Publishers (ingest, contact forms, email webhooks, notifications) never wait
for subscribers: a subscriber's callback must only enqueue (pipelines run off
the ingest path). A failing subscriber is logged and counted, never raised
into the publisher.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger("logferry.collector.events")

Subscriber = Callable[[Sequence[Mapping[str, Any]]], None]

# Event kinds, matching pipeline triggers (`on:`).
LOG = "log"
CONTACT_FORM = "contact_form"
EMAIL_EVENT = "email_event"
NOTIFICATION_EVENT = "notification_event"


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, list[Subscriber]] = defaultdict(list)
        self._wants: dict[Subscriber, Callable[[], bool]] = {}
        self.failures = 0

    def subscribe(self, kind: str, callback: Subscriber, *,
                  wants: Callable[[], bool] | None = None) -> Callable[[], None]:
        """Call ``callback(events)`` for every publish of ``kind``; returns an
        unsubscribe function. ``wants()``, when given, says whether the
        subscriber currently takes ``kind`` at all (pipelines without a
        trigger on it): when no subscriber wants a kind, publishers skip
        building its events (:meth:`has_subscribers`)."""
        self._subscribers[kind].append(callback)
        if wants is not None:
            self._wants[callback] = wants

        def unsubscribe() -> None:
            if callback in self._subscribers[kind]:
                self._subscribers[kind].remove(callback)
            self._wants.pop(callback, None)

        return unsubscribe

    def _wanted(self, callback: Subscriber) -> bool:
        wants = self._wants.get(callback)
        return wants is None or wants()

    def publish(self, kind: str, events: Sequence[Mapping[str, Any]]) -> None:
        if not events:
            return
        for callback in list(self._subscribers.get(kind, ())):
            try:
                if self._wanted(callback):
                    callback(events)
            except Exception:
                self.failures += 1
                log.exception("event subscriber failed", extra={"kind": kind})

    def has_subscribers(self, kind: str) -> bool:
        """Whether a publish of ``kind`` would reach anyone (build its events only then)."""
        return any(self._wanted(callback) for callback in self._subscribers.get(kind, ()))
