"""The ``mailgun`` email provider: ``POST /v3/{domain}/messages``, multipart,
basic auth ``api:<key>``, US or EU region. Mailgun has no idempotency key:
the service stores the message (and our Message-ID) before the send and
never hands one message to a provider twice after an accepted send."""

from __future__ import annotations

import base64
from typing import Any, ClassVar, Literal

import aiohttp
import msgspec

from agent.configfile import Duration
from collector.email.message import OutgoingEmail
from collector.email.providers import PermanentError, ProviderContext, SendResult
from collector.email.providers._http import HttpProviderClient
from collector.email.webhooks import EMAIL_ID_VARIABLE
from plugins import hookimpl

REGIONS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}


class MailgunOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A Mailgun private API key (not the webhook signing key).
    api_key: str
    # The sending domain, e.g. mg.example.com.
    domain: str
    # us or eu: picks the API host.
    region: Literal["us", "eu"] = "us"
    # Overrides the region's host (a proxy, a test server).
    base_url: str | None = None
    timeout: Duration = Duration(15.0)

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("api_key is required (set it from an environment variable)")
        if not self.domain or "/" in self.domain:
            raise ValueError("domain must be the sending domain, e.g. mg.example.com")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL")

    @property
    def url(self) -> str:
        return f"{(self.base_url or REGIONS[self.region]).rstrip('/')}/v3/{self.domain}/messages"


class MailgunClient(HttpProviderClient):
    provider = "mailgun"

    def __init__(self, options: MailgunOptions, context: ProviderContext):
        super().__init__(context, options.timeout)
        self.options = options
        token = base64.b64encode(f"api:{options.api_key}".encode()).decode("ascii")
        self.headers = {"Authorization": f"Basic {token}", "User-Agent": "logferry"}

    def form(self, out: OutgoingEmail) -> aiohttp.FormData:
        form = aiohttp.FormData(quote_fields=False, default_to_multipart=True)
        form.add_field("from", out.from_)
        for key, values in (("to", out.to), ("cc", out.cc), ("bcc", out.bcc)):
            for value in values:
                form.add_field(key, value)
        form.add_field("subject", out.subject)
        form.add_field("text", out.text)
        if out.html is not None:
            form.add_field("html", out.html)
        form.add_field("h:Message-Id", out.message_id)
        if out.reply_to:
            form.add_field("h:Reply-To", out.reply_to)
        for name, value in out.headers.items():
            form.add_field(f"h:{name}", value)
        for tag in out.tags:
            form.add_field("o:tag", tag)
        # We track opens and clicks ourselves (signed tokens, scanner filtering).
        form.add_field("o:tracking", "no")
        form.add_field(f"v:{EMAIL_ID_VARIABLE}", out.email_id)
        for att in out.attachments:
            field = "inline" if att.content_id and out.html is not None else "attachment"
            filename = att.content_id if field == "inline" else att.filename
            form.add_field(field, att.content, filename=filename, content_type=att.content_type)
        return form

    async def send(self, out: OutgoingEmail) -> SendResult:
        data = await self.request(lambda s: s.post(self.options.url, data=self.form(out), headers=self.headers))
        if not data.get("id"):
            raise PermanentError("mailgun accepted the request but returned no id")
        return SendResult(provider_message_id=str(data["id"]).strip("<>"),
                          metadata={"message": data.get("message")})


class MailgunProvider:
    name: ClassVar[str] = "mailgun"
    Options: ClassVar[type[msgspec.Struct]] = MailgunOptions

    def create(self, options: MailgunOptions, context: ProviderContext) -> MailgunClient:
        return MailgunClient(options, context)


@hookimpl
def logferry_register_email_providers(register: Any) -> None:
    register(MailgunProvider())
