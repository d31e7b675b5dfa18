"""A contact-form submission as received: its fields, its files, their rules.

Pure validation (no HTTP, no storage): the route turns JSON, urlencoded and
multipart bodies into :class:`ContactInput`, and :func:`validate` either
returns the cleaned input or raises :class:`InvalidSubmission` naming the
field and the limit.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
import unicodedata
import urllib.parse

import msgspec
from email_validator import EmailNotValidError, validate_email

from collector.contact.config import ContactConfig

MAX_NAME = 200
MAX_SUBJECT = 200
MAX_PHONE = 40
MAX_FILENAME = 200
MAX_USER_AGENT = 1000
MAX_REFERRER = 2000

_PHONE = re.compile(r"^\+?[0-9 ()./-]{5,40}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class InvalidSubmission(ValueError):
    """A field breaks a rule; ``field`` names it, the message says the limit."""

    def __init__(self, field: str, message: str, *, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


class AttachmentUpload(msgspec.Struct, kw_only=True):
    filename: str
    content_type: str
    content: bytes


class ContactInput(msgspec.Struct, kw_only=True):
    """The form's fields as submitted (before validation)."""

    name: str = ""
    email: str = ""
    phone: str | None = None
    subject: str = ""
    message: str = ""
    attachments: list[AttachmentUpload] = []
    # The honeypot field's value (whatever the configured field is called).
    honeypot: str = ""
    # The signed timestamp the form page embedded.
    form_token: str | None = None
    # The page the form was embedded in, as the hosted page recorded it.
    referrer: str | None = None


class AttachmentMeta(msgspec.Struct, kw_only=True):
    """What the submission row says about one stored file."""

    idx: int
    filename: str
    size: int
    content_type: str
    sha256: str


def _clean_line(value: str) -> str:
    return " ".join(_CONTROL.sub("", unicodedata.normalize("NFC", value)).split())


def _clean_text(value: str) -> str:
    text = _CONTROL.sub("", unicodedata.normalize("NFC", value).replace("\r\n", "\n").replace("\r", "\n"))
    return text.strip()


def normalise_email_address(address: str) -> str:
    """The address in its normalised form, or InvalidSubmission (via the
    installed ``email-validator``; no DNS lookups on the request path)."""
    try:
        result = validate_email(address.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidSubmission("email", f"not a valid email address ({exc})") from None
    return str(result.normalized)


def validate(data: ContactInput, config: ContactConfig) -> ContactInput:
    """The cleaned input, or InvalidSubmission for the first broken rule."""
    name = _clean_line(data.name)
    if len(name) > MAX_NAME:
        raise InvalidSubmission("name", f"at most {MAX_NAME} characters")
    if not data.email.strip():
        raise InvalidSubmission("email", "required")
    if len(data.email) > 320:
        raise InvalidSubmission("email", "at most 320 characters")
    email = normalise_email_address(data.email)
    phone = _clean_line(data.phone) if data.phone else None
    if phone:
        if len(phone) > MAX_PHONE or not _PHONE.match(phone) or sum(ch.isdigit() for ch in phone) < 5:
            raise InvalidSubmission("phone", f"a phone number: digits, spaces, + ( ) . / -, at most {MAX_PHONE}")
    else:
        phone = None
    subject = _clean_line(data.subject)
    if len(subject) > MAX_SUBJECT:
        raise InvalidSubmission("subject", f"at most {MAX_SUBJECT} characters")
    message = _clean_text(data.message)
    if not message:
        raise InvalidSubmission("message", "required")
    size = len(message.encode("utf-8"))
    if size > config.max_message:
        raise InvalidSubmission("message", f"at most {config.max_message} bytes (got {size})", status=413)
    attachments = validate_attachments(data.attachments, config)
    referrer = (data.referrer or "").strip()[:MAX_REFERRER] or None
    return ContactInput(
        name=name, email=email, phone=phone, subject=subject, message=message, attachments=attachments,
        honeypot=data.honeypot.strip(), form_token=(data.form_token or "").strip() or None, referrer=referrer,
    )


# --- attachments ---------------------------------------------------------------------

# First bytes of the file types we accept, and of executables we never accept.
_MAGIC: list[tuple[bytes, str]] = [
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"PK\x03\x04", "application/zip"),
]
_EXECUTABLE = (b"MZ", b"\x7fELF", b"#!", b"\xca\xfe\xba\xbe", b"\xcf\xfa\xed\xfe", b"\xfe\xed\xfa\xcf")
_ZIP_BASED = {
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/vnd.oasis.opendocument.text",
    "application/vnd.oasis.opendocument.spreadsheet",
    "application/zip",
}


def sniff_content_type(content: bytes) -> str | None:
    """The type the first bytes prove, when they prove one."""
    if content[:12].startswith(b"RIFF") and content[8:12] == b"WEBP":
        return "image/webp"
    for magic, ctype in _MAGIC:
        if content.startswith(magic):
            return ctype
    return None


def _safe_filename(filename: str, idx: int) -> str:
    # Only the last path component, also of a percent-encoded path (some clients send those).
    base = re.split(r"[\\/]", urllib.parse.unquote(filename))[-1]
    base = _CONTROL.sub("", unicodedata.normalize("NFC", base)).strip().strip(".") or f"attachment-{idx + 1}"
    return base[:MAX_FILENAME]


def _declared_type(upload: AttachmentUpload, filename: str) -> str:
    declared = (upload.content_type or "").split(";")[0].strip().lower()
    if declared in ("", "application/octet-stream"):
        guessed, _ = mimetypes.guess_type(filename)
        declared = (guessed or "application/octet-stream").lower()
    return declared


def validate_attachments(uploads: list[AttachmentUpload], config: ContactConfig) -> list[AttachmentUpload]:
    limits = config.attachments
    if len(uploads) > limits.max_count:
        raise InvalidSubmission("attachments", f"at most {limits.max_count} files (got {len(uploads)})",
                                status=413 if limits.max_count else 400)
    total = 0
    cleaned = []
    for idx, upload in enumerate(uploads):
        filename = _safe_filename(upload.filename, idx)
        size = len(upload.content)
        if size == 0:
            raise InvalidSubmission(f"attachments[{idx}]", f"{filename!r} is empty")
        if size > limits.max_size:
            raise InvalidSubmission(f"attachments[{idx}]", f"{filename!r} is {size} bytes; each file may be at "
                                                           f"most {limits.max_size} bytes", status=413)
        total += size
        if total > limits.max_total:
            raise InvalidSubmission("attachments", f"the files total more than {limits.max_total} bytes",
                                    status=413)
        declared = _declared_type(upload, filename)
        if declared not in limits.allowed_types:
            raise InvalidSubmission(f"attachments[{idx}]", f"{filename!r}: type {declared} is not accepted "
                                                           f"(accepted: {', '.join(limits.allowed_types)})",
                                    status=415)
        head = upload.content[:16]
        if head.startswith(_EXECUTABLE):
            raise InvalidSubmission(f"attachments[{idx}]", f"{filename!r} is an executable", status=415)
        sniffed = sniff_content_type(upload.content)
        agrees = (sniffed is None and declared.startswith("text/")) or sniffed == declared or (
            sniffed == "application/zip" and declared in _ZIP_BASED)
        if not agrees:
            if declared.startswith("text/"):
                raise InvalidSubmission(f"attachments[{idx}]", f"{filename!r} is not {declared}", status=415)
            raise InvalidSubmission(f"attachments[{idx}]", f"{filename!r}: the content is not {declared}",
                                    status=415)
        if declared.startswith("text/"):
            try:
                upload.content.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidSubmission(f"attachments[{idx}]", f"{filename!r} is not UTF-8 text",
                                        status=415) from None
        cleaned.append(AttachmentUpload(filename=filename, content_type=declared, content=upload.content))
    return cleaned


def attachment_meta(uploads: list[AttachmentUpload]) -> list[AttachmentMeta]:
    return [AttachmentMeta(idx=i, filename=u.filename, size=len(u.content), content_type=u.content_type,
                           sha256=hashlib.sha256(u.content).hexdigest()) for i, u in enumerate(uploads)]
