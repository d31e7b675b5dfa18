"""The ``collector.contact:`` section: contact-form intake, spam scoring and limits.

Kept free of heavy imports: the config loader imports it.
"""

from __future__ import annotations

import re

import msgspec

from agent.configfile import ByteSize, Duration

_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")

# Content types accepted as attachments unless configured otherwise: documents,
# images and plain text a customer plausibly sends, nothing executable.
DEFAULT_ATTACHMENT_TYPES = [
    "application/pdf",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "text/plain",
    "text/csv",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.oasis.opendocument.text",
]


class AttachmentLimits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Most files one submission may carry (0 refuses attachments).
    max_count: int = 5
    # Largest single file.
    max_size: ByteSize = ByteSize(5 * 1024 * 1024)
    # Largest sum of a submission's files (they are stored, so keep this bounded).
    max_total: ByteSize = ByteSize(10 * 1024 * 1024)
    # Accepted content types; the file's first bytes must agree (no executables).
    allowed_types: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_ATTACHMENT_TYPES))
    # Stored attachments are deleted after this long (ClickHouse TTL of the table).
    retention: Duration = Duration(90 * 86400)

    def __post_init__(self) -> None:
        if self.max_count < 0 or self.max_count > 50:
            raise ValueError("max_count must be between 0 and 50")
        if self.max_size <= 0 or self.max_total < self.max_size:
            raise ValueError("max_size must be positive and at most max_total")
        if self.max_total > 25 * 1024 * 1024:
            raise ValueError("max_total must be at most 25MiB (attachments are stored in ClickHouse)")
        for t in self.allowed_types:
            if "/" not in t:
                raise ValueError(f"allowed_types: {t!r} is not a content type")
        self.allowed_types = [t.lower() for t in self.allowed_types]


class RateLimits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The sliding window the counts below are taken over.
    window: Duration = Duration(3600)
    # Submissions per client IP (counted by keyed hash) in the window before the
    # rate signal starts adding to the spam score.
    per_ip: int = 5
    # Submissions per sender email (keyed hash) in the window before the signal.
    per_email: int = 3
    # Beyond this many per IP in the window, answer 429 and store nothing (flood guard).
    hard_per_ip: int = 30

    def __post_init__(self) -> None:
        if self.window <= 0:
            raise ValueError("window must be positive")
        if min(self.per_ip, self.per_email) < 1:
            raise ValueError("per_ip and per_email must be at least 1")
        if self.hard_per_ip < self.per_ip:
            raise ValueError("hard_per_ip must be at least per_ip")


class SpamConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A submission whose summed signal scores reach this is stored as SPAM. Most
    # single signals score 1–3, so the default asks for two strong ones (or the honeypot).
    threshold: float = 4.0
    # Forms submitted faster than this after the page was served look automated.
    min_time_to_submit: Duration = Duration(3.0)
    # A form token older than this is stale (the page sat open for days, or was scraped).
    form_token_max_age: Duration = Duration(86400.0)
    # Identical messages (normalised) seen within this window count as repeats.
    duplicate_window: Duration = Duration(86400.0)
    # Scripts (Unicode) expected in legitimate messages; text mostly in other
    # scripts adds a small score. Names: Latin, Cyrillic, Greek, Han, Hiragana,
    # Katakana, Hangul, Arabic, Hebrew, Devanagari, Thai.
    expected_scripts: list[str] = msgspec.field(default_factory=lambda: ["Latin"])
    # Further disposable email domains, on top of the built-in list.
    disposable_domains: list[str] = []
    # Further spam phrases (case-insensitive), each adding `phrase_score`.
    phrases: list[str] = []
    # Score of each configured phrase.
    phrase_score: float = 1.5
    # Override a built-in signal's score by name (e.g. {"disposable_email": 4.0}).
    weights: dict[str, float] = {}
    # Spam classifier plugins (by registered name) not to run.
    disabled_classifiers: list[str] = []
    # Seconds one classifier may take before its verdict is skipped (remote ones).
    classifier_timeout: Duration = Duration(2.0)

    def __post_init__(self) -> None:
        if self.threshold <= 0:
            raise ValueError("threshold must be positive")
        known = {"Latin", "Cyrillic", "Greek", "Han", "Hiragana", "Katakana", "Hangul", "Arabic", "Hebrew",
                 "Devanagari", "Thai"}
        for name in self.expected_scripts:
            if name not in known:
                raise ValueError(f"expected_scripts: unknown script {name!r} (known: {', '.join(sorted(known))})")
        self.disposable_domains = [d.strip().lower() for d in self.disposable_domains]
        from collector.contact.spam import DEFAULT_WEIGHTS

        unknown = sorted(set(self.weights) - set(DEFAULT_WEIGHTS))
        if unknown:
            raise ValueError(f"weights: unknown signal(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(DEFAULT_WEIGHTS))})")


class ContactConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Serve the public contact endpoints (POST /v1/contact, GET /contact).
    enabled: bool = True
    # Title of the hosted form page at GET /contact.
    form_title: str = "Contact us"
    # Text of the thank-you page.
    thank_you_message: str = "Thank you! Your message has been received; we will get back to you soon."
    # Name of the hidden honeypot field; humans leave it empty, bots fill it.
    honeypot_field: str = "website"
    # Origins allowed to post from other sites (CORS), e.g. ["https://www.example.com"]; "*" for any.
    cors_origins: list[str] = []
    # Largest message, in bytes of UTF-8 (the spec: 10 KB).
    max_message: ByteSize = ByteSize(10 * 1024)
    attachments: AttachmentLimits = msgspec.field(default_factory=AttachmentLimits)
    rate_limits: RateLimits = msgspec.field(default_factory=RateLimits)
    spam: SpamConfig = msgspec.field(default_factory=SpamConfig)
    # User ids (of the users directory) notified of each new non-spam submission;
    # passed to pipelines as `event.admins`.
    admin_recipients: list[str] = []
    # Publish a `contact_form` event when an admin rescues a submission from SPAM,
    # so the acknowledgement and admin notification happen after all.
    publish_on_rescue: bool = True

    def __post_init__(self) -> None:
        if not _FIELD_NAME.match(self.honeypot_field):
            raise ValueError("honeypot_field must be a plain field name (letters, digits, _ and -)")
        if self.honeypot_field in {"name", "email", "phone", "subject", "message", "attachments"}:
            raise ValueError("honeypot_field must not be one of the form's real fields")
        if not 0 < self.max_message <= 1024 * 1024:
            raise ValueError("max_message must be between 1 byte and 1MiB")
        for origin in self.cors_origins:
            if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
                raise ValueError(f"cors_origins: {origin!r} must be '*' or scheme://host[:port] without a path")
        if not self.form_title.strip() or len(self.form_title) > 200:
            raise ValueError("form_title must be 1–200 characters")
