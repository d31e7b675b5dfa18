"""The notification state machine, input validation and retry backoff."""

from __future__ import annotations

import datetime as dt
import itertools

import msgspec
import pytest

from collector.notifications.model import (
    DELIVERY_TRANSITIONS,
    CreateNotification,
    Delivery,
    DeliveryStatus,
    InvalidTransition,
    Notification,
    Priority,
    Status,
    check_delivery_transition,
    check_transition,
)
from collector.notifications.service import backoff_delay

ALLOWED = {
    (Status.PENDING, Status.QUEUED), (Status.QUEUED, Status.SENT), (Status.PENDING, Status.CANCELLED),
    (Status.QUEUED, Status.FAILED), (Status.FAILED, Status.QUEUED),
}


def request(**overrides: object) -> CreateNotification:
    fields: dict[str, object] = {"user_id": "u1", "type": "alerts", "title": "Disk full", "message": "db1 at 99%",
                                 "channels": ["email"]}
    fields.update(overrides)
    return msgspec.convert(fields, CreateNotification)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(Status, Status)))
def test_only_the_specs_transitions_are_allowed(current: Status, target: Status) -> None:
    if (current, target) in ALLOWED:
        check_transition(current, target)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(current, target)


def test_retry_cycle_failed_back_to_queued_then_sent() -> None:
    n = Notification(id="n", user_id="u", type="t", priority=Priority.LOW, title="t", message="m", data=None,
                     channels=["email"], created_at=dt.datetime.now(dt.UTC))
    for target in (Status.QUEUED, Status.FAILED, Status.QUEUED, Status.SENT):
        n.transition(target)
    assert n.status is Status.SENT
    with pytest.raises(InvalidTransition, match="SENT to QUEUED"):
        n.transition(Status.QUEUED)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(DeliveryStatus, DeliveryStatus)))
def test_delivery_status_only_moves_forward(current: DeliveryStatus, target: DeliveryStatus) -> None:
    order = [DeliveryStatus.PENDING, DeliveryStatus.SENT, DeliveryStatus.DELIVERED]
    if target in DELIVERY_TRANSITIONS[current]:
        check_delivery_transition(current, target)
        assert target is DeliveryStatus.FAILED or order.index(target) == order.index(current) + 1
    else:
        with pytest.raises(InvalidTransition):
            check_delivery_transition(current, target)


def test_delivery_transition_stamps_its_time() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    d = Delivery(id="d", notification_id="n", channel="sms", user_id="u", created_at=now)
    d.transition(DeliveryStatus.SENT, now)
    d.transition(DeliveryStatus.DELIVERED, now + dt.timedelta(seconds=5))
    assert (d.sent_at, d.delivered_at) == (now, now + dt.timedelta(seconds=5))
    with pytest.raises(InvalidTransition):
        d.transition(DeliveryStatus.FAILED, now)


def test_channels_are_normalised_and_deduplicated() -> None:
    assert request(channels=["In-App", "EMAIL", "in_app"]).channels == ["in_app", "email"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"channels": []}, "at least one valid channel"),
    ({"priority": "URGENT"}, "priority must be one of LOW, MEDIUM, HIGH, CRITICAL"),
    ({"title": "x" * 201}, "title must be at most 200 characters"),
    ({"title": "  "}, "title must not be empty"),
    ({"message": "x" * (10 * 1024 + 1)}, "message must be at most 10240 bytes"),
    ({"data": {"blob": "x" * 20_000}}, "data must be at most 16384 bytes"),
    ({"type": "has space"}, "type must be"),
    ({"user_id": ""}, "user_id must be"),
    ({"dedup_key": "k" * 201}, "dedup_key must be 1–200"),
    ({"scheduled_for": "2026-01-01T09:00:00"}, "scheduled_for must carry a timezone"),
])
def test_invalid_input_names_the_field_and_the_limit(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        request(**overrides)


def test_priority_is_case_insensitive_and_ordered() -> None:
    assert request(priority="critical").priority_level is Priority.CRITICAL
    assert Priority.CRITICAL > Priority.HIGH > Priority.MEDIUM > Priority.LOW


def test_backoff_doubles_up_to_the_cap_within_the_jitter() -> None:
    delays = [backoff_delay(a, base=2, cap=60, jitter=0, rng=lambda: 0.5) for a in range(1, 8)]
    assert delays == [2, 4, 8, 16, 32, 60, 60]
    spread = [backoff_delay(3, base=2, cap=60, jitter=0.2, rng=lambda r=r: r) for r in (0.0, 1.0)]
    assert spread == [pytest.approx(6.4), pytest.approx(9.6)]
