"""Email providers are plugins (``logferry_register_email_providers``).

The built-ins (``smtp``, ``resend``, ``mailgun``) live beside this module
and are registered exactly as a third party's would be. This module turns
the configured ``collector.email.providers`` list into clients, validating
each entry against its provider's ``Options`` Struct so errors name
``collector.email.providers[1].api_key``.

A provider client has ``async send(email: OutgoingEmail) -> ProviderResult``
(:class:`SendResult` to add ``metadata``, e.g. ``{"refused": {address: reason}}``)
and ``async close()``. It raises ``TransientError`` for what a retry or the
next provider may fix (timeouts, 5xx, 429, connection errors) and
``PermanentError`` for a rejection. A client whose provider deduplicates on
``email.idempotency_key`` sets ``idempotent = True``: only then is a send cut
short by a stop repeated after a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import msgspec

from agent.configfile import ConfigError, ConfigInvalid, convert
from plugins.types import PermanentError, ProviderResult, TransientError

__all__ = ["PermanentError", "ProviderContext", "ProviderResult", "SendResult", "TransientError"]


class SendResult(ProviderResult, kw_only=True):
    """A provider's answer: its message id plus what else it said (refused recipients, …)."""

    metadata: dict[str, Any] = {}


class ProviderContext:
    """What ``create(options, context)`` receives: the shared HTTP session and a logger."""

    def __init__(self, http: aiohttp.ClientSession | None, *, name: str, index: int):
        self.http = http
        self.name = name
        self.index = index
        self.logger = logging.getLogger(f"logferry.email.{name}")


class ConfiguredProvider(msgspec.Struct, kw_only=True):
    """One entry of ``collector.email.providers``, built."""

    index: int
    type: str
    # The stored EmailMessage.provider name (upper case, e.g. RESEND).
    label: str
    client: Any


def validate_provider_options(entries: Sequence[Mapping[str, Any]], registry: Mapping[str, Any],
                              base_path: str = "collector.email.providers") -> list[tuple[int, str, Any]]:
    """``[(index, type, Options instance)]`` or :class:`ConfigInvalid` with every error."""
    errors: list[ConfigError] = []
    out: list[tuple[int, str, Any]] = []
    for i, entry in enumerate(entries):
        path = f"{base_path}[{i}]"
        kind = entry.get("type")
        if not isinstance(kind, str) or kind not in registry:
            known = ", ".join(sorted(registry)) or "none"
            errors.append(ConfigError(f"{path}.type", f"unknown email provider {kind!r} (installed: {known})"))
            continue
        options_type = registry[kind].Options
        values = {k: v for k, v in entry.items() if k != "type"}
        try:
            out.append((i, kind, convert(values, options_type, base_path=path)))
        except ConfigInvalid as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigInvalid(errors)
    return out


def create_providers(entries: Sequence[Mapping[str, Any]], registry: Mapping[str, Any],
                     http: aiohttp.ClientSession | None) -> list[ConfiguredProvider]:
    built = []
    for index, kind, options in validate_provider_options(entries, registry):
        provider_type = registry[kind]
        client = provider_type.create(options, ProviderContext(http, name=kind, index=index))
        built.append(ConfiguredProvider(index=index, type=kind, label=kind.upper(), client=client))
    return built


def classify_http_status(status: int, body: str, provider: str) -> Exception:
    """The error for a non-2xx answer: 408/409/425/429/5xx are worth retrying, other 4xx are not."""
    text = f"{provider} answered {status}: {body[:300]}"
    if status in (408, 409, 425, 429) or status >= 500:
        return TransientError(text)
    return PermanentError(text)
