"""The ``email`` channel: notifications through the collector's EmailService.

Options (``collector.notifications.channels.email``)::

    email:
      subject_prefix: "[alerts] "     # before every subject
      template_id: null               # an email template (gets title, message, data, items)

Each delivery uses the idempotency key ``notification:{id}:email`` (a digest:
``digest:{key}:email``), so a retry or a restart never sends a second email:
the EmailService answers a repeated key with the message it already has.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
from jinja2 import Environment, PackageLoader, select_autoescape

from collector.notifications.channels.base import ChannelContext, ChannelMessage
from plugins import hookimpl
from plugins.types import ChannelResult, PermanentError, TransientError


class EmailChannelOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Put before every subject, e.g. "[alerts] ".
    subject_prefix: str = ""
    # An email template of the email service to render instead of the built-in layout;
    # it receives title, message, data, priority, type and (for digests) items.
    template_id: str | None = None

    def __post_init__(self) -> None:
        if len(self.subject_prefix) > 50:
            raise ValueError("subject_prefix must be at most 50 characters")


_templates = Environment(
    loader=PackageLoader("collector.notifications", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True, lstrip_blocks=True,
)


class EmailSender:
    needs_address = True
    idempotent = True

    def __init__(self, options: EmailChannelOptions, context: ChannelContext):
        self.options = options
        self.context = context
        self._html = _templates.get_template("notification.html.j2")

    def _service(self) -> Any:
        from collector import appkeys

        service = self.context.app.get(appkeys.EMAIL) if self.context.app is not None else None
        if service is None:
            raise TransientError("the email service is not running")
        return service

    async def send(self, message: ChannelMessage) -> ChannelResult:
        from collector.email.message import SendEmail

        subject = (self.options.subject_prefix + (message.subject or message.title))[:200]
        if self.options.template_id:
            request = SendEmail(
                to=[message.address], subject=subject, template_id=self.options.template_id,
                template_data={
                    "title": message.title, "message": message.message, "data": message.data,
                    "priority": message.priority, "type": message.type,
                    "items": msgspec.to_builtins(message.items) if message.items else None,
                })
        else:
            html = message.html or self._html.render(title=message.title, message=message.message,
                                                     priority=message.priority, data=message.data)
            request = SendEmail(to=[message.address], subject=subject, text_body=message.text or message.message,
                                html_body=html)
        notification_id = None if message.items else message.notification_id
        try:
            record = await self._service().send(request, notification_id=notification_id,
                                                idempotency_key=message.idempotency_key, wait=True,
                                                new_key=message.first_send)
        except (PermanentError, TransientError):
            raise
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc
        return ChannelResult(provider_message_id=record.get("message_id") or record.get("id"),
                             metadata={"email_id": record.get("id")})

    async def close(self) -> None:
        return None


class EmailChannel:
    name: ClassVar[str] = "email"
    Options: ClassVar[type[msgspec.Struct]] = EmailChannelOptions

    def create(self, options: EmailChannelOptions, context: ChannelContext) -> EmailSender:
        return EmailSender(options, context)


@hookimpl
def logferry_register_channels(register: Any) -> None:
    register(EmailChannel())
