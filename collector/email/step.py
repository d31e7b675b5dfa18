"""The ``email`` pipeline step: send through the EmailService.

::

    - type: email
      options:
        to: "{{ event.context.owner_email }}"        # an address, a comma-separated list or a list
        subject: "{{ count }} errors in {{ group.source }}"
        template_id: alert                          # or html: / text:
        template_data: {count: "{{ count }}", source: "{{ group.source }}"}

Every string option arrives rendered by the engine. A retried step sends
nothing twice: the idempotency key is the run's id and the step's id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from plugins import hookimpl
from plugins.types import PermanentError, StepContext


class EmailStepOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    to: list[str] | str
    subject: str | None = None
    template_id: str | None = None
    template_data: dict[str, Any] = {}
    html: str | None = None
    text: str | None = None
    cc: list[str] = []
    bcc: list[str] = []
    from_: str | None = msgspec.field(name="from", default=None)
    reply_to: str | None = None
    tags: list[str] = []
    # Non-transactional mail carries List-Unsubscribe and honours unsubscribes.
    transactional: bool = True

    def __post_init__(self) -> None:
        if not self.template_id and not self.html and not self.text:
            raise ValueError("set template_id, html or text")

    def recipients(self) -> list[str]:
        if isinstance(self.to, str):
            return [a.strip() for a in self.to.split(",") if a.strip()]
        return [a for a in self.to if a]


def _jsonable(value: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value, enc_hook=str))


class EmailStep:
    name = "email"
    Options = EmailStepOptions

    async def run(self, event: Mapping[str, Any], options: EmailStepOptions,
                  context: StepContext) -> Mapping[str, Any]:
        from collector import appkeys
        from collector.email.message import SendEmail

        if context.app is None or appkeys.EMAIL not in context.app:
            raise PermanentError("the email step needs a collector with email configured")
        service = context.app[appkeys.EMAIL]
        request = SendEmail(
            to=options.recipients(), cc=options.cc or None, bcc=options.bcc or None, subject=options.subject,
            html_body=options.html, text_body=options.text, template_id=options.template_id,
            template_data=_jsonable(options.template_data) if options.template_data else None,
            from_=options.from_, reply_to=options.reply_to, tags=options.tags,
            transactional=options.transactional,
        )
        record = await service.send(request, idempotency_key=f"pipeline:{context.run_id}:{context.step_id}",
                                    wait=True)
        return {"email_id": record["id"], "status": record["status"], "message_id": record["message_id"],
                "provider": record["provider"]}

    def describe(self, event: Mapping[str, Any], options: EmailStepOptions, context: StepContext) -> str:
        what = f"template {options.template_id!r}" if options.template_id else "inline body"
        subject = f" {options.subject!r}" if options.subject else ""
        return f"send email{subject} to {', '.join(options.recipients())} ({what})"


@hookimpl
def logferry_register_steps(register: Any) -> None:
    register(EmailStep())
