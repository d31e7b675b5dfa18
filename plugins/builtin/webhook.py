"""The ``webhook`` step: an HTTP request with an HMAC-SHA256 signature.

::

    - type: webhook
      options:
        url: https://hooks.example.com/logferry
        secret: ${WEBHOOK_SECRET}
        body: {text: "{{ count }} errors in {{ group.source }}"}   # default: the run as JSON

The signature header (``X-Logferry-Signature`` by default) is
``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``: receivers
recompute it over the raw body, compare in constant time and refuse
timestamps more than five minutes off (replays). ``X-Logferry-Delivery`` is
the same on every retry of one step of one run: receivers deduplicate on it.

408, 425, 429 and 5xx answers and connection errors are retried by the
engine (``Retry-After`` honoured); other 4xx answers fail the step at once.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any, Literal

import aiohttp
import msgspec
import orjson

from agent.configfile import Duration
from plugins import hookimpl
from plugins.types import PermanentError, StepContext, TransientError

RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_OUTPUT_BODY = 4096


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """Check a signature header as a receiver should (for receivers written in Python)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class WebhookOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    # Extra request headers (values may be templates).
    headers: dict[str, str] = {}
    # A string is sent as it is; a mapping or list as JSON; omitted: the run
    # (pipeline, run_id, event, group, count, rule) as JSON.
    body: Any = None
    # HMAC key; empty sends no signature header.
    secret: str = ""
    signature_header: str = "X-Logferry-Signature"
    content_type: str = "application/json"
    # Per attempt; the step's own `timeout` bounds all of it too.
    timeout: Duration = Duration(10.0)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://", "{{")):
            raise ValueError("url must start with http:// or https://")


def _payload(options: WebhookOptions, context: StepContext) -> bytes:
    body = options.body
    if isinstance(body, str):
        return body.encode()
    if body is None:
        v = context.variables
        body = {"pipeline": context.pipeline, "run_id": context.run_id, "event": v.get("event"),
                "group": v.get("group"), "group_key": v.get("group_key"), "count": v.get("count"),
                "suppressed": v.get("suppressed"), "rule": v.get("rule")}
    return orjson.dumps(body, default=str, option=orjson.OPT_NON_STR_KEYS)


class WebhookStep:
    name = "webhook"
    Options = WebhookOptions

    async def run(self, event: Mapping[str, Any], options: WebhookOptions,
                  context: StepContext) -> Mapping[str, Any]:
        body = _payload(options, context)
        headers = {"Content-Type": options.content_type, "User-Agent": "logferry-webhook/1",
                   "X-Logferry-Delivery": f"{context.run_id}.{context.step_id}",
                   "X-Logferry-Pipeline": context.pipeline, **options.headers}
        if options.secret:
            headers[options.signature_header] = sign(options.secret, int(time.time()), body)
        session = context.http
        own = session is None
        if own:
            session = aiohttp.ClientSession()
        try:
            async with session.request(options.method, options.url, data=body, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=float(options.timeout)),
                                       allow_redirects=False) as response:
                text = (await response.content.read(MAX_OUTPUT_BODY)).decode("utf-8", "replace")
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except aiohttp.ClientError as exc:
            raise TransientError(f"{options.method} {options.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            if own:
                await session.close()
        if status in RETRYABLE:
            wait = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise TransientError(f"{options.url} answered {status}", retry_after=wait)
        if status >= 400:
            raise PermanentError(f"{options.url} answered {status}: {text[:200]}")
        output: dict[str, Any] = {"status": status, "body": text}
        try:
            output["json"] = orjson.loads(text) if text else None
        except orjson.JSONDecodeError:
            pass
        return output

    def describe(self, event: Mapping[str, Any], options: WebhookOptions, context: StepContext) -> str:
        body = _payload(options, context)
        signed = f", signed in {options.signature_header}" if options.secret else ""
        preview = body[:300].decode("utf-8", "replace")
        return f"{options.method} {options.url} ({len(body)} bytes{signed}): {preview}"


@hookimpl
def logferry_register_steps(register: Any) -> None:
    register(WebhookStep())
