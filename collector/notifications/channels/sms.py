"""The ``sms`` channel: Twilio's Messages API, with signed status callbacks.

Options (``collector.notifications.channels.sms``)::

    sms:
      account_sid: "${TWILIO_ACCOUNT_SID}"    # AC…
      auth_token: "${TWILIO_AUTH_TOKEN}"      # also verifies status callbacks
      from: "+15550100000"                    # or messaging_service_sid: MG…
      base_url: https://api.twilio.com        # a local server in tests
      status_callback: true                   # ask Twilio to report delivery

A send is ``POST {base_url}/2010-04-01/Accounts/{sid}/Messages.json``,
form-encoded (``To``, ``From``/``MessagingServiceSid``, ``Body``,
``StatusCallback``) with HTTP basic auth (account SID, auth token). Twilio's
answer carries the message ``sid``, stored as the delivery's
``provider_message_id``. Twilio then POSTs status changes to
``{public_url}/v1/webhooks/twilio/status``; each is verified
(``X-Twilio-Signature`` = base64 HMAC-SHA1 over the full URL followed by every
POST parameter, sorted by name, name immediately followed by value) before it
moves the delivery to DELIVERED or FAILED. 429 and 5xx answers are retried;
other 4xx answers (invalid number, unverified sender, bad credentials) fail
the delivery at once with Twilio's code and message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import aiohttp
import msgspec

from agent.configfile import Duration
from collector.notifications.channels.base import ChannelContext, ChannelMessage
from plugins import hookimpl
from plugins.types import ChannelResult, PermanentError, TransientError

STATUS_CALLBACK_PATH = "/v1/webhooks/twilio/status"
MAX_BODY_CHARS = 1600


class SmsOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The Twilio account SID (AC followed by 32 hex digits).
    account_sid: str
    # The account's auth token: authenticates sends and verifies status callbacks.
    auth_token: str
    # The sending number (E.164); or set messaging_service_sid instead.
    from_: str | None = msgspec.field(name="from", default=None)
    # A Messaging Service (MG…) that picks the sender.
    messaging_service_sid: str | None = None
    # The Twilio API's base URL.
    base_url: str = "https://api.twilio.com"
    # Ask Twilio to POST delivery reports to {public_url}/v1/webhooks/twilio/status.
    status_callback: bool = True
    # Upper bound of one API call.
    timeout: Duration = Duration(10.0)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"AC[0-9a-fA-F]{32}", self.account_sid):
            raise ValueError("account_sid must be AC followed by 32 hex digits")
        if not self.auth_token:
            raise ValueError("auth_token must not be empty")
        if (self.from_ is None) == (self.messaging_service_sid is None):
            raise ValueError("set exactly one of `from` and `messaging_service_sid`")
        if self.from_ is not None and not re.fullmatch(r"\+[1-9]\d{6,14}|[A-Za-z0-9 ]{1,11}", self.from_):
            raise ValueError("`from` must be an E.164 number or an alphanumeric sender id")
        if not self.base_url.startswith(("https://", "http://")):
            raise ValueError("base_url must be an http(s) URL")
        self.base_url = self.base_url.rstrip("/")


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """``X-Twilio-Signature`` for a POST of ``params`` to ``url``."""
    payload = url + "".join(f"{name}{params[name]}" for name in sorted(params))
    digest = hmac.new(auth_token.encode("utf-8"), payload.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_twilio_signature(auth_token: str, url: str, params: Mapping[str, str], signature: str) -> bool:
    return hmac.compare_digest(twilio_signature(auth_token, url, params), signature or "")


def sms_body(message: ChannelMessage) -> str:
    if message.items:
        body = message.text or message.title
    elif message.title and message.title != message.message:
        body = f"{message.title}: {message.message}"
    else:
        body = message.message
    return body if len(body) <= MAX_BODY_CHARS else body[: MAX_BODY_CHARS - 1] + "…"


class SmsSender:
    needs_address = True
    # Twilio's Messages API takes no idempotency key: never resend after a crash mid-send.
    idempotent = False

    def __init__(self, options: SmsOptions, context: ChannelContext):
        self.options = options
        self.context = context
        self.url = f"{options.base_url}/2010-04-01/Accounts/{options.account_sid}/Messages.json"
        credentials = f"{options.account_sid}:{options.auth_token}".encode()
        self.authorization = "Basic " + base64.b64encode(credentials).decode("ascii")

    async def send(self, message: ChannelMessage) -> ChannelResult:
        form = {"To": str(message.address), "Body": sms_body(message)}
        if self.options.from_ is not None:
            form["From"] = self.options.from_
        else:
            form["MessagingServiceSid"] = str(self.options.messaging_service_sid)
        if self.options.status_callback:
            form["StatusCallback"] = self.context.public_url.rstrip("/") + STATUS_CALLBACK_PATH
        session = self.context.http()
        try:
            async with session.post(self.url, data=form, headers={"Authorization": self.authorization},
                                    timeout=aiohttp.ClientTimeout(total=self.options.timeout)) as resp:
                text = await resp.text()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"twilio unreachable: {type(exc).__name__}: {exc}") from exc
        try:
            body: dict[str, Any] = msgspec.json.decode(text) if text else {}
        except msgspec.DecodeError:
            body = {}
        if status in (200, 201):
            sid = body.get("sid")
            if not sid:
                raise TransientError("twilio answered without a message sid")
            return ChannelResult(provider_message_id=str(sid), metadata={"twilio_status": body.get("status")})
        detail = f"twilio {status}: code {body.get('code')}: {body.get('message') or text[:200]}"
        if status == 429 or status >= 500:
            raise TransientError(detail, retry_after=float(retry_after) if retry_after and retry_after.isdigit()
                                 else None)
        raise PermanentError(detail)

    async def close(self) -> None:
        return None


class SmsChannel:
    name: ClassVar[str] = "sms"
    Options: ClassVar[type[msgspec.Struct]] = SmsOptions

    def create(self, options: SmsOptions, context: ChannelContext) -> SmsSender:
        return SmsSender(options, context)


@hookimpl
def logferry_register_channels(register: Any) -> None:
    register(SmsChannel())
