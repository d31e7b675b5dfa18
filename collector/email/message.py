"""The email domain: what a caller asks for, what a provider is handed, and
the EmailMessage lifecycle. No HTTP, no storage.

``SendEmail`` is the ``POST /v1/emails`` body and the service's argument;
:func:`validate_request` applies the spec's rules (valid addresses, subject
≤ 200 characters, a body, total size ≤ 25 MB) and raises
:class:`InvalidEmail` naming the field and the limit. :func:`apply_event`
is the state machine webhooks and tracking drive.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import re
from typing import Any

import msgspec
from email_validator import EmailNotValidError, validate_email

from plugins.types import PermanentError

SUBJECT_MAX = 200
FILENAME_MAX = 255
TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TAGS = 10
TEMPLATE_DATA_MAX = 256 * 1024
CONTENT_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
CONTENT_ID_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,200}$")

# EmailMessage.status and the transitions the spec allows (QUEUED → FAILED →
# QUEUED is a retry; BOUNCED and DELIVERED are where a sent message ends).
QUEUED, SENT, DELIVERED, BOUNCED, FAILED = "QUEUED", "SENT", "DELIVERED", "BOUNCED", "FAILED"
STATUSES = (QUEUED, SENT, DELIVERED, BOUNCED, FAILED)

# Normalised event types (webhooks and tracking).
EVENT_TYPES = ("sent", "delivered", "bounced", "complained", "opened", "clicked", "unsubscribed", "failed",
               "delayed")


class InvalidEmail(PermanentError, ValueError):
    """A request that breaks a rule; ``field`` names it (``to[2]``, ``subject``, …)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Suppressed(PermanentError):
    """A recipient is on the suppression list (and the caller did not override it)."""

    def __init__(self, message: str, addresses: list[str]):
        super().__init__(message)
        self.addresses = addresses


class Attachment(msgspec.Struct, kw_only=True):
    filename: str
    # Base64 (standard alphabet, padding optional).
    content: str
    content_type: str = "application/octet-stream"
    # Set for an inline image referenced from the HTML as ``cid:<content_id>``.
    content_id: str | None = None


class SendEmail(msgspec.Struct, kw_only=True):
    """What a caller asks to send: bodies, or ``template_id`` + ``template_data``."""

    to: list[str]
    cc: list[str] | None = None
    bcc: list[str] | None = None
    subject: str | None = None
    html_body: str | None = None
    text_body: str | None = None
    template_id: str | None = None
    template_data: dict[str, Any] | None = None
    attachments: list[Attachment] | None = None
    from_: str | None = msgspec.field(name="from", default=None)
    tags: list[str] = []
    # Non-transactional mail gets List-Unsubscribe headers and honours unsubscribes.
    transactional: bool = True
    ignore_suppression: bool = False
    reply_to: str | None = None
    headers: dict[str, str] | None = None


class OutgoingAttachment(msgspec.Struct, kw_only=True):
    filename: str
    content_type: str
    content: bytes
    content_id: str | None = None


class OutgoingEmail(msgspec.Struct, kw_only=True):
    """What a provider is handed: rendered, tracked, addresses in the clear."""

    email_id: str
    # Our RFC 5322 Message-ID, angle brackets included.
    message_id: str
    from_: str
    to: list[str]
    cc: list[str] = []
    bcc: list[str] = []
    subject: str
    html: str | None = None
    text: str
    attachments: list[OutgoingAttachment] = []
    headers: dict[str, str] = {}
    tags: list[str] = []
    reply_to: str | None = None
    # Stable for the message's life: providers that support idempotency get it.
    idempotency_key: str

    @property
    def recipients(self) -> list[str]:
        return [*self.to, *self.cc, *self.bcc]

    def size(self) -> int:
        return (len(self.text.encode()) + len((self.html or "").encode())
                + sum(len(a.content) for a in self.attachments))


def bare_address(value: str) -> str:
    """``Name <a@b>`` → ``a@b``."""
    return email.utils.parseaddr(value)[1] or value.strip()


def check_address(value: Any, field: str) -> str:
    """A deliverable-looking address (syntax only, no DNS), normalised; ``Name <a@b>`` kept as such."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidEmail(field, "must be an email address")
    if len(value) > 320 or "\n" in value or "\r" in value:
        raise InvalidEmail(field, "is not a valid email address")
    name, address = email.utils.parseaddr(value)
    if not address:
        raise InvalidEmail(field, f"{value!r} is not a valid email address")
    try:
        checked = validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidEmail(field, f"{address!r} is not a valid email address ({exc})") from None
    normalised = checked.normalized
    return email.utils.formataddr((name, normalised)) if name else normalised


def decode_attachment(att: Attachment, field: str) -> OutgoingAttachment:
    name = att.filename.strip()
    if not name or len(name) > FILENAME_MAX or any(c in name for c in "/\\\r\n\0"):
        raise InvalidEmail(f"{field}.filename", f"must be 1–{FILENAME_MAX} characters without / \\ or newlines")
    if not CONTENT_TYPE_RE.match(att.content_type):
        raise InvalidEmail(f"{field}.content_type", f"{att.content_type!r} is not a MIME type")
    if att.content_id is not None and not CONTENT_ID_RE.match(att.content_id.strip("<>")):
        raise InvalidEmail(f"{field}.content_id", "must be 1–200 printable characters")
    try:
        content = base64.b64decode(att.content + "=" * (-len(att.content) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidEmail(f"{field}.content", "must be base64") from None
    return OutgoingAttachment(filename=name, content_type=att.content_type.lower(), content=content,
                              content_id=att.content_id.strip("<>") if att.content_id else None)


class CheckedRequest(msgspec.Struct, kw_only=True):
    """A request past the rules: addresses normalised, attachments decoded."""

    from_: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    attachments: list[OutgoingAttachment]
    tags: list[str]
    reply_to: str | None
    headers: dict[str, str]


FORBIDDEN_HEADERS = {"from", "to", "cc", "bcc", "subject", "message-id", "date", "content-type",
                     "content-transfer-encoding", "mime-version", "list-unsubscribe", "list-unsubscribe-post"}


def coerce_request(request: SendEmail) -> SendEmail:
    """The request with every field of the right type (callers may build one with plain dicts)."""
    try:
        return msgspec.convert(msgspec.to_builtins(request), SendEmail)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).partition(" - at `$.")
        raise InvalidEmail(path.rstrip("`") or "request", message) from None
    except TypeError as exc:
        raise InvalidEmail("request", str(exc)) from None


def validate_request(request: SendEmail, *, default_from: str, max_recipients: int, max_size: int) -> CheckedRequest:
    """Check everything that does not need the template; raises :class:`InvalidEmail`."""
    request = coerce_request(request)
    if not request.to:
        raise InvalidEmail("to", "at least one recipient is required")
    to = [check_address(a, f"to[{i}]") for i, a in enumerate(request.to)]
    cc = [check_address(a, f"cc[{i}]") for i, a in enumerate(request.cc or [])]
    bcc = [check_address(a, f"bcc[{i}]") for i, a in enumerate(request.bcc or [])]
    if len(to) + len(cc) + len(bcc) > max_recipients:
        raise InvalidEmail("to", f"at most {max_recipients} recipients (to, cc and bcc together)")
    sender = check_address(request.from_ or default_from, "from")
    reply_to = check_address(request.reply_to, "reply_to") if request.reply_to else None
    if request.subject is not None and len(request.subject) > SUBJECT_MAX:
        raise InvalidEmail("subject", f"at most {SUBJECT_MAX} characters ({len(request.subject)} given)")
    if request.subject is not None and ("\n" in request.subject or "\r" in request.subject):
        raise InvalidEmail("subject", "must be one line")
    if request.template_id is None and not request.html_body and not request.text_body:
        raise InvalidEmail("html_body", "html_body or text_body (or a template_id) is required")
    if request.template_data is not None:
        size = len(msgspec.json.encode(request.template_data))
        if size > TEMPLATE_DATA_MAX:
            raise InvalidEmail("template_data", f"at most {TEMPLATE_DATA_MAX} bytes as JSON ({size} given)")
    if len(request.tags) > MAX_TAGS:
        raise InvalidEmail("tags", f"at most {MAX_TAGS} tags")
    for i, tag in enumerate(request.tags):
        if not TAG_RE.match(tag):
            raise InvalidEmail(f"tags[{i}]", "1–64 letters, digits, _ or -")
    headers = dict(request.headers or {})
    for name, value in headers.items():
        if not re.match(r"^[A-Za-z0-9-]{1,76}$", name) or name.lower() in FORBIDDEN_HEADERS:
            raise InvalidEmail(f"headers.{name}", "not a header a caller may set")
        if "\n" in value or "\r" in value or len(value) > 998:
            raise InvalidEmail(f"headers.{name}", "must be one line of at most 998 characters")
    attachments = [decode_attachment(a, f"attachments[{i}]") for i, a in enumerate(request.attachments or [])]
    size = (len((request.html_body or "").encode()) + len((request.text_body or "").encode())
            + sum(len(a.content) for a in attachments))
    if size > max_size:
        raise InvalidEmail("attachments", f"the message is {size} bytes with attachments; at most {max_size}")
    return CheckedRequest(from_=sender, to=to, cc=cc, bcc=bcc, attachments=attachments, tags=list(request.tags),
                          reply_to=reply_to, headers=headers)


def check_rendered(subject: str | None, html: str | None, text: str | None) -> None:
    """The rules that hold after a template has filled the gaps."""
    if not subject or not subject.strip():
        raise InvalidEmail("subject", "is required (in the request or the template)")
    if len(subject) > SUBJECT_MAX:
        raise InvalidEmail("subject", f"at most {SUBJECT_MAX} characters ({len(subject)} after rendering)")
    if not (html or "").strip() and not (text or "").strip():
        raise InvalidEmail("html_body", "html_body or text_body is required")


def make_message_id(email_id: str, sender: str) -> str:
    domain = bare_address(sender).rpartition("@")[2] or "logferry.invalid"
    return f"<{email_id}@{domain}>"


# --- the lifecycle -------------------------------------------------------------


class EmailEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One normalised delivery or engagement event (the ``logferry_email_event`` payload)."""

    type: str
    email_id: str | None
    provider: str
    occurred_at: dt.datetime
    recipient_hash: str | None = None
    # Bounces: "hard" ends the message; "soft" is recorded only.
    severity: str | None = None
    reason: str | None = None
    url: str | None = None
    # Opens and clicks judged to be a security scanner's prefetch (not counted).
    suspected_scanner: bool = False
    raw: dict[str, Any] = {}


class Changes(msgspec.Struct, kw_only=True):
    """What an event changes on a stored EmailMessage (only the set fields)."""

    fields: dict[str, Any] = {}
    suppress_reason: str | None = None


def apply_event(message: dict[str, Any], event: EmailEvent) -> Changes:
    """The spec's state machine: SENT → DELIVERED | BOUNCED; a soft bounce is
    recorded without ending the message; first open/click times are kept;
    complaints and hard bounces suppress the recipient."""
    status = message.get("status")
    at = event.occurred_at
    out: dict[str, Any] = {}
    suppress = None
    if event.type == "delivered":
        if status in (QUEUED, SENT, FAILED):
            out["status"] = DELIVERED
        if message.get("delivered_at") is None:
            out["delivered_at"] = at
    elif event.type == "bounced":
        if event.severity == "hard":
            if status != BOUNCED:
                out["status"] = BOUNCED
            out["bounce_type"] = "hard"
            out["error_message"] = event.reason or "hard bounce"
            suppress = "hard_bounce"
        else:
            if message.get("bounce_type") != "hard":
                out["bounce_type"] = "soft"
            if event.reason:
                out["error_message"] = event.reason
    elif event.type == "complained":
        suppress = "complaint"
    elif event.type == "unsubscribed":
        suppress = "unsubscribed"
    elif event.type == "failed":
        if status in (QUEUED, SENT):
            out["status"] = FAILED
        out["error_message"] = event.reason or "the provider could not deliver the message"
    elif event.type == "opened" and not event.suspected_scanner:
        if message.get("opened_at") is None:
            out["opened_at"] = at
    elif event.type == "clicked" and not event.suspected_scanner:
        if message.get("clicked_at") is None:
            out["clicked_at"] = at
        if message.get("opened_at") is None:
            # A click implies the message was opened (the pixel may be blocked).
            out["opened_at"] = at
    return Changes(fields=out, suppress_reason=suppress)


def backoff_delay(retry_count: int, *, base: float, cap: float, jitter: float = 0.0) -> float:
    """Exponential backoff: base·2^(n-1), at most ``cap``; ``jitter`` ∈ [0, 1) spreads it by ±25 %."""
    delay = min(cap, base * (2 ** max(0, retry_count - 1)))
    return delay * (0.75 + 0.5 * jitter)
