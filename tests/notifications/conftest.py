"""Notification fixtures: a controllable clock, a real SMTP server (aiosmtpd),
local Twilio and Web Push services that check what the real ones check (basic
auth; VAPID JWTs; aes128gcm payloads decrypted with the subscription's keys),
and a collector app on the test's own database that can be restarted."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import http_ece
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from collector import appkeys
from collector.app import create_app
from collector.config import CollectorConfig
from collector.notifications.lifecycle import CLOCK
from collector.notifications.service import NotificationService
from collector.storage import Storage
from tests.helpers import free_port

TWILIO_SID = "AC" + "0123456789abcdef" * 2
TWILIO_TOKEN = "twilio-auth-token-for-tests"
TWILIO_FROM = "+15550100000"
PUBLIC_URL = "http://127.0.0.1:8080"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ManualClock:
    """Aware UTC time moved only by the test (starts at the real now, so
    stored rows stay inside their TTLs)."""

    def __init__(self, start: dt.datetime | None = None):
        self.at = start or dt.datetime.now(dt.UTC).replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.at

    def advance(self, **delta: float) -> None:
        self.at += dt.timedelta(**delta)

    def set(self, at: dt.datetime) -> None:
        self.at = at


# --- SMTP -------------------------------------------------------------------------------


class SmtpSink:
    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, EmailMessage]] = []
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        parsed = message_from_bytes(raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append((envelope, parsed))
        self.arrived.set()
        return "250 2.0.0 Message accepted"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for env, m in self.messages if address in env.rcpt_tos]

    @staticmethod
    def text_of(message: EmailMessage) -> str:
        part = message.get_body(preferencelist=("plain",))
        assert part is not None
        return str(part.get_content())


@pytest.fixture
def smtp() -> Iterator[tuple[SmtpSink, int]]:
    sink = SmtpSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port, data_size_limit=40 * 1024 * 1024)
    controller.start()
    yield sink, port
    controller.stop()


# --- Twilio -----------------------------------------------------------------------------


class FakeTwilio:
    """The Messages API as Twilio documents it: form-encoded POST, basic auth
    (account SID, auth token), 201 with the message resource; 21211 for an
    invalid ``To``. ``fail_next`` answers 503 that many times first."""

    INVALID = "+15005550001"  # Twilio's magic "invalid number"

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.unauthorised = 0
        self.fail_next = 0
        self.requests = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self.create_message)
        return app

    async def create_message(self, request: web.Request) -> web.Response:
        self.requests += 1
        expected = "Basic " + base64.b64encode(f"{TWILIO_SID}:{TWILIO_TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != expected or request.match_info["sid"] != TWILIO_SID:
            self.unauthorised += 1
            return web.json_response({"code": 20003, "message": "Authenticate", "status": 401}, status=401)
        if not request.content_type == "application/x-www-form-urlencoded":
            return web.json_response({"code": 20001, "message": "bad content type", "status": 400}, status=400)
        form = {k: str(v) for k, v in (await request.post()).items()}
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"code": 20500, "message": "Internal Server Error", "status": 503}, status=503)
        for field in ("To", "Body"):
            if not form.get(field):
                return web.json_response({"code": 21604, "message": f"'{field}' is required", "status": 400},
                                         status=400)
        if not form.get("From") and not form.get("MessagingServiceSid"):
            return web.json_response({"code": 21603, "message": "'From' is required", "status": 400}, status=400)
        if form["To"] == self.INVALID or not re.fullmatch(r"\+[1-9]\d{6,14}", form["To"]):
            return web.json_response({"code": 21211, "message": f"The 'To' number {form['To']} is not a valid "
                                      "phone number.", "status": 400}, status=400)
        sid = "SM" + uuid.uuid4().hex
        form["sid"] = sid
        self.messages.append(form)
        return web.json_response({"sid": sid, "status": "queued", "to": form["To"], "from": form.get("From"),
                                  "body": form["Body"], "account_sid": TWILIO_SID}, status=201)

    @staticmethod
    def signature(url: str, params: dict[str, str], token: str = TWILIO_TOKEN) -> str:
        """Computed as Twilio's documentation describes, independently of our code."""
        import hashlib
        import hmac

        data = url
        for key in sorted(params):
            data += key + params[key]
        mac = hmac.new(token.encode(), data.encode(), hashlib.sha1)
        return base64.b64encode(mac.digest()).decode()


@pytest.fixture
async def twilio() -> AsyncIterator[tuple[FakeTwilio, str]]:
    fake = FakeTwilio()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    await server.close()


# --- Web Push ---------------------------------------------------------------------------


class Subscriber:
    """A browser's push subscription: a P-256 key pair and an auth secret."""

    def __init__(self, endpoint: str):
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)
        self.endpoint = endpoint
        public = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        self.p256dh = b64url(public)

    def subscription(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "keys": {"p256dh": self.p256dh, "auth": b64url(self.auth)}}


class FakePushService:
    """A push service (RFC 8030) that checks the VAPID JWT (RFC 8292) and
    decrypts each aes128gcm payload (RFC 8291) with the subscriber's keys."""

    def __init__(self, vapid_public: str):
        self.vapid_public = vapid_public
        self.subscribers: dict[str, Subscriber] = {}
        self.received: list[dict[str, Any]] = []
        self.gone: set[str] = set()
        self.rejected: list[str] = []
        self.base = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/push/{id}", self.push)
        return app

    def subscribe(self) -> Subscriber:
        sub_id = uuid.uuid4().hex
        sub = Subscriber(f"{self.base}/push/{sub_id}")
        self.subscribers[sub_id] = sub
        return sub

    async def push(self, request: web.Request) -> web.Response:
        sub_id = request.match_info["id"]
        auth = request.headers.get("Authorization", "")
        match = re.fullmatch(r"vapid t=([^,]+),\s*k=(.+)", auth)
        if not match or match.group(2) != self.vapid_public:
            self.rejected.append("vapid header")
            return web.Response(status=401)
        point = b64url_decode(match.group(2))
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        try:
            claims = jwt.decode(match.group(1), key, algorithms=["ES256"], audience=self.base)
        except jwt.PyJWTError as exc:
            self.rejected.append(f"jwt: {exc}")
            return web.Response(status=403)
        if not str(claims.get("sub", "")).startswith(("mailto:", "https://")):
            self.rejected.append("sub")
            return web.Response(status=403)
        if claims["exp"] > dt.datetime.now(dt.UTC).timestamp() + 24 * 3600:
            self.rejected.append("exp more than 24h ahead")
            return web.Response(status=403)
        if sub_id in self.gone:
            return web.Response(status=410)
        sub = self.subscribers.get(sub_id)
        if sub is None:
            return web.Response(status=404)
        if request.headers.get("Content-Encoding") != "aes128gcm" or "TTL" not in request.headers:
            self.rejected.append("encoding or TTL")
            return web.Response(status=400)
        body = await request.read()
        plain = http_ece.decrypt(body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm")
        self.received.append({"subscriber": sub_id, "payload": json.loads(plain),
                              "urgency": request.headers.get("Urgency"), "topic": request.headers.get("Topic"),
                              "ttl": request.headers.get("TTL")})
        return web.Response(status=201, headers={"Location": f"{self.base}/messages/{uuid.uuid4().hex}"})


def vapid_keys() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_numbers().private_value.to_bytes(32, "big")
    public = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b64url(private), b64url(public)


@pytest.fixture
async def push_service() -> AsyncIterator[tuple[FakePushService, str, str]]:
    """(service, vapid private key, vapid public key)."""
    private, public = vapid_keys()
    fake = FakePushService(public)
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.base = str(server.make_url("")).rstrip("/")
    yield fake, private, public
    await server.close()


# --- the collector ------------------------------------------------------------------------


class Collector:
    """The collector app on this test's database, restartable like a process."""

    def __init__(self, storage: Storage, config: CollectorConfig, clock: ManualClock,
                 prepare: Callable[[web.Application], None] | None = None):
        self.storage = storage
        self.config = config
        self.clock = clock
        self.prepare = prepare
        self.client: TestClient[Any, Any] | None = None

    async def start(self) -> TestClient[Any, Any]:
        app = create_app(self.config, storage=self.storage)
        app[CLOCK] = self.clock
        if self.prepare is not None:
            self.prepare(app)
        self.client = TestClient(TestServer(app))
        await self.client.start_server()
        return self.client

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def restart(self) -> TestClient[Any, Any]:
        await self.stop()
        return await self.start()

    @property
    def app(self) -> web.Application:
        assert self.client is not None
        return self.client.app  # type: ignore[no-any-return]

    @property
    def service(self) -> NotificationService:
        return self.app[appkeys.NOTIFIER]

    async def drain(self) -> None:
        await self.service.drain()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def collector_factory(storage: Storage, clock: ManualClock
                            ) -> AsyncIterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(config: CollectorConfig, prepare: Callable[[web.Application], None] | None = None) -> Collector:
        c = Collector(storage, config, clock, prepare)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.stop()


def notification_config(make_config: Callable[..., CollectorConfig], *, smtp_port: int | None = None,
                        twilio_url: str | None = None, vapid: tuple[str, str] | None = None,
                        **notifications: Any) -> CollectorConfig:
    """A collector config with the channels whose servers the test runs."""
    channels: dict[str, Any] = dict(notifications.pop("channels", {}))
    if twilio_url is not None:
        channels["sms"] = {"account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN, "from": TWILIO_FROM,
                           "base_url": twilio_url}
    if vapid is not None:
        channels["push"] = {"vapid_private_key": vapid[0], "vapid_public_key": vapid[1],
                            "subject": "mailto:ops@example.com"}
    retry = notifications.pop("retry", {"base_delay": "1s", "max_delay": "10s", "jitter": 0, "max_attempts": 4})
    overrides: dict[str, Any] = {"public_url": PUBLIC_URL,
                                 "notifications": {"channels": channels, "retry": retry, **notifications}}
    if smtp_port is not None:
        overrides["email"] = {"from": "logferry <noreply@example.com>",
                              "providers": [{"type": "smtp", "host": "127.0.0.1", "port": smtp_port,
                                             "starttls": "off"}]}
    return make_config(**overrides)
