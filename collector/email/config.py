"""The ``collector.email:`` section.

Only shapes and defaults live here (no heavy imports): each provider entry is
a mapping with a ``type`` and that provider's own options, validated at
start-up against the provider plugin's ``Options`` Struct by
:func:`collector.email.providers.load_providers`, so errors name
``collector.email.providers[1].api_key``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from agent.configfile import ByteSize, Duration

# User-agent fragments of security scanners that prefetch links in mail.
SCANNER_AGENTS: tuple[str, ...] = (
    "barracuda", "mimecast", "proofpoint", "urldefense", "safelinks", "messagelabs", "symantec",
    "trendmicro", "trend micro", "zscaler", "forcepoint", "bingpreview", "google-safety",
    "microsoft office", "ms-office", "cisco", "ironport", "sophos", "fireeye", "python-requests",
    "go-http-client", "curl/", "wget/", "headlesschrome",
)


class EmailWebhooksConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Mailgun's "HTTP webhook signing key" (not the API key); empty refuses every Mailgun webhook.
    mailgun_signing_key: str = ""
    # Resend's (Svix) endpoint secret, `whsec_…`; empty refuses every Resend webhook.
    resend_secret: str = ""
    # Signed timestamps further than this from our clock are refused (replays, stale retries).
    tolerance: Duration = Duration(300.0)

    def __post_init__(self) -> None:
        if self.resend_secret and not self.resend_secret.startswith("whsec_"):
            raise ValueError("resend_secret must be the endpoint secret that starts with `whsec_`")
        if self.tolerance <= 0:
            raise ValueError("tolerance must be positive")


class EmailRetryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Rounds through every provider before a message is FAILED (the first round counts).
    max_attempts: int = 6
    # Wait before the first retry; doubled each round (with jitter) up to max_delay.
    base_delay: Duration = Duration(30.0)
    # Longest wait between two rounds.
    max_delay: Duration = Duration(3600.0)

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 50:
            raise ValueError("max_attempts must be 1–50")
        if self.base_delay <= 0 or self.max_delay < self.base_delay:
            raise ValueError("base_delay must be positive and max_delay at least base_delay")


class EmailTrackingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Add an open pixel (/t/o/{token}) to HTML mail.
    opens: bool = True
    # Wrap http(s) links in /t/c/{token} redirects (mailto:, unsubscribe and data-no-track links are left alone).
    clicks: bool = True
    # An open or click this soon after the send, from a request that looks automated,
    # is flagged as a security-scanner prefetch and not counted.
    scanner_window: Duration = Duration(10.0)
    # User-agent fragments (case-insensitive) of link scanners; a hit is never counted.
    scanner_agents: list[str] = msgspec.field(default_factory=lambda: list(SCANNER_AGENTS))

    def __post_init__(self) -> None:
        self.scanner_agents = [a.lower() for a in self.scanner_agents if a]




class EmailSuppressionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Suppress addresses that hard-bounce, complain or unsubscribe; sends to them fail fast.
    enabled: bool = True
    # A send may set `ignore_suppression: true` (admin/service tokens) to override.
    allow_override: bool = True


class EmailConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Default sender, `Name <address>` or a bare address.
    from_: str = msgspec.field(name="from", default="logferry <noreply@example.com>")
    # Tried in order (failover on transient errors); each item has a `type`
    # (smtp, resend, mailgun or a plugin's) and that provider's own options.
    providers: list[dict[str, Any]] = []
    webhooks: EmailWebhooksConfig = msgspec.field(default_factory=EmailWebhooksConfig)
    # Folder of `<template_id>.html`, `<template_id>.txt` and `<template_id>.subject.txt`
    # Jinja2 templates; looked up before the built-in templates.
    templates: str | None = None
    retries: EmailRetryConfig = msgspec.field(default_factory=EmailRetryConfig)
    tracking: EmailTrackingConfig = msgspec.field(default_factory=EmailTrackingConfig)
    suppression: EmailSuppressionConfig = msgspec.field(default_factory=EmailSuppressionConfig)
    # Messages handed to providers at the same time (queue workers).
    concurrency: int = 8
    # Largest message: bodies plus decoded attachments (the spec: 25 MB).
    max_size: ByteSize = ByteSize(25 * 1024 * 1024)
    # Most recipients (to + cc + bcc) of one message.
    max_recipients: int = 50
    # Longest one send may take end to end before it counts as a transient failure.
    send_timeout: Duration = Duration(30.0)

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 256:
            raise ValueError("concurrency must be 1–256")
        if not 1 <= self.max_recipients <= 1000:
            raise ValueError("max_recipients must be 1–1000")
        if self.max_size <= 0:
            raise ValueError("max_size must be positive")
        for i, entry in enumerate(self.providers):
            kind = entry.get("type") if isinstance(entry, dict) else None
            if not isinstance(kind, str) or not kind:
                raise ValueError(f"providers[{i}]: every provider needs a `type` (smtp, resend, mailgun, …)")
