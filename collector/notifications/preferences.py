"""Notification preferences and how they decide delivery.

Pure domain code: a :class:`Preference` per user and notification type,
:class:`QuietHours` in the user's IANA timezone (windows may cross midnight;
DST is handled by ``zoneinfo``), and :func:`plan_delivery`, which turns a
notification plus the preference into a :class:`DeliveryPlan`: the channels to
use, when, and whether to batch.

The rules (data-model.md):
- a type with no preference goes by the default channels (email only);
- CRITICAL overrides every preference: disabled types, channel choices,
  quiet hours and batching;
- HIGH is never delayed by batching (quiet hours still apply to it);
- quiet hours defer, never drop, to the window's end.
"""

from __future__ import annotations

import datetime as dt
import enum
import zoneinfo
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import msgspec

from collector.notifications.config import parse_local_time
from collector.notifications.model import BUILTIN_CHANNELS, Priority, normalise_channel, utc


class Frequency(enum.Enum):
    INSTANT = "INSTANT"
    BATCHED_5MIN = "BATCHED_5MIN"
    BATCHED_HOURLY = "BATCHED_HOURLY"
    DAILY_DIGEST = "DAILY_DIGEST"


@lru_cache(maxsize=1024)
def timezone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name``; ValueError for an unknown one."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {name!r}") from None


def check_timezone(name: str) -> str:
    timezone(name)
    return name


def local_instant(day: dt.date, at: dt.time, tz: dt.tzinfo) -> dt.datetime:
    """The UTC instant of wall-clock ``at`` on ``day`` in ``tz``.

    A wall time skipped by a DST jump (02:30 on a spring-forward night) maps to
    the instant the clocks jump over it (03:00 local); a repeated one (fall back)
    to its first occurrence.
    """
    naive = dt.datetime.combine(day, at)
    aware = naive.replace(tzinfo=tz, fold=0)
    instant = aware.astimezone(dt.UTC)
    # A nonexistent wall time does not survive the round trip: it lies in the gap.
    if instant.astimezone(tz).replace(tzinfo=None) != naive:
        # The gap's end is the first instant whose local time is past ``naive``;
        # fold=1 resolves with the post-transition offset, landing before it.
        after = naive.replace(tzinfo=tz, fold=1).astimezone(dt.UTC)
        before = instant
        gap_start, gap_end = min(before, after), max(before, after)
        # Walk to the transition: the first minute whose local time is past naive.
        probe = gap_start
        while probe < gap_end and probe.astimezone(tz).replace(tzinfo=None) < naive:
            probe += dt.timedelta(minutes=1)
        return probe.replace(second=0, microsecond=0)
    return instant


class QuietHours(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Local ``start``–``end`` (``"22:00"``–``"08:00"``) in ``timezone``; a window
    with ``start`` after ``end`` crosses midnight."""

    start: str
    end: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        begin = parse_local_time(self.start, "quiet_hours.start")
        finish = parse_local_time(self.end, "quiet_hours.end")
        if begin == finish:
            raise ValueError("quiet_hours.start and quiet_hours.end must differ")
        try:
            check_timezone(self.timezone)
        except ValueError as exc:
            raise ValueError(f"quiet_hours.timezone: {exc}") from None

    def end_of_quiet(self, now: dt.datetime) -> dt.datetime | None:
        """If ``now`` falls inside the quiet hours, the UTC instant they end; else None.

        When a DST jump swallows a day's whole window between quiet hours
        (02:30–02:15 on a spring-forward night: both map to 03:00), the quiet
        hours go on to the next window: the instant returned is never itself quiet."""
        end = self._end_after(now)
        for _ in range(3):  # at most one swallowed window a day, one jump a night
            if end is None:
                break
            later = self._end_after(end)
            if later is None:
                return end
            end = later
        return end

    def _end_after(self, now: dt.datetime) -> dt.datetime | None:
        tz = timezone(self.timezone)
        begin = parse_local_time(self.start, "start")
        finish = parse_local_time(self.end, "end")
        local = utc(now).astimezone(tz)
        wall = local.time().replace(tzinfo=None)
        today = local.date()
        if begin < finish:
            if begin <= wall < finish:
                return local_instant(today, finish, tz)
            return None
        # Crosses midnight: [begin, 24:00) ∪ [00:00, finish).
        if wall >= begin:
            return local_instant(today + dt.timedelta(days=1), finish, tz)
        if wall < finish:
            return local_instant(today, finish, tz)
        return None


class PreferenceInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``PUT /v1/me/preferences/{type}``."""

    enabled: bool = True
    channels: dict[str, bool] = msgspec.field(default_factory=lambda: {"email": True})
    quiet_hours: QuietHours | None = None
    frequency: str = "INSTANT"

    def __post_init__(self) -> None:
        channels: dict[str, bool] = {}
        for name, on in self.channels.items():
            key = normalise_channel(name)
            if not key:
                raise ValueError("channels: empty channel name")
            channels[key] = bool(on)
        for name in BUILTIN_CHANNELS:
            channels.setdefault(name, False)
        if not any(channels.values()):
            raise ValueError("channels: at least one channel must be enabled")
        self.channels = channels
        name = self.frequency.strip().upper()
        if name not in Frequency.__members__:
            raise ValueError(f"frequency must be one of {', '.join(Frequency.__members__)}")
        self.frequency = name


class Preference(msgspec.Struct, kw_only=True):
    """A stored NotificationPreference (user_id + notification_type is unique)."""

    id: str
    user_id: str
    notification_type: str
    enabled: bool
    channels: dict[str, bool]
    quiet_hours: QuietHours | None
    frequency: Frequency
    created_at: dt.datetime
    updated_at: dt.datetime

    def enabled_channels(self) -> list[str]:
        return [name for name, on in self.channels.items() if on]

    def to_dict(self) -> dict[str, Any]:
        from collector.notifications.model import iso

        return {
            "id": self.id,
            "user_id": self.user_id,
            "notification_type": self.notification_type,
            "enabled": self.enabled,
            "channels": dict(self.channels),
            "quiet_hours": msgspec.to_builtins(self.quiet_hours) if self.quiet_hours else None,
            "frequency": self.frequency.value,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


class DeliveryPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What to do with a notification.

    ``channels`` empty means: nothing may be sent (``reason`` says why) and the
    notification is cancelled. ``due_at`` is when to send (scheduled time,
    quiet hours or the batching window's close). ``frequency`` other than
    INSTANT means the notification joins the digest of ``digest_key``.
    """

    channels: tuple[str, ...]
    due_at: dt.datetime
    frequency: Frequency = Frequency.INSTANT
    digest_key: str | None = None
    reason: str | None = None

    @property
    def batched(self) -> bool:
        return self.frequency is not Frequency.INSTANT


def window_close(frequency: Frequency, at: dt.datetime, tz: dt.tzinfo, digest_time: dt.time) -> dt.datetime:
    """The end of the fixed window containing ``at``, aligned to ``tz``'s wall clock.

    BATCHED_5MIN: windows :00–:05, :05–:10, … local; BATCHED_HOURLY: local hours;
    DAILY_DIGEST: the next ``digest_time`` local after ``at`` (windows run from
    one digest time to the next). An instant exactly on a boundary opens the
    next window.
    """
    local = utc(at).astimezone(tz)
    if frequency is Frequency.DAILY_DIGEST:
        candidate = local_instant(local.date(), digest_time, tz)
        if candidate <= utc(at):
            candidate = local_instant(local.date() + dt.timedelta(days=1), digest_time, tz)
        return candidate
    if frequency is Frequency.BATCHED_HOURLY:
        # Hours are counted on the UTC-offset-shifted clock, so windows stay one
        # real hour long across DST changes and align with local hours.
        offset = local.utcoffset() or dt.timedelta(0)
        shifted = utc(at) + offset
        start = shifted.replace(minute=0, second=0, microsecond=0)
        return start + dt.timedelta(hours=1) - offset
    if frequency is Frequency.BATCHED_5MIN:
        offset = local.utcoffset() or dt.timedelta(0)
        shifted = utc(at) + offset
        start = shifted.replace(minute=shifted.minute - shifted.minute % 5, second=0, microsecond=0)
        return start + dt.timedelta(minutes=5) - offset
    return utc(at)


def plan_delivery(
    *,
    user_id: str,
    notification_type: str,
    priority: Priority,
    requested: Sequence[str],
    reference: dt.datetime,
    preference: Preference | None,
    default_channels: Iterable[str],
    user_timezone: str,
    digest_time: dt.time,
) -> DeliveryPlan:
    """Decide channels and timing of one notification.

    ``reference`` is when it became due on its own terms: its creation time, or
    ``scheduled_for`` if later, or the retry time. Deterministic in its inputs,
    so a restarted collector re-plans a waiting notification into the same
    window (and the same digest) as before.
    """
    due = utc(reference)
    if priority is Priority.CRITICAL:
        return DeliveryPlan(channels=tuple(requested), due_at=due)
    if preference is None:
        allowed = set(default_channels)
        chosen = tuple(c for c in requested if c in allowed)
        if not chosen:
            return DeliveryPlan(channels=(), due_at=due, reason=(
                f"no preference for type {notification_type!r}; the default channels "
                f"({', '.join(sorted(allowed))}) include none of those requested"))
        return DeliveryPlan(channels=chosen, due_at=due)
    if not preference.enabled:
        return DeliveryPlan(channels=(), due_at=due,
                            reason=f"the user disabled notifications of type {notification_type!r}")
    enabled = set(preference.enabled_channels())
    chosen = tuple(c for c in requested if c in enabled)
    if not chosen:
        return DeliveryPlan(channels=(), due_at=due, reason=(
            f"the user's preference for type {notification_type!r} enables none of the requested channels"))
    frequency = preference.frequency
    if priority is Priority.HIGH:
        frequency = Frequency.INSTANT
    digest_key = None
    if frequency is not Frequency.INSTANT:
        tz_name = user_timezone or (preference.quiet_hours.timezone if preference.quiet_hours else "UTC")
        due = window_close(frequency, due, timezone(tz_name), digest_time)
    if preference.quiet_hours is not None:
        quiet_end = preference.quiet_hours.end_of_quiet(due)
        if quiet_end is not None:
            due = quiet_end
    if frequency is not Frequency.INSTANT:
        digest_key = f"{user_id}|{frequency.value}|{int(due.timestamp() * 1000)}"
    return DeliveryPlan(channels=chosen, due_at=due, frequency=frequency, digest_key=digest_key)
