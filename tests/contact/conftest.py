"""Contact-form fixtures: the collector app with a controllable clock, the
events it publishes, a real SMTP server (aiosmtpd), and tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from collector import appkeys
from collector.config import CollectorConfig
from collector.contact.intake import ContactService
from collector.events import CONTACT_FORM
from tests.helpers import FakeClock, free_port

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


class SmtpHandler:
    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, EmailMessage]] = []
        self.refuse: set[str] = set()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        parsed = message_from_bytes(raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append((envelope, parsed))
        return "250 2.0.0 Message accepted"


class SmtpServer:
    def __init__(self, handler: SmtpHandler, port: int):
        self.handler = handler
        self.port = port

    @property
    def messages(self) -> list[tuple[Envelope, EmailMessage]]:
        return self.handler.messages

    def provider(self) -> dict[str, Any]:
        return {"type": "smtp", "host": "127.0.0.1", "port": self.port, "starttls": "off", "timeout": "5s"}

    def to(self, address: str) -> list[EmailMessage]:
        return [m for env, m in self.messages if address in env.rcpt_tos]


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    handler = SmtpHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, data_size_limit=64 * 1024 * 1024)
    controller.start()
    try:
        yield SmtpServer(handler, port)
    finally:
        controller.stop()


class ContactHarness:
    """A running collector app with the contact feature, as tests drive it."""

    def __init__(self, client: TestClient[Any, Any], clock: FakeClock, admin: str, tokens: Any):
        self.client = client
        self.clock = clock
        self.admin_token = admin
        self.tokens = tokens
        self.events: list[Mapping[str, Any]] = []
        self.service.set_clock(clock)
        client.app[appkeys.EVENTS].subscribe(CONTACT_FORM, self._collect)

    def _collect(self, events: Sequence[Mapping[str, Any]]) -> None:
        self.events.extend(events)

    @property
    def service(self) -> ContactService:
        return self.client.app[appkeys.CONTACT]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def form_token(self) -> str:
        resp = await self.client.get("/v1/contact/form-token")
        assert resp.status == 200
        return str((await resp.json())["form_token"])

    async def submit(self, *, human: bool = True, headers: Mapping[str, str] | None = None,
                     **fields: Any) -> Any:
        """POST a JSON submission; ``human`` fetches a form token and lets 20 s pass."""
        body = {"name": "Ada Lovelace", "email": "ada@example.org", "subject": "A question",
                "message": "Hello, could you tell me when my order will ship? Thanks."}
        body.update(fields)
        if human and "_form_token" not in body:
            body["_form_token"] = await self.form_token()
            self.clock.advance(20)
        return await self.client.post("/v1/contact", json=body, headers=dict(headers or {}))

    async def stored(self, sid: str) -> dict[str, Any]:
        resp = await self.client.get(f"/v1/contact/{sid}", headers=self.admin)
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


@pytest.fixture
def make_contact(make_client: Callable[..., Any], make_config: Callable[..., CollectorConfig],
                 tokens: Any) -> Callable[..., Any]:
    """``await make_contact(contact={...}, **collector_overrides)`` → ContactHarness."""

    async def make(contact: Mapping[str, Any] | None = None, **overrides: Any) -> ContactHarness:
        admin = tokens.create("admin", name="support-admin")
        config = make_config(contact=dict(contact or {}), **overrides)
        client = await make_client(config)
        return ContactHarness(client, FakeClock(), admin, tokens)

    return make
