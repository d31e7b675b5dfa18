"""Contact-form fixtures: the collector app with a controllable clock, the
events it publishes, a real SMTP server (aiosmtpd), and tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from collector import appkeys
from collector.config import CollectorConfig
from collector.contact.intake import ContactService
from collector.events import CONTACT_FORM
from tests.helpers import FakeClock

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


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
