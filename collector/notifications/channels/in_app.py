"""The ``in_app`` channel: the user's inbox in the collector.

The notification row is the inbox entry: sending marks it visible
(``inbox_at``), after which ``GET /v1/me/notifications`` lists it and
``GET /v1/me/notifications/stream`` announces it. Nothing leaves the
collector, so the send is idempotent and needs no address.

Options (``collector.notifications.channels.in_app``): none yet.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from collector.notifications.channels.base import ChannelContext, ChannelMessage
from plugins import hookimpl
from plugins.types import ChannelResult


class InAppOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class InAppSender:
    needs_address = False
    idempotent = True

    async def send(self, message: ChannelMessage) -> ChannelResult:
        return ChannelResult(provider_message_id=message.notification_id)

    async def close(self) -> None:
        return None


class InAppChannel:
    name: ClassVar[str] = "in_app"
    Options: ClassVar[type[msgspec.Struct]] = InAppOptions

    def create(self, options: InAppOptions, context: ChannelContext) -> InAppSender:
        return InAppSender()


@hookimpl
def logferry_register_channels(register: Any) -> None:
    register(InAppChannel())
