"""The notifications API end to end: a real app on chDB, email through aiosmtpd."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from collector import appkeys
from collector.config import CollectorConfig
from tests.notifications.conftest import Collector, ManualClock, SmtpSink, notification_config


class Env:
    def __init__(self, collector: Collector, tokens: Any, smtp: SmtpSink):
        self.collector = collector
        self.tokens = tokens
        self.smtp = smtp
        self.service_token = tokens.create("service", name="app")
        self.users: dict[str, str] = {}

    @property
    def client(self) -> Any:
        assert self.collector.client is not None
        return self.collector.client

    def svc(self) -> dict[str, str]:
        return self.tokens.headers(self.service_token)

    def user(self, user_id: str) -> dict[str, str]:
        if user_id not in self.users:
            self.users[user_id] = self.tokens.create("user", user_id=user_id)
        return self.tokens.headers(self.users[user_id])

    async def put_user(self, user_id: str, **fields: Any) -> None:
        fields.setdefault("email", f"{user_id}@example.com")
        r = await self.client.put(f"/v1/users/{user_id}", json=fields, headers=self.svc())
        assert r.status in (200, 201), await r.text()

    async def notify(self, expect: int | None = 201, **fields: Any) -> dict[str, Any]:
        body = {"user_id": "alice", "type": "alerts", "title": "Disk full", "message": "db1 at 99%",
                "channels": ["email", "in_app"], **fields}
        r = await self.client.post("/v1/notifications", json=body, headers=self.svc())
        data: dict[str, Any] = await r.json()
        if expect is not None:
            assert r.status == expect, data
        return data

    async def set_preference(self, user_id: str, type_: str, **body: Any) -> dict[str, Any]:
        r = await self.client.put(f"/v1/me/preferences/{type_}", json=body, headers=self.user(user_id))
        data: dict[str, Any] = await r.json()
        assert r.status == 200, data
        return data

    async def get(self, notification_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/notifications/{notification_id}", headers=self.svc())
        assert r.status == 200
        return await r.json()  # type: ignore[no-any-return]

    async def inbox(self, user_id: str, **params: str) -> dict[str, Any]:
        r = await self.client.get("/v1/me/notifications", params=params, headers=self.user(user_id))
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]

    async def drain(self) -> None:
        await self.collector.drain()


@pytest.fixture
async def env(make_config: Callable[..., CollectorConfig], collector_factory: Callable[..., Collector],
              tokens: Any, smtp: tuple[SmtpSink, int]) -> Env:
    sink, port = smtp
    collector = collector_factory(notification_config(make_config, smtp_port=port))
    e = Env(collector, tokens, sink)
    await collector.start()
    await e.put_user("alice", timezone="America/New_York")
    await e.put_user("bob")
    return e


# --- creating and reading ----------------------------------------------------------------


async def test_create_returns_the_stored_notification_and_sends_it(env: Env) -> None:
    await env.set_preference("alice", "alerts", channels={"email": True, "in_app": True})
    created = await env.notify(priority="high", data={"host": "db1"})
    assert created["deduplicated"] is False
    assert {"id", "user_id", "type", "priority", "title", "message", "data", "channels", "created_at",
            "scheduled_for", "sent_at", "status", "delivery_attempts", "error_message", "dedup_key"} <= set(created)
    assert created["priority"] == "HIGH" and created["data"] == {"host": "db1"}
    await env.drain()
    got = await env.get(created["id"])
    assert got["status"] == "SENT" and got["delivery_attempts"] == 1 and got["sent_at"]
    assert sorted((d["channel"], d["status"]) for d in got["deliveries"]) == [("EMAIL", "SENT"), ("IN_APP", "SENT")]
    mails = env.smtp.to("alice@example.com")
    assert len(mails) == 1 and mails[0]["Subject"] == "Disk full"
    assert "db1 at 99%" in SmtpSink.text_of(mails[0])
    inbox = await env.inbox("alice")
    assert [n["id"] for n in inbox["notifications"]] == [created["id"]] and inbox["unread_count"] == 1


INVALID = [
    ({"channels": []}, "channels must contain at least one valid channel"),
    ({"channels": ["fax"]}, "'fax' not configured"),
    ({"priority": "URGENT"}, "priority must be one of"),
    ({"title": "x" * 201}, "title must be at most 200 characters"),
    ({"surprise": 1}, "unknown field `surprise`"),
]


async def test_invalid_notifications_are_refused_naming_the_field(env: Env) -> None:
    for body, message in INVALID:
        data = await env.notify(expect=400, **body)
        assert message in data["error"]["message"], (body, data)


async def test_a_pending_notification_can_be_cancelled_once(env: Env, clock: ManualClock) -> None:
    later = (clock() + dt.timedelta(hours=1)).isoformat()
    n = await env.notify(scheduled_for=later)
    r = await env.client.post(f"/v1/notifications/{n['id']}/cancel", headers=env.svc())
    assert r.status == 200 and (await r.json())["status"] == "CANCELLED"
    r = await env.client.post(f"/v1/notifications/{n['id']}/cancel", headers=env.svc())
    assert r.status == 409 and "CANCELLED to CANCELLED" in (await r.json())["error"]["message"]
    clock.advance(hours=2)
    await env.drain()
    assert (await env.get(n["id"]))["status"] == "CANCELLED" and env.smtp.to("alice@example.com") == []


async def test_only_admin_and_service_tokens_create_notifications(env: Env) -> None:
    r = await env.client.post("/v1/notifications", json={}, headers=env.user("alice"))
    assert r.status == 403
    r = await env.client.post("/v1/notifications", json={})
    assert r.status == 401
    r = await env.client.get("/v1/notifications/00000000-0000-0000-0000-000000000000", headers=env.svc())
    assert r.status == 404


# --- dedup --------------------------------------------------------------------------------------


async def test_many_simultaneous_posts_with_one_dedup_key_create_one_notification(env: Env) -> None:
    results = await asyncio.gather(*(env.notify(expect=None, dedup_key="disk-db1", title=f"try {i}")
                                     for i in range(40)))
    ids = {r["id"] for r in results}
    assert len(ids) == 1
    assert sum(not r["deduplicated"] for r in results) == 1
    rows = env.collector.storage.query_sync(
        "SELECT count() AS n FROM notifications FINAL WHERE dedup_key = 'disk-db1'")
    assert rows[0]["n"] == 1
    await env.drain()
    assert len(env.smtp.to("alice@example.com")) == 1


async def test_dedup_answers_with_the_existing_one_and_says_so(env: Env, clock: ManualClock) -> None:
    first = await env.notify(dedup_key="k1")
    r = await env.client.post("/v1/notifications", headers=env.svc(), json={
        "user_id": "alice", "type": "alerts", "title": "other", "message": "m", "channels": ["email"],
        "dedup_key": "k1"})
    assert r.status == 200 and r.headers["X-Deduplicated"] == "true"
    again = await r.json()
    assert again["id"] == first["id"] and again["deduplicated"] is True and again["title"] == "Disk full"
    other_user = await env.notify(user_id="bob", dedup_key="k1")
    assert other_user["id"] != first["id"]
    clock.advance(minutes=4, seconds=59)
    assert (await env.notify(expect=200, dedup_key="k1"))["id"] == first["id"]
    clock.advance(seconds=2)
    assert (await env.notify(expect=201, dedup_key="k1"))["id"] != first["id"]


# --- preferences ---------------------------------------------------------------------------------


async def test_preferences_round_trip_and_validate(env: Env) -> None:
    saved = await env.set_preference("alice", "billing", channels={"email": True, "push": False},
                                     quiet_hours={"start": "22:00", "end": "07:00", "timezone": "Europe/Paris"},
                                     frequency="BATCHED_HOURLY")
    assert saved["frequency"] == "BATCHED_HOURLY" and saved["quiet_hours"]["timezone"] == "Europe/Paris"
    again = await env.set_preference("alice", "billing", channels={"in_app": True})
    assert again["id"] == saved["id"] and again["created_at"] == saved["created_at"]
    r = await env.client.get("/v1/me/preferences", headers=env.user("alice"))
    listed = (await r.json())["preferences"]
    assert [(p["notification_type"], p["channels"]["in_app"]) for p in listed] == [("billing", True)]
    for body, message in [({"channels": {"email": False}}, "at least one channel must be enabled"),
                          ({"frequency": "WEEKLY"}, "frequency must be one of"),
                          ({"quiet_hours": {"start": "1", "end": "2"}}, "quiet_hours.start"),
                          ({"channels": {"fax": True}}, "'fax' not configured")]:
        r = await env.client.put("/v1/me/preferences/billing", json=body, headers=env.user("alice"))
        assert r.status == 400 and message in (await r.json())["error"]["message"]
    # Another user's preferences are their own.
    r = await env.client.get("/v1/me/preferences", headers=env.user("bob"))
    assert (await r.json())["preferences"] == []


async def test_a_type_without_preference_goes_by_email_only(env: Env) -> None:
    n = await env.notify(type="new-type", channels=["email", "in_app"])
    await env.drain()
    got = await env.get(n["id"])
    assert [d["channel"] for d in got["deliveries"]] == ["EMAIL"]
    only_in_app = await env.notify(type="new-type", channels=["in_app"])
    assert only_in_app["status"] == "CANCELLED" and "default channels" in only_in_app["error_message"]


async def test_critical_beats_every_preference(env: Env, clock: ManualClock) -> None:
    await env.set_preference("alice", "alerts", enabled=False, channels={"in_app": True},
                             frequency="DAILY_DIGEST",
                             quiet_hours={"start": "00:00", "end": "23:59", "timezone": "America/New_York"})
    blocked = await env.notify(priority="LOW")
    assert blocked["status"] == "CANCELLED"
    critical = await env.notify(priority="CRITICAL", title="Database down")
    await env.drain()
    got = await env.get(critical["id"])
    assert got["status"] == "SENT"
    assert sorted(d["channel"] for d in got["deliveries"]) == ["EMAIL", "IN_APP"]
    assert [m["Subject"] for m in env.smtp.to("alice@example.com")] == ["Database down"]


async def test_quiet_hours_defer_to_their_end_then_send(env: Env, clock: ManualClock) -> None:
    local = clock().astimezone(dt.timezone(dt.timedelta(0)))
    start = (local - dt.timedelta(hours=1)).strftime("%H:%M")
    end = (local + dt.timedelta(hours=2)).strftime("%H:%M")
    await env.set_preference("bob", "alerts", channels={"email": True},
                             quiet_hours={"start": start, "end": end, "timezone": "UTC"})
    n = await env.notify(user_id="bob", channels=["email"])
    await env.drain()
    assert (await env.get(n["id"]))["status"] == "PENDING" and env.smtp.to("bob@example.com") == []
    pending = await env.client.get("/v1/users/bob/notifications/pending", headers=env.svc())
    queue = (await pending.json())["pending"]
    assert [p["id"] for p in queue] == [n["id"]]
    assert queue[0]["preference"]["channels"]["email"] is True and queue[0]["effective_channels"] == ["email"]
    clock.advance(hours=2)
    await env.drain()
    assert (await env.get(n["id"]))["status"] == "SENT"
    assert len(env.smtp.to("bob@example.com")) == 1


async def test_scheduled_notifications_wait_for_their_time(env: Env, clock: ManualClock) -> None:
    when = (clock() + dt.timedelta(minutes=30)).isoformat()
    n = await env.notify(user_id="bob", channels=["email"], scheduled_for=when)
    assert n["scheduled_for"] is not None
    await env.drain()
    assert (await env.get(n["id"]))["status"] == "PENDING"
    clock.advance(minutes=30)
    await env.drain()
    assert (await env.get(n["id"]))["status"] == "SENT"


# --- the inbox -------------------------------------------------------------------------------


async def created_in_order(env: Env, clock: ManualClock, count: int) -> list[dict[str, Any]]:
    made = []
    for i in range(count):
        made.append(await env.notify(channels=["in_app"], title=f"n{i}"))
        clock.advance(seconds=1)
    return made


async def test_unread_count_is_always_right(env: Env, clock: ManualClock) -> None:
    await env.set_preference("alice", "alerts", channels={"in_app": True})
    made = await created_in_order(env, clock, 5)
    await env.drain()
    inbox = await env.inbox("alice")
    assert [n["title"] for n in inbox["notifications"]] == ["n4", "n3", "n2", "n1", "n0"]
    assert inbox["unread_count"] == 5
    # Marking read while new ones are dispatched: neither change is lost.
    reads = [env.client.post(f"/v1/me/notifications/{n['id']}/read", headers=env.user("alice")) for n in made[:3]]
    news = [env.notify(channels=["in_app"], title=f"late{i}") for i in range(3)]
    await asyncio.gather(*reads, *news, env.drain())
    await env.drain()
    inbox = await env.inbox("alice")
    assert inbox["unread_count"] == 5 and len(inbox["notifications"]) == 8
    unread = await env.inbox("alice", unread="true")
    assert {n["title"] for n in unread["notifications"]} == {"n3", "n4", "late0", "late1", "late2"}
    r = await env.client.post(f"/v1/me/notifications/{made[4]['id']}/read", headers=env.user("alice"))
    assert (await r.json())["unread_count"] == 4
    r = await env.client.post(f"/v1/me/notifications/{made[3]['id']}/read", headers=env.user("bob"))
    assert r.status == 404
    r = await env.client.post("/v1/me/notifications/read-all", headers=env.user("alice"))
    assert (await r.json())["marked"] == 4
    assert (await env.inbox("alice"))["unread_count"] == 0


async def test_inbox_pages_newest_first(env: Env, clock: ManualClock) -> None:
    await env.set_preference("alice", "alerts", channels={"in_app": True})
    await created_in_order(env, clock, 5)
    await env.drain()
    page = await env.inbox("alice", limit="2")
    titles = [n["title"] for n in page["notifications"]]
    while page["next_cursor"]:
        page = await env.inbox("alice", limit="2", cursor=page["next_cursor"])
        titles += [n["title"] for n in page["notifications"]]
    assert titles == ["n4", "n3", "n2", "n1", "n0"]


async def test_stream_pushes_a_new_in_app_notification_within_a_second(env: Env) -> None:
    await env.set_preference("alice", "alerts", channels={"in_app": True})
    resp = await env.client.get("/v1/me/notifications/stream", headers=env.user("alice"))
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")

    async def next_event() -> tuple[str, str]:
        event = ""
        while True:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event:
                return event, line[6:]

    assert (await asyncio.wait_for(next_event(), 1))[0] == "unread_count"
    loop = asyncio.get_running_loop()
    reading = asyncio.ensure_future(next_event())
    created = await env.notify(channels=["in_app"], title="live one")
    acknowledged = loop.time()
    event, data = await asyncio.wait_for(reading, 1.0)
    assert event == "notification" and created["id"] in data and '"unread_count":1' in data
    assert loop.time() - acknowledged < 1.0
    resp.close()


# --- digests --------------------------------------------------------------------------------------


async def test_batched_notifications_become_one_email_per_window(env: Env, clock: ManualClock) -> None:
    await env.set_preference("bob", "alerts", channels={"email": True, "in_app": True}, frequency="BATCHED_5MIN")
    clock.set(clock().replace(minute=(clock().minute // 5) * 5, second=10))
    made = await asyncio.gather(*(env.notify(user_id="bob", title=f"event {i}") for i in range(12)))
    # Two dispatchers racing at the close must not send the digest twice.
    clock.advance(minutes=5)
    await asyncio.gather(env.drain(), env.drain(), env.collector.service.drain())
    mails = env.smtp.to("bob@example.com")
    assert len(mails) == 1
    assert mails[0]["Subject"] == "12 new notifications (the last 5 minutes)"
    text = SmtpSink.text_of(mails[0])
    assert all(f"event {i}" in text for i in range(12))
    got = [await env.get(n["id"]) for n in made]
    assert {g["status"] for g in got} == {"SENT"}
    email_ids = {d["provider_message_id"] for g in got for d in g["deliveries"] if d["channel"] == "EMAIL"}
    assert len(email_ids) == 1
    assert (await env.inbox("bob"))["unread_count"] == 12


async def test_users_directory_keeps_pii_encrypted(env: Env) -> None:
    await env.put_user("carol", email="Carol@Example.com", phone="+1 (555) 010-9999", timezone="Europe/Paris")
    r = await env.client.get("/v1/users/carol", headers=env.svc())
    record = await r.json()
    assert record["email"] == "Carol@example.com" and record["phone"] == "+15550109999"
    raw = env.collector.storage.query_sync("SELECT * FROM users FINAL WHERE user_id = 'carol'")[0]
    assert "example.com" not in str(raw["email"]).lower() and "5550109999" not in str(raw["phone"])
    assert raw["phone_hash"] and raw["email_hash"]
    assert await env.collector.app[appkeys.USERS].find_by_phone("+15550109999") == "carol"
    for body, message in [({"email": "not-an-address"}, "email"), ({"phone": "12"}, "E.164"),
                          ({"timezone": "Nowhere/City"}, "unknown IANA timezone")]:
        r = await env.client.put("/v1/users/carol", json=body, headers=env.svc())
        assert r.status == 400 and message in (await r.json())["error"]["message"]
    r = await env.client.get("/v1/users/carol", headers=env.user("carol"))
    assert r.status == 403


async def test_erasing_a_user_forgets_them_everywhere(env: Env) -> None:
    await env.set_preference("bob", "alerts", channels={"email": True, "in_app": True})
    first = await env.notify(user_id="bob", dedup_key="disk")
    await env.drain()
    assert (await env.inbox("bob"))["unread_count"] == 1
    admin = env.tokens.headers(env.tokens.create("admin"))
    await env.collector.app[appkeys.TOKENS].load()
    r = await env.client.delete("/v1/users/bob/data", headers=admin)
    assert r.status == 200, await r.text()
    for _ in range(100):  # the service forgets in a task of its own
        r = await env.client.get("/v1/users/bob", headers=env.svc())
        if r.status == 404:
            break
        await asyncio.sleep(0.01)
    assert r.status == 404
    assert await env.collector.service.inbox("bob") == ([], 0)  # (their user tokens are revoked too)
    again = await env.notify(user_id="bob", dedup_key="disk", priority="CRITICAL", channels=["email"])
    assert again["id"] != first["id"]
    await env.drain()
    assert "no email address" in (await env.get(again["id"]))["error_message"]
