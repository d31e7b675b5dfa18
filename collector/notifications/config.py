"""The ``collector.notifications`` section of the config file.

Each channel plugin validates its own options (``channels.<name>``) with its
``Options`` Struct when the collector starts, so errors name the YAML path
(``collector.notifications.channels.sms.account_sid: required key is missing``).
Kept free of heavy imports: the config loader imports it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from agent.configfile import Duration


def parse_local_time(value: str, what: str) -> dt.time:
    """``"09:00"`` → ``time(9, 0)``; a ValueError names ``what``."""
    try:
        hours, minutes = value.strip().split(":")
        if len(minutes) != 2:
            raise ValueError
        return dt.time(int(hours), int(minutes))
    except ValueError:
        raise ValueError(f"{what} must be a local time HH:MM (24-hour), got {value!r}") from None


class RetryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Attempts per delivery, the first included, before it fails for good.
    max_attempts: int = 5
    # Delay before the first retry; doubled for each further one (exponential backoff).
    base_delay: Duration = Duration(2.0)
    # Upper bound of one delay.
    max_delay: Duration = Duration(600.0)
    # Each delay is spread by up to this fraction either way (jitter), so retries do not stampede.
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 50:
            raise ValueError("max_attempts must be between 1 and 50")
        if self.base_delay <= 0 or self.max_delay < self.base_delay:
            raise ValueError("base_delay must be positive and max_delay at least base_delay")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")


class NotificationsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A second notification with the same user and dedup_key within this window is not created.
    dedup_window: Duration = Duration(300.0)
    # Channels of a notification type the user has no preference for (the spec: email only).
    default_channels: list[str] = msgspec.field(default_factory=lambda: ["email"])
    # Local time (in the user's timezone) at which DAILY_DIGEST notifications are sent.
    digest_time: str = "09:00"
    # Retries of transient channel errors.
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    # Channel sends in flight at once across all notifications.
    max_concurrent_sends: int = 64
    # How long a cached preference or user record is trusted without re-reading storage
    # (writes through this collector invalidate at once; this bounds staleness across collectors).
    cache_ttl: Duration = Duration(60.0)
    # Keep-alive comment interval of GET /v1/me/notifications/stream.
    stream_heartbeat: Duration = Duration(15.0)
    # Per-channel options, validated by each channel plugin's Options Struct, e.g.
    # sms: {account_sid, auth_token, from, base_url}; push: {vapid_private_key, subject}.
    # A channel whose options need keys (sms, push) is enabled by listing it here.
    channels: dict[str, dict[str, Any]] = {}

    def __post_init__(self) -> None:
        if self.dedup_window <= 0:
            raise ValueError("dedup_window must be positive")
        if not self.default_channels:
            raise ValueError("default_channels must name at least one channel")
        self.default_channels = [c.strip().lower().replace("-", "_") for c in self.default_channels]
        parse_local_time(self.digest_time, "digest_time")
        if not 1 <= self.max_concurrent_sends <= 10_000:
            raise ValueError("max_concurrent_sends must be between 1 and 10000")

    @property
    def digest_local_time(self) -> dt.time:
        return parse_local_time(self.digest_time, "digest_time")
