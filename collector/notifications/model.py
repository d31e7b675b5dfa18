"""The notification domain: what a notification is, what may be asked for,
and which state changes are allowed.

Pure Python: no HTTP, no storage. The service and the repository call into it.

State machine (data-model.md):

    PENDING → QUEUED → SENT
    PENDING → CANCELLED
    QUEUED → FAILED → QUEUED (retry)

Every other change is refused with :class:`InvalidTransition`. A delivery
(one per notification and channel) moves one way only:
PENDING → SENT → DELIVERED, and PENDING or SENT → FAILED.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from typing import Any

import msgspec

# Field limits (checked on input; errors name the field and the limit).
MAX_TITLE_CHARS = 200
MAX_MESSAGE_BYTES = 10 * 1024
MAX_DATA_BYTES = 16 * 1024
MAX_USER_ID_CHARS = 200
MAX_TYPE_CHARS = 100
MAX_DEDUP_KEY_CHARS = 200
MAX_CHANNELS = 10
MAX_SCHEDULE_AHEAD = dt.timedelta(days=365)
TYPE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$")

# The built-in channel names; third-party channel plugins add their own.
EMAIL = "email"
SMS = "sms"
PUSH = "push"
IN_APP = "in_app"
BUILTIN_CHANNELS = (EMAIL, SMS, PUSH, IN_APP)


class Priority(enum.IntEnum):
    """Higher goes first. CRITICAL overrides every preference."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4


class Status(enum.Enum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    SENT = "SENT"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class DeliveryStatus(enum.Enum):
    PENDING = "PENDING"
    SENT = "SENT"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.QUEUED, Status.CANCELLED}),
    Status.QUEUED: frozenset({Status.SENT, Status.FAILED}),
    Status.FAILED: frozenset({Status.QUEUED}),
    Status.SENT: frozenset(),
    Status.CANCELLED: frozenset(),
}

DELIVERY_TRANSITIONS: dict[DeliveryStatus, frozenset[DeliveryStatus]] = {
    DeliveryStatus.PENDING: frozenset({DeliveryStatus.SENT, DeliveryStatus.FAILED}),
    DeliveryStatus.SENT: frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.FAILED}),
    DeliveryStatus.DELIVERED: frozenset(),
    DeliveryStatus.FAILED: frozenset(),
}


class InvalidTransition(ValueError):
    """A state change the state machine does not allow."""

    def __init__(self, kind: str, current: enum.Enum, target: enum.Enum):
        super().__init__(f"{kind} cannot go from {current.value} to {target.value}")
        self.current = current
        self.target = target


def check_transition(current: Status, target: Status) -> None:
    if target not in TRANSITIONS[current]:
        raise InvalidTransition("notification", current, target)


def check_delivery_transition(current: DeliveryStatus, target: DeliveryStatus) -> None:
    if target not in DELIVERY_TRANSITIONS[current]:
        raise InvalidTransition("delivery", current, target)


def normalise_channel(name: str) -> str:
    """``In-App``, ``in-app`` and ``IN_APP`` all name the ``in_app`` channel."""
    return name.strip().lower().replace("-", "_")


def utc(value: dt.datetime) -> dt.datetime:
    """An aware UTC datetime (naive values are taken as UTC, as storage returns them)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def iso(value: dt.datetime | None) -> str | None:
    """RFC 3339 with milliseconds and ``Z``: the API's timestamp format."""
    if value is None:
        return None
    return utc(value).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_json = msgspec.json.Encoder()


class CreateNotification(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The writable fields of a notification (``POST /v1/notifications``, the
    ``notify`` step). Validated on construction and on decoding; a
    ``ValueError`` names the field and the limit."""

    user_id: str
    type: str
    title: str
    message: str
    channels: list[str]
    priority: str = "MEDIUM"
    data: dict[str, Any] | None = None
    scheduled_for: dt.datetime | None = None
    dedup_key: str | None = None

    def __post_init__(self) -> None:
        if not self.user_id.strip() or len(self.user_id) > MAX_USER_ID_CHARS:
            raise ValueError(f"user_id must be 1–{MAX_USER_ID_CHARS} characters")
        if len(self.type) > MAX_TYPE_CHARS or not TYPE_PATTERN.match(self.type):
            raise ValueError(f"type must be 1–{MAX_TYPE_CHARS} characters of letters, digits, '_', '.', ':' or '-'")
        if not self.title.strip():
            raise ValueError("title must not be empty")
        if len(self.title) > MAX_TITLE_CHARS:
            raise ValueError(f"title must be at most {MAX_TITLE_CHARS} characters (got {len(self.title)})")
        if not self.message.strip():
            raise ValueError("message must not be empty")
        size = len(self.message.encode("utf-8"))
        if size > MAX_MESSAGE_BYTES:
            raise ValueError(f"message must be at most {MAX_MESSAGE_BYTES} bytes (got {size})")
        name = self.priority.strip().upper()
        if name not in Priority.__members__:
            raise ValueError(f"priority must be one of {', '.join(Priority.__members__)}")
        self.priority = name
        channels: list[str] = []
        for channel in self.channels:
            normalised = normalise_channel(channel)
            if not normalised:
                raise ValueError("channels must not contain empty names")
            if normalised not in channels:
                channels.append(normalised)
        if not channels:
            raise ValueError("channels must contain at least one valid channel")
        if len(channels) > MAX_CHANNELS:
            raise ValueError(f"channels may name at most {MAX_CHANNELS} channels")
        self.channels = channels
        if self.data is not None:
            size = len(_json.encode(self.data))
            if size > MAX_DATA_BYTES:
                raise ValueError(f"data must be at most {MAX_DATA_BYTES} bytes as JSON (got {size})")
        if self.scheduled_for is not None:
            if self.scheduled_for.tzinfo is None:
                raise ValueError("scheduled_for must carry a timezone (e.g. 2026-01-01T09:00:00Z)")
            self.scheduled_for = utc(self.scheduled_for)
        if self.dedup_key is not None:
            if not self.dedup_key.strip() or len(self.dedup_key) > MAX_DEDUP_KEY_CHARS:
                raise ValueError(f"dedup_key must be 1–{MAX_DEDUP_KEY_CHARS} characters")

    @property
    def priority_level(self) -> Priority:
        return Priority[self.priority]


class Notification(msgspec.Struct, kw_only=True):
    """A stored notification, with the spec's field names (plus ``read_at``,
    ``inbox_at`` for the in-app inbox and ``next_attempt_at`` for retries)."""

    id: str
    user_id: str
    type: str
    priority: Priority
    title: str
    message: str
    data: dict[str, Any] | None
    channels: list[str]
    created_at: dt.datetime
    scheduled_for: dt.datetime | None = None
    sent_at: dt.datetime | None = None
    status: Status = Status.PENDING
    delivery_attempts: int = 0
    error_message: str | None = None
    dedup_key: str | None = None
    read_at: dt.datetime | None = None
    inbox_at: dt.datetime | None = None
    next_attempt_at: dt.datetime | None = None
    created_by: str = ""

    def transition(self, target: Status) -> None:
        """Move to ``target`` or raise :class:`InvalidTransition`."""
        check_transition(self.status, target)
        self.status = target

    @property
    def is_final(self) -> bool:
        return self.status in (Status.SENT, Status.CANCELLED) or (
            self.status is Status.FAILED and self.next_attempt_at is None
        )

    def to_dict(self) -> dict[str, Any]:
        """The API shape: the spec's field names, timestamps as RFC 3339."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "type": self.type,
            "priority": self.priority.name,
            "title": self.title,
            "message": self.message,
            "data": self.data,
            "channels": list(self.channels),
            "created_at": iso(self.created_at),
            "scheduled_for": iso(self.scheduled_for),
            "sent_at": iso(self.sent_at),
            "status": self.status.value,
            "delivery_attempts": self.delivery_attempts,
            "error_message": self.error_message,
            "dedup_key": self.dedup_key,
            "read_at": iso(self.read_at),
            "read": self.read_at is not None,
            "next_attempt_at": iso(self.next_attempt_at),
        }


class Delivery(msgspec.Struct, kw_only=True):
    """A NotificationDelivery: one per (notification, channel)."""

    id: str
    notification_id: str
    channel: str
    user_id: str
    created_at: dt.datetime
    status: DeliveryStatus = DeliveryStatus.PENDING
    sent_at: dt.datetime | None = None
    delivered_at: dt.datetime | None = None
    failed_at: dt.datetime | None = None
    provider_message_id: str | None = None
    error_message: str | None = None
    metadata: dict[str, Any] | None = None

    def transition(self, target: DeliveryStatus, at: dt.datetime) -> None:
        check_delivery_transition(self.status, target)
        self.status = target
        if target is DeliveryStatus.SENT:
            self.sent_at = at
        elif target is DeliveryStatus.DELIVERED:
            self.delivered_at = at
        elif target is DeliveryStatus.FAILED:
            self.failed_at = at

    @property
    def is_final(self) -> bool:
        return self.status is not DeliveryStatus.PENDING

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "notification_id": self.notification_id,
            "channel": self.channel.upper(),
            "status": self.status.value,
            "sent_at": iso(self.sent_at),
            "delivered_at": iso(self.delivered_at),
            "failed_at": iso(self.failed_at),
            "provider_message_id": self.provider_message_id,
            "error_message": self.error_message,
            "metadata": self.metadata,
        }
