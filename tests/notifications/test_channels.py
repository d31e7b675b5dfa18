"""SMS through a local Twilio, Web Push through a local push service, retries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from collector import appkeys
from collector.config import CollectorConfig
from plugins import hookimpl
from plugins.manager import build_plugin_manager
from tests.notifications.conftest import (
    PUBLIC_URL,
    TWILIO_FROM,
    TWILIO_SID,
    Collector,
    FakePushService,
    FakeTwilio,
    ManualClock,
    SmtpSink,
    notification_config,
)
from tests.notifications.test_api import Env


@pytest.fixture
async def channels_env(make_config: Callable[..., CollectorConfig], collector_factory: Callable[..., Collector],
                       tokens: Any, smtp: tuple[SmtpSink, int], twilio: tuple[FakeTwilio, str],
                       push_service: tuple[FakePushService, str, str]) -> Env:
    sink, port = smtp
    _, twilio_url = twilio
    _, private, public = push_service
    collector = collector_factory(notification_config(make_config, smtp_port=port, twilio_url=twilio_url,
                                                      vapid=(private, public)))
    env = Env(collector, tokens, sink)
    await collector.start()
    return env


async def test_sms_goes_through_twilio_and_status_callbacks_update_the_delivery(
        channels_env: Env, twilio: tuple[FakeTwilio, str]) -> None:
    env, fake = channels_env, twilio[0]
    await env.put_user("dan", phone="+1 555 010 2000")
    n = await env.notify(user_id="dan", priority="CRITICAL", channels=["sms"], title="DB down",
                         message="primary unreachable")
    await env.drain()
    assert fake.unauthorised == 0 and len(fake.messages) == 1
    sent = fake.messages[0]
    assert (sent["To"], sent["From"], sent["Body"]) == ("+15550102000", TWILIO_FROM, "DB down: primary unreachable")
    assert sent["StatusCallback"] == f"{PUBLIC_URL}/v1/webhooks/twilio/status"
    got = await env.get(n["id"])
    delivery = got["deliveries"][0]
    assert (delivery["status"], delivery["provider_message_id"]) == ("SENT", sent["sid"])
    assert "5550102000" not in str(delivery["metadata"])

    async def callback(status: str, signature: str | None = None, **extra: str) -> int:
        params = {"MessageSid": sent["sid"], "MessageStatus": status, "AccountSid": TWILIO_SID,
                  "To": sent["To"], "From": TWILIO_FROM, **extra}
        sig = signature or FakeTwilio.signature(sent["StatusCallback"], params)
        r = await env.client.post("/v1/webhooks/twilio/status", data=params, headers={"X-Twilio-Signature": sig})
        return int(r.status)

    assert await callback("delivered", signature="forged") == 401
    assert (await env.get(n["id"]))["deliveries"][0]["status"] == "SENT"
    assert await callback("sent") == 204
    assert await callback("delivered") == 204
    delivered = (await env.get(n["id"]))["deliveries"][0]
    assert delivered["status"] == "DELIVERED" and delivered["delivered_at"]
    # Late or reordered reports never move a delivery backwards.
    assert await callback("failed", ErrorCode="30003") == 204
    assert (await env.get(n["id"]))["deliveries"][0]["status"] == "DELIVERED"


async def test_twilio_undelivered_report_fails_the_delivery_with_the_code(
        channels_env: Env, twilio: tuple[FakeTwilio, str]) -> None:
    env, fake = channels_env, twilio[0]
    await env.put_user("dan", phone="+15550102000")
    n = await env.notify(user_id="dan", priority="CRITICAL", channels=["sms"])
    await env.drain()
    sent = fake.messages[0]
    params = {"MessageSid": sent["sid"], "MessageStatus": "undelivered", "ErrorCode": "30005"}
    r = await env.client.post("/v1/webhooks/twilio/status", data=params,
                              headers={"X-Twilio-Signature": FakeTwilio.signature(sent["StatusCallback"], params)})
    assert r.status == 204
    delivery = (await env.get(n["id"]))["deliveries"][0]
    assert delivery["status"] == "FAILED" and "30005" in delivery["error_message"]


async def test_an_invalid_number_fails_at_once_with_twilios_reason(
        channels_env: Env, twilio: tuple[FakeTwilio, str]) -> None:
    env, fake = channels_env, twilio[0]
    await env.put_user("eve", phone=FakeTwilio.INVALID)
    n = await env.notify(user_id="eve", priority="CRITICAL", channels=["sms"])
    await env.drain()
    got = await env.get(n["id"])
    assert got["status"] == "FAILED" and got["delivery_attempts"] == 1 and got["next_attempt_at"] is None
    assert "21211" in got["error_message"] and fake.requests == 1


async def test_transient_errors_retry_with_backoff_then_succeed(
        channels_env: Env, twilio: tuple[FakeTwilio, str], clock: ManualClock) -> None:
    env, fake = channels_env, twilio[0]
    await env.put_user("dan", phone="+15550102000")
    fake.fail_next = 2
    n = await env.notify(user_id="dan", priority="CRITICAL", channels=["sms"])
    await env.drain()
    first = await env.get(n["id"])
    assert first["status"] == "FAILED" and first["next_attempt_at"] and "retrying" in first["error_message"]
    assert first["deliveries"][0]["status"] == "PENDING"
    clock.advance(seconds=0.5)
    await env.drain()
    assert fake.requests == 1  # the 1 s backoff has not passed
    clock.advance(seconds=1)
    await env.drain()
    assert fake.requests == 2 and (await env.get(n["id"]))["delivery_attempts"] == 2
    clock.advance(seconds=2)  # the second delay doubles
    await env.drain()
    final = await env.get(n["id"])
    assert final["status"] == "SENT" and final["delivery_attempts"] == 3 and final["error_message"] is None
    assert len(fake.messages) == 1


async def test_attempts_are_capped(channels_env: Env, twilio: tuple[FakeTwilio, str], clock: ManualClock) -> None:
    env, fake = channels_env, twilio[0]
    await env.put_user("dan", phone="+15550102000")
    fake.fail_next = 100
    n = await env.notify(user_id="dan", priority="CRITICAL", channels=["sms"])
    for _ in range(6):
        await env.drain()
        clock.advance(seconds=20)
    got = await env.get(n["id"])
    assert got["status"] == "FAILED" and got["delivery_attempts"] == 4 and got["next_attempt_at"] is None
    assert "gave up after 4 attempts" in got["error_message"]
    assert got["deliveries"][0]["status"] == "FAILED" and fake.requests == 4


async def test_web_push_is_encrypted_for_the_subscription_and_signed_with_vapid(
        channels_env: Env, push_service: tuple[FakePushService, str, str]) -> None:
    env, fake = channels_env, push_service[0]
    phone, laptop = fake.subscribe(), fake.subscribe()
    await env.put_user("fay", push_subscriptions=[phone.subscription(), laptop.subscription()])
    n = await env.notify(user_id="fay", priority="CRITICAL", channels=["push"], title="Deploy done",
                         message="v2 is live", data={"url": "/deploys/2"})
    await env.drain()
    assert fake.rejected == []
    assert len(fake.received) == 2
    payload = fake.received[0]["payload"]
    assert payload == {"title": "Deploy done", "body": "v2 is live", "data": {"url": "/deploys/2"},
                       "notification_id": n["id"], "priority": "CRITICAL", "type": "alerts"}
    assert fake.received[0]["urgency"] == "high" and fake.received[0]["ttl"] == "86400"
    delivery = (await env.get(n["id"]))["deliveries"][0]
    assert delivery["status"] == "SENT" and delivery["metadata"]["sent"] == 2
    r = await env.client.get("/v1/push/vapid-public-key")
    assert (await r.json())["public_key"] == fake.vapid_public


async def test_expired_push_subscriptions_are_removed(
        channels_env: Env, push_service: tuple[FakePushService, str, str]) -> None:
    env, fake = channels_env, push_service[0]
    gone, alive = fake.subscribe(), fake.subscribe()
    fake.gone.add(gone.endpoint.rsplit("/", 1)[1])
    await env.put_user("fay", push_subscriptions=[gone.subscription(), alive.subscription()])
    n = await env.notify(user_id="fay", priority="CRITICAL", channels=["push"])
    await env.drain()
    assert (await env.get(n["id"]))["deliveries"][0]["status"] == "SENT"
    r = await env.client.get("/v1/users/fay", headers=env.svc())
    assert [s["endpoint"] for s in (await r.json())["push_subscriptions"]] == [alive.endpoint]
    fake.gone.add(alive.endpoint.rsplit("/", 1)[1])
    n2 = await env.notify(user_id="fay", priority="CRITICAL", channels=["push"])
    await env.drain()
    got = await env.get(n2["id"])
    assert got["status"] == "FAILED" and "expired" in got["error_message"]
    r = await env.client.get("/v1/users/fay", headers=env.svc())
    assert (await r.json())["push_subscriptions"] == []


async def test_missing_address_fails_the_delivery_permanently(channels_env: Env) -> None:
    n = await channels_env.notify(user_id="nobody", priority="CRITICAL", channels=["sms", "email"])
    await channels_env.drain()
    got = await channels_env.get(n["id"])
    assert got["status"] == "FAILED" and got["delivery_attempts"] == 1
    assert "no sms address for user 'nobody'" in got["error_message"]


async def test_a_plugin_resolves_addresses_before_the_directory(
        make_config: Callable[..., CollectorConfig], collector_factory: Callable[..., Collector], tokens: Any,
        smtp: tuple[SmtpSink, int]) -> None:
    class HostDirectory:
        @hookimpl
        def logferry_resolve_user_address(self, user_id: str, channel: str) -> Any:
            async def answer() -> Any:
                return f"{user_id}@host-app.example" if channel == "email" and user_id == "gus" else None
            return answer()

    def prepare(app: web.Application) -> None:
        app[appkeys.PLUGINS] = build_plugin_manager(entry_points=False, extra=[("host_directory", HostDirectory())])

    sink, port = smtp
    collector = collector_factory(notification_config(make_config, smtp_port=port), prepare)
    env = Env(collector, tokens, sink)
    await collector.start()
    await env.put_user("gus", email="gus@directory.example")
    await env.put_user("hal", email="hal@directory.example")
    await env.notify(user_id="gus", channels=["email"])
    await env.notify(user_id="hal", channels=["email"])
    await env.drain()
    assert len(sink.to("gus@host-app.example")) == 1 and sink.to("gus@directory.example") == []
    assert len(sink.to("hal@directory.example")) == 1


async def test_a_digest_that_fails_transiently_is_retried_whole_never_dropped_or_doubled(
        channels_env: Env, twilio: tuple[FakeTwilio, str], clock: ManualClock) -> None:
    env, fake = channels_env, twilio[0]
    await env.put_user("dan", phone="+15550102000")
    await env.set_preference("dan", "alerts", channels={"sms": True}, frequency="BATCHED_5MIN")
    clock.set(clock().replace(minute=(clock().minute // 5) * 5, second=5))
    made = []
    for i in range(3):
        made.append(await env.notify(user_id="dan", channels=["sms"], title=f"e{i}"))
        clock.advance(seconds=1)
    fake.fail_next = 1
    clock.advance(minutes=5)
    await env.drain()
    assert fake.messages == [] and fake.requests == 1
    assert {(await env.get(n["id"]))["status"] for n in made} == {"FAILED"}
    await env.collector.restart()  # the retry must survive a restart too
    clock.advance(seconds=1)
    await env.drain()
    assert len(fake.messages) == 1
    assert fake.messages[0]["Body"] == "3 new: e0; e1; e2"
    got = [await env.get(n["id"]) for n in made]
    assert {g["status"] for g in got} == {"SENT"} and {g["delivery_attempts"] for g in got} == {2}
    assert {g["deliveries"][0]["provider_message_id"] for g in got} == {fake.messages[0]["sid"]}


async def test_a_user_registers_their_own_push_subscription(
        channels_env: Env, push_service: tuple[FakePushService, str, str]) -> None:
    env, fake = channels_env, push_service[0]
    browser = fake.subscribe()
    r = await env.client.post("/v1/me/push-subscriptions", json=browser.subscription(), headers=env.user("ida"))
    assert r.status == 201
    r = await env.client.post("/v1/me/push-subscriptions", json={"endpoint": "ftp://x", "keys": {}},
                              headers=env.user("ida"))
    assert r.status == 400
    await env.notify(user_id="ida", priority="CRITICAL", channels=["push"], title="hello")
    await env.drain()
    assert [m["payload"]["title"] for m in fake.received] == ["hello"]


async def test_a_third_party_channel_plugin_delivers_like_a_built_in(
        make_config: Callable[..., CollectorConfig], collector_factory: Callable[..., Collector], tokens: Any,
        smtp: tuple[SmtpSink, int]) -> None:
    import msgspec

    from plugins.types import ChannelResult

    received: list[Any] = []

    class ChatOptions(msgspec.Struct, forbid_unknown_fields=True):
        room: str

    class ChatSender:
        needs_address = False

        def __init__(self, options: ChatOptions):
            self.options = options

        async def send(self, message: Any) -> ChannelResult:
            received.append((self.options.room, message.title, message.idempotency_key))
            return ChannelResult(provider_message_id=f"chat-{len(received)}")

        async def close(self) -> None:
            return None

    class ChatChannel:
        name = "chat"
        Options = ChatOptions

        def create(self, options: ChatOptions, context: Any) -> ChatSender:
            return ChatSender(options)

    class ChatPlugin:
        @hookimpl
        def logferry_register_channels(self, register: Any) -> None:
            register(ChatChannel())

    def prepare(app: web.Application) -> None:
        app[appkeys.PLUGINS] = build_plugin_manager(entry_points=False, extra=[("chat", ChatPlugin())])

    sink, port = smtp
    config = notification_config(make_config, smtp_port=port, channels={"chat": {"room": "#ops"}})
    collector = collector_factory(config, prepare)
    env = Env(collector, tokens, sink)
    await collector.start()
    n = await env.notify(user_id="ops", priority="CRITICAL", channels=["chat"], title="hello chat")
    await env.drain()
    assert received == [("#ops", "hello chat", f"notification:{n['id']}:chat")]
    delivery = (await env.get(n["id"]))["deliveries"][0]
    assert (delivery["channel"], delivery["status"], delivery["provider_message_id"]) == ("CHAT", "SENT", "chat-1")
    await collector.restart()  # the stored channel survives a restart (and the schema change is idempotent)
    assert (await env.get(n["id"]))["deliveries"][0]["channel"] == "CHAT"
