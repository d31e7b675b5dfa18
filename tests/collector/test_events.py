"""The in-process event bus: publishers build events only for subscribers that want them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from collector.events import LOG, EventBus


def test_a_subscriber_that_does_not_want_a_kind_is_skipped_and_publishers_can_tell() -> None:
    bus = EventBus()
    got: list[Sequence[Mapping[str, Any]]] = []
    wanted = {"now": False}
    unsubscribe = bus.subscribe(LOG, got.append, wants=lambda: wanted["now"])
    assert not bus.has_subscribers(LOG)
    bus.publish(LOG, [{"message": "a"}])
    assert got == []
    wanted["now"] = True  # a pipeline with `on: log` was loaded
    assert bus.has_subscribers(LOG)
    bus.publish(LOG, [{"message": "b"}])
    assert got == [[{"message": "b"}]]
    unsubscribe()
    assert not bus.has_subscribers(LOG)


def test_a_plain_subscriber_always_counts_and_a_failing_one_never_reaches_the_publisher() -> None:
    bus = EventBus()
    got: list[Sequence[Mapping[str, Any]]] = []

    def broken(events: Sequence[Mapping[str, Any]]) -> None:
        raise RuntimeError("boom")

    bus.subscribe(LOG, broken)
    bus.subscribe(LOG, got.append)
    assert bus.has_subscribers(LOG)
    bus.publish(LOG, [{"message": "x"}])
    assert got == [[{"message": "x"}]]
    assert bus.failures == 1
