"""The ``resend`` email provider: ``POST /emails`` with a Bearer key and an
``Idempotency-Key`` (our message id, stable across retries and failovers, so
Resend itself refuses a second send of one message for 24 h)."""

from __future__ import annotations

import base64
from typing import Any, ClassVar

import msgspec

from agent.configfile import Duration
from collector.email.message import OutgoingEmail
from collector.email.providers import PermanentError, ProviderContext, SendResult
from collector.email.providers._http import HttpProviderClient
from collector.email.webhooks import EMAIL_ID_VARIABLE
from plugins import hookimpl


class ResendOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A Resend API key, `re_…`.
    api_key: str
    base_url: str = "https://api.resend.com"
    # Limit of one send, connect to answer.
    timeout: Duration = Duration(15.0)

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("api_key is required (set it from an environment variable)")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL")
        self.base_url = self.base_url.rstrip("/")


class ResendClient(HttpProviderClient):
    provider = "resend"
    # Resend deduplicates on Idempotency-Key: a send cut short may be repeated safely.
    idempotent = True

    def __init__(self, options: ResendOptions, context: ProviderContext):
        super().__init__(context, options.timeout)
        self.options = options

    def payload(self, out: OutgoingEmail) -> dict[str, Any]:
        body: dict[str, Any] = {
            "from": out.from_, "to": out.to, "subject": out.subject, "text": out.text,
            "headers": {"Message-ID": out.message_id, **out.headers},
            "tags": [{"name": EMAIL_ID_VARIABLE, "value": out.email_id},
                     *({"name": t, "value": "true"} for t in out.tags)],
        }
        if out.html is not None:
            body["html"] = out.html
        if out.cc:
            body["cc"] = out.cc
        if out.bcc:
            body["bcc"] = out.bcc
        if out.reply_to:
            body["reply_to"] = out.reply_to
        if out.attachments:
            body["attachments"] = [
                {"filename": a.filename, "content": base64.b64encode(a.content).decode("ascii"),
                 "content_type": a.content_type, **({"content_id": a.content_id} if a.content_id else {})}
                for a in out.attachments
            ]
        return body

    async def send(self, out: OutgoingEmail) -> SendResult:
        o = self.options
        headers = {"Authorization": f"Bearer {o.api_key}", "Idempotency-Key": out.idempotency_key,
                   "User-Agent": "logferry"}
        body = self.payload(out)
        data = await self.request(lambda s: s.post(f"{o.base_url}/emails", json=body, headers=headers))
        if not data.get("id"):
            raise PermanentError("resend accepted the request but returned no id")
        return SendResult(provider_message_id=str(data["id"]))


class ResendProvider:
    name: ClassVar[str] = "resend"
    Options: ClassVar[type[msgspec.Struct]] = ResendOptions

    def create(self, options: ResendOptions, context: ProviderContext) -> ResendClient:
        return ResendClient(options, context)


@hookimpl
def logferry_register_email_providers(register: Any) -> None:
    register(ResendProvider())
