"""What a channel sender receives and may use.

A channel plugin registers an object with ``name``, ``Options`` (a msgspec
Struct validating ``collector.notifications.channels.<name>``) and
``create(options, context) -> sender``. The sender has
``async send(message: ChannelMessage) -> ChannelResult`` and ``async close()``,
and may set two class attributes:

- ``needs_address`` (default True): the service resolves the user's address
  for this channel first and fails the delivery permanently when there is none;
- ``idempotent`` (default False): sending the same ``idempotency_key`` twice
  reaches the user once (the email service dedups, the inbox is keyed by
  notification). A sender that is not idempotent is never retried after the
  collector stopped mid-send: the delivery fails as "outcome unknown" rather
  than risk a duplicate.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import msgspec


class DigestItem(msgspec.Struct, kw_only=True):
    """One notification inside a digest message."""

    notification_id: str
    type: str
    priority: str
    title: str
    message: str
    data: dict[str, Any] | None
    created_at: str


class ChannelMessage(msgspec.Struct, kw_only=True):
    """One send on one channel: a single notification or a digest of several.

    ``notification_id`` is the notification's id, or for a digest the digest
    key; ``items`` lists the digest's notifications (None for a single one).
    ``address`` is what the users directory (or the address hook) returned for
    this channel. ``subject``/``text``/``html`` are the rendered forms; plain
    ``title``/``message`` are kept for channels that format their own.
    """

    notification_id: str
    delivery_id: str
    channel: str
    user_id: str
    type: str
    priority: str
    title: str
    message: str
    data: dict[str, Any] | None
    address: Any
    idempotency_key: str
    attempt: int = 1
    subject: str = ""
    text: str = ""
    html: str | None = None
    items: list[DigestItem] | None = None
    #: True when no earlier attempt (nor an earlier process) can have used
    #: ``idempotency_key``: a notification created by this process, on its first
    #: attempt. A channel may then skip looking the key up in storage.
    first_send: bool = False


class ChannelContext(msgspec.Struct, kw_only=True):
    """Given to ``create(options, context)``: the collector's services."""

    #: the aiohttp Application (services under ``collector.appkeys``)
    app: Any
    #: the shared aiohttp.ClientSession (created lazily when the app has none)
    http: Callable[[], Any]
    #: the users directory (``collector.notifications.users.UsersDirectory``)
    users: Any
    #: ``now()`` as an aware UTC datetime (a controllable clock in tests)
    clock: Callable[[], dt.datetime]
    #: the collector's public base URL (status callbacks, links)
    public_url: str
    logger: logging.Logger
