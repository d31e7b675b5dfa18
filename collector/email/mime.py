"""RFC 5322 messages from :class:`~collector.email.message.OutgoingEmail` (stdlib ``email``)."""

from __future__ import annotations

import email.utils
from email.message import EmailMessage
from email.policy import SMTP

from collector.email.message import OutgoingEmail


def build_mime(out: OutgoingEmail, *, date: float | None = None) -> EmailMessage:
    """multipart/mixed(multipart/related(multipart/alternative(text, html), inline…), attachments…),
    collapsed to the simplest shape the content needs. Bcc is never written as a header."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = out.from_
    msg["To"] = ", ".join(out.to)
    if out.cc:
        msg["Cc"] = ", ".join(out.cc)
    if out.reply_to:
        msg["Reply-To"] = out.reply_to
    msg["Subject"] = out.subject
    msg["Message-ID"] = out.message_id
    msg["Date"] = email.utils.formatdate(date, usegmt=True)
    for name, value in out.headers.items():
        msg[name] = value
    msg.set_content(out.text, subtype="plain", cte="quoted-printable" if out.text.isascii() else "8bit")
    if out.html is not None:
        msg.add_alternative(out.html, subtype="html", cte="quoted-printable" if out.html.isascii() else "8bit")
        inline = [a for a in out.attachments if a.content_id]
        if inline:
            html_part = msg.get_payload()[1]  # type: ignore[index]
            assert isinstance(html_part, EmailMessage)
            for att in inline:
                maintype, _, subtype = att.content_type.partition("/")
                html_part.add_related(att.content, maintype=maintype, subtype=subtype, cid=f"<{att.content_id}>",
                                      filename=att.filename, disposition="inline")
    for att in out.attachments:
        if att.content_id and out.html is not None:
            continue
        maintype, _, subtype = att.content_type.partition("/")
        msg.add_attachment(att.content, maintype=maintype, subtype=subtype, filename=att.filename)
    return msg
