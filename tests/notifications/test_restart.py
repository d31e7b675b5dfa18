"""Durability: stop the collector, start a new one on the same database;
waiting notifications resume and nothing is sent twice."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from collector import appkeys
from collector.config import CollectorConfig
from collector.email.message import SendEmail
from collector.notifications.model import Delivery, Notification, Priority, Status
from collector.notifications.repository import NotificationRepository
from tests.notifications.conftest import Collector, FakeTwilio, ManualClock, SmtpSink, notification_config
from tests.notifications.test_api import Env


@pytest.fixture
async def restart_env(make_config: Callable[..., CollectorConfig], collector_factory: Callable[..., Collector],
                      tokens: Any, smtp: tuple[SmtpSink, int], twilio: tuple[FakeTwilio, str]) -> Env:
    sink, port = smtp
    collector = collector_factory(notification_config(make_config, smtp_port=port, twilio_url=twilio[1]))
    env = Env(collector, tokens, sink)
    await collector.start()
    await env.put_user("ann", email="ann@example.com", phone="+15550103000")
    return env


async def test_a_deferred_notification_survives_a_restart_and_is_sent_once(
        restart_env: Env, clock: ManualClock) -> None:
    env = restart_env
    now = clock()
    await env.set_preference("ann", "alerts", channels={"email": True}, quiet_hours={
        "start": (now - dt.timedelta(hours=1)).strftime("%H:%M"),
        "end": (now + dt.timedelta(hours=1)).strftime("%H:%M"), "timezone": "UTC"})
    n = await env.notify(user_id="ann", channels=["email"])
    await env.collector.restart()
    await env.drain()
    assert (await env.get(n["id"]))["status"] == "PENDING"
    clock.advance(hours=1)
    await env.drain()
    await env.collector.restart()
    clock.advance(hours=1)
    await env.drain()
    assert (await env.get(n["id"]))["status"] == "SENT"
    assert len(env.smtp.to("ann@example.com")) == 1


async def test_a_digest_window_interrupted_by_a_restart_loses_and_repeats_nothing(
        restart_env: Env, clock: ManualClock) -> None:
    env = restart_env
    clock.set(clock().replace(minute=1, second=0))
    await env.set_preference("ann", "alerts", channels={"email": True}, frequency="BATCHED_HOURLY")
    before = [await env.notify(user_id="ann", title=f"before {i}") for i in range(2)]
    await env.collector.restart()
    clock.advance(minutes=30)
    after = await env.notify(user_id="ann", title="after")
    await env.drain()
    assert env.smtp.to("ann@example.com") == []
    clock.advance(minutes=30)
    await env.drain()
    await env.collector.restart()
    await env.drain()
    mails = env.smtp.to("ann@example.com")
    assert len(mails) == 1 and mails[0]["Subject"] == "3 new notifications (the last hour)"
    assert {(await env.get(n["id"]))["status"] for n in [*before, after]} == {"SENT"}


async def test_a_planned_retry_survives_a_restart(restart_env: Env, twilio: tuple[FakeTwilio, str],
                                                  clock: ManualClock) -> None:
    env, fake = restart_env, twilio[0]
    fake.fail_next = 1
    n = await env.notify(user_id="ann", priority="CRITICAL", channels=["sms"])
    await env.drain()
    assert (await env.get(n["id"]))["status"] == "FAILED"
    await env.collector.restart()
    clock.advance(seconds=2)
    await env.drain()
    got = await env.get(n["id"])
    assert got["status"] == "SENT" and got["delivery_attempts"] == 2 and len(fake.messages) == 1


async def test_the_dedup_window_survives_a_restart(restart_env: Env, clock: ManualClock) -> None:
    env = restart_env
    first = await env.notify(user_id="ann", dedup_key="disk")
    await env.collector.restart()
    clock.advance(minutes=2)
    again = await env.notify(expect=200, user_id="ann", dedup_key="disk")
    assert again["id"] == first["id"] and again["deduplicated"] is True


async def test_a_send_cut_short_by_a_crash_is_never_sent_twice(
        restart_env: Env, twilio: tuple[FakeTwilio, str], clock: ManualClock) -> None:
    """What a collector killed mid-send leaves: a QUEUED notification whose email
    went out (the email service stored it under the delivery's key) and whose
    SMS outcome is unknown."""
    env, fake = restart_env, twilio[0]
    notification_id = str(uuid.uuid4())
    sent = await env.collector.app[appkeys.EMAIL].send(
        SendEmail(to=["ann@example.com"], subject="Half sent", text_body="m"),
        notification_id=notification_id, idempotency_key=f"notification:{notification_id}:email")
    await env.collector.stop()
    repo = NotificationRepository(env.collector.storage)
    now = clock()
    n = Notification(id=notification_id, user_id="ann", type="alerts", priority=Priority.CRITICAL,
                     title="Half sent", message="m", data=None, channels=["email", "sms"], created_at=now,
                     status=Status.QUEUED, delivery_attempts=1)
    email = Delivery(id=str(uuid.uuid4()), notification_id=n.id, channel="email", user_id="ann", created_at=now,
                     metadata={"in_flight": 1})
    sms = Delivery(id=str(uuid.uuid4()), notification_id=n.id, channel="sms", user_id="ann", created_at=now,
                   metadata={"in_flight": 1})
    await repo.save_notifications([n])
    await repo.save_deliveries([email, sms])
    await env.collector.start()
    await env.drain()
    got = await env.get(notification_id)
    by_channel = {d["channel"]: d for d in got["deliveries"]}
    assert by_channel["EMAIL"]["status"] == "SENT" and by_channel["EMAIL"]["metadata"]["email_id"] == sent["id"]
    assert by_channel["SMS"]["status"] == "FAILED" and "outcome unknown" in by_channel["SMS"]["error_message"]
    assert len(env.smtp.to("ann@example.com")) == 1 and fake.requests == 0
    assert got["status"] == "SENT"
