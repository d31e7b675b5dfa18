"""Email fixtures: a real SMTP server (aiosmtpd), local Resend and Mailgun API
servers that check what the real ones check, a controllable clock, and an
EmailService over the test's own chDB database."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.configfile import convert
from collector.email.config import EmailConfig
from collector.email.providers import create_providers
from collector.email.service import EmailService
from collector.storage import Storage
from plugins.manager import build_plugin_manager
from tests.helpers import SECRET, FakeClock

RESEND_KEY = "re_test_key_123"
MAILGUN_KEY = "key-test-mailgun"
MAILGUN_DOMAIN = "mg.example.com"
MAILGUN_SIGNING_KEY = "mg-signing-key-for-tests"
SVIX_KEY = b"svix-test-key-32-bytes-long!!!!!"
RESEND_SECRET = "whsec_" + base64.b64encode(SVIX_KEY).decode()


# --- Resend ------------------------------------------------------------------------------


class ResendApi:
    """``POST /emails`` as Resend documents it: Bearer key, JSON body, Idempotency-Key."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.requests = 0
        self.fail_with: list[int] = []
        self.delay = 0.0
        self._keys: dict[str, tuple[str, str]] = {}
        self.app = web.Application()
        self.app.router.add_post("/emails", self.emails)

    async def emails(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.headers.get("Authorization") != f"Bearer {RESEND_KEY}":
            return web.json_response({"statusCode": 401, "name": "missing_api_key", "message": "bad key"},
                                     status=401)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with:
            status = self.fail_with.pop(0)
            return web.json_response({"statusCode": status, "name": "error", "message": "failing on demand"},
                                     status=status)
        raw = await request.read()
        body = await request.json()
        for field in ("from", "to", "subject"):
            if not body.get(field):
                return web.json_response({"statusCode": 422, "name": "missing_required_field",
                                          "message": f"{field} is missing"}, status=422)
        if not body.get("html") and not body.get("text"):
            return web.json_response({"statusCode": 422, "name": "validation_error",
                                      "message": "html or text"}, status=422)
        key = request.headers.get("Idempotency-Key")
        digest = hashlib.sha256(raw).hexdigest()
        if key:
            if key in self._keys:
                email_id, seen = self._keys[key]
                if seen != digest:
                    return web.json_response({"statusCode": 409, "name": "invalid_idempotent_request",
                                              "message": "same key, different body"}, status=409)
                return web.json_response({"id": email_id})
        email_id = str(uuid.uuid4())
        if key:
            self._keys[key] = (email_id, digest)
        self.sent.append({**body, "_idempotency_key": key, "_id": email_id})
        return web.json_response({"id": email_id})


class MailgunApi:
    """``POST /v3/{domain}/messages``: basic auth ``api:<key>``, multipart form."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.requests = 0
        self.fail_with: list[int] = []
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v3/{domain}/messages", self.messages)

    async def messages(self, request: web.Request) -> web.Response:
        self.requests += 1
        expected = "Basic " + base64.b64encode(f"api:{MAILGUN_KEY}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, text="Forbidden")
        if request.match_info["domain"] != MAILGUN_DOMAIN:
            return web.json_response({"message": "Domain not found"}, status=404)
        if self.fail_with:
            return web.json_response({"message": "failing on demand"}, status=self.fail_with.pop(0))
        if not request.content_type.startswith("multipart/form-data"):
            return web.json_response({"message": "expected multipart"}, status=400)
        fields: dict[str, list[Any]] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert not isinstance(part, type(reader))
            data = await part.read()  # type: ignore[union-attr]
            value: Any = data.decode() if part.filename is None else {  # type: ignore[union-attr]
                "filename": part.filename, "content": bytes(data),  # type: ignore[union-attr]
                "content_type": part.headers.get("Content-Type")}  # type: ignore[union-attr]
            fields.setdefault(part.name or "", []).append(value)  # type: ignore[union-attr]
        for field in ("from", "to", "subject"):
            if field not in fields:
                return web.json_response({"message": f"{field} parameter is missing"}, status=400)
        if "text" not in fields and "html" not in fields:
            return web.json_response({"message": "Need at least one of 'text' or 'html'"}, status=400)
        message_id = f"{uuid.uuid4().hex}@{MAILGUN_DOMAIN}"
        self.sent.append({**fields, "_id": message_id})
        return web.json_response({"id": f"<{message_id}>", "message": "Queued. Thank you."})


@pytest.fixture
async def resend_api() -> AsyncIterator[tuple[ResendApi, str]]:
    api = ResendApi()
    server = TestServer(api.app, host="127.0.0.1")
    await server.start_server()
    yield api, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
async def mailgun_api() -> AsyncIterator[tuple[MailgunApi, str]]:
    api = MailgunApi()
    server = TestServer(api.app, host="127.0.0.1")
    await server.start_server()
    yield api, str(server.make_url("")).rstrip("/")
    await server.close()


def resend_provider(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "resend", "api_key": RESEND_KEY, "base_url": url, "timeout": "5s", **extra}


def mailgun_provider(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "mailgun", "api_key": MAILGUN_KEY, "domain": MAILGUN_DOMAIN, "base_url": url, "timeout": "5s",
            **extra}


# --- the service ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def provider_registry() -> dict[str, Any]:
    manager = build_plugin_manager(entry_points=False, default_plugins=(
        "collector.email.providers.smtp", "collector.email.providers.resend", "collector.email.providers.mailgun"))
    return {name: entry.obj for name, entry in manager.email_providers().items()}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_service(storage: Storage, provider_registry: dict[str, Any], clock: FakeClock
                       ) -> AsyncIterator[Callable[..., Any]]:
    """``await make_service(providers=[...], **email_config)`` → a started EmailService."""
    started: list[EmailService] = []

    async def make(*, providers: list[dict[str, Any]], start: bool = True, **email: Any) -> EmailService:
        email.setdefault("retries", {"base_delay": "10s", "max_delay": "60s", "max_attempts": 4})
        config = convert({"providers": providers, **email}, EmailConfig)
        service = EmailService(
            storage=storage, config=config, secret_key=SECRET, public_url="http://collector.test",
            providers=create_providers(config.providers, provider_registry, None), clock=clock,
            jitter=lambda: 0.5,
        )
        if start:
            await service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        await service.stop()


@pytest.fixture
async def email_app(make_client: Any, make_config: Any, tokens: Any, smtp_server: Any) -> Any:
    """The collector app with SMTP to ``smtp_server`` and both webhook secrets; the
    client carries ``.service``/``.admin``/``.user`` auth headers and ``.smtp``."""
    service_token = tokens.create("service")
    admin_token = tokens.create("admin")
    user_token = tokens.create("user")
    config = make_config(email={
        "providers": [smtp_server.provider()],
        "webhooks": {"mailgun_signing_key": MAILGUN_SIGNING_KEY, "resend_secret": RESEND_SECRET},
        "tracking": {"scanner_window": "10s"},
    })
    client = await make_client(config)
    client.service = tokens.headers(service_token)
    client.admin = tokens.headers(admin_token)
    client.user = tokens.headers(user_token)
    client.smtp = smtp_server
    client.make_config = make_config
    return client
