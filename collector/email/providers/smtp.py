"""The ``smtp`` email provider (aiosmtplib), with a small careful pool.

A long-lived client can hang after the server drops it (field notes), so a
connection is reused only for ``keepalive`` seconds after its last send, and
only after a ``NOOP`` answered within a short limit; any doubt (no answer, an
error, a send that failed) closes it and the send goes on a fresh connection.
The NOOP comes before the message's first command, so a reused connection
never makes a message go out twice. ``keepalive: 0`` opens a connection per
send. Every send runs inside an overall deadline (aiosmtplib's ``timeout`` is
per socket operation). STARTTLS is required unless configured
otherwise. ``send()`` does not raise when only some recipients are refused:
those are reported in the result's metadata and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, ClassVar, Literal

import aiosmtplib
import msgspec

from agent.configfile import Duration
from collector.email.message import OutgoingEmail, bare_address
from collector.email.mime import build_mime
from collector.email.providers import PermanentError, ProviderContext, SendResult, TransientError
from plugins import hookimpl


class SmtpOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str
    # 587 (submission, STARTTLS), 465 (implicit TLS: set tls: true) or 25.
    port: int = 587
    username: str | None = None
    password: str | None = None
    # required: refuse servers without STARTTLS; opportunistic: use it when offered; off: never.
    starttls: Literal["required", "opportunistic", "off"] = "required"
    # Implicit TLS from the first byte (port 465); excludes starttls.
    tls: bool = False
    validate_certs: bool = True
    # Limit of each socket operation.
    timeout: Duration = Duration(10.0)
    # Limit of one whole send (connect, TLS, auth, DATA).
    deadline: Duration = Duration(30.0)
    # The name we greet with (EHLO); the machine's name when empty.
    local_hostname: str | None = None
    # Reuse a connection this long after its last send (checked with NOOP first); 0 = a connection per send.
    keepalive: Duration = Duration(10.0)
    # Idle connections kept for reuse at most.
    max_idle_connections: int = 4

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host is required")
        if not 0 < self.port < 65536:
            raise ValueError("port must be 1–65535")
        if self.tls and self.starttls == "required":
            self.starttls = "off"
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.deadline < self.timeout:
            raise ValueError("deadline must be at least timeout")
        if self.keepalive < 0 or self.keepalive > 300:
            raise ValueError("keepalive must be between 0 and 300 seconds")
        if not 0 <= self.max_idle_connections <= 100:
            raise ValueError("max_idle_connections must be between 0 and 100")


class SmtpClient:
    def __init__(self, options: SmtpOptions, context: ProviderContext):
        self.options = options
        self.logger = context.logger
        self._idle: list[tuple[float, aiosmtplib.SMTP]] = []  # (monotonic time of last use, connection)
        self.connections_opened = 0
        self.connections_reused = 0

    def _new_connection(self) -> aiosmtplib.SMTP:
        o = self.options
        start_tls: bool | None = {"required": True, "opportunistic": None, "off": False}[o.starttls]
        return aiosmtplib.SMTP(
            hostname=o.host, port=o.port, username=o.username, password=o.password, use_tls=o.tls,
            start_tls=start_tls, validate_certs=o.validate_certs, timeout=o.timeout,
            local_hostname=o.local_hostname,
        )

    async def _reusable(self) -> aiosmtplib.SMTP | None:
        """An idle connection that answered NOOP, or None."""
        while self._idle:
            last_used, smtp = self._idle.pop()
            if time.monotonic() - last_used > self.options.keepalive or not smtp.is_connected:
                self._discard(smtp)
                continue
            try:
                await smtp.noop(timeout=min(float(self.options.timeout), 2.0))
            except Exception:
                self._discard(smtp)
                continue
            except BaseException:  # cancelled (the send's deadline): not reusable either
                self._discard(smtp)
                raise
            self.connections_reused += 1
            return smtp
        return None

    @staticmethod
    def _discard(smtp: aiosmtplib.SMTP) -> None:
        with contextlib.suppress(Exception):
            smtp.close()

    def _release(self, smtp: aiosmtplib.SMTP) -> None:
        o = self.options
        if o.keepalive > 0 and len(self._idle) < o.max_idle_connections and smtp.is_connected:
            self._idle.append((time.monotonic(), smtp))
        else:
            self._discard(smtp)

    async def _transaction(self, message: Any, sender: str, recipients: list[str]) -> tuple[Any, str]:
        smtp = await self._reusable() if self.options.keepalive > 0 else None
        if smtp is None:
            smtp = self._new_connection()
            try:
                await smtp.connect()
            except BaseException:
                self._discard(smtp)
                raise
            self.connections_opened += 1
        try:
            result = await smtp.send_message(message, sender=sender, recipients=recipients)
        except BaseException:
            self._discard(smtp)
            raise
        self._release(smtp)
        return result

    async def send(self, out: OutgoingEmail) -> SendResult:
        o = self.options
        message = build_mime(out)
        try:
            async with asyncio.timeout(o.deadline):
                errors, response = await self._transaction(
                    message, bare_address(out.from_), [bare_address(r) for r in out.recipients])
        except TimeoutError:
            raise TransientError(f"smtp {o.host}:{o.port}: no answer within {o.deadline:g} s") from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            detail = "; ".join(f"{e.code} {e.message}" for e in exc.recipients)
            if all(400 <= e.code < 500 for e in exc.recipients):
                raise TransientError(f"smtp: every recipient deferred: {detail}") from None
            raise PermanentError(f"smtp: every recipient refused: {detail}") from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise PermanentError(f"smtp: authentication failed: {exc.code} {exc.message}") from None
        except aiosmtplib.SMTPResponseException as exc:
            text = f"smtp {o.host}:{o.port}: {exc.code} {exc.message}"
            if 400 <= exc.code < 500 or exc.code < 0:
                raise TransientError(text) from None
            raise PermanentError(text) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TransientError(f"smtp {o.host}:{o.port}: {exc}") from None
        refused = {address: f"{r.code} {r.message}" for address, r in errors.items()}
        if refused:
            self.logger.warning("smtp refused %d of %d recipients", len(refused), len(out.recipients))
        metadata: dict[str, Any] = {"response": response}
        if refused:
            metadata["refused"] = refused
        return SendResult(provider_message_id=out.message_id.strip("<>"), metadata=metadata)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, smtp in idle:
            try:
                async with asyncio.timeout(2):
                    await smtp.quit()
            except Exception:
                self._discard(smtp)


class SmtpProvider:
    name: ClassVar[str] = "smtp"
    Options: ClassVar[type[msgspec.Struct]] = SmtpOptions

    def create(self, options: SmtpOptions, context: ProviderContext) -> SmtpClient:
        return SmtpClient(options, context)


@hookimpl
def logferry_register_email_providers(register: Any) -> None:
    register(SmtpProvider())
