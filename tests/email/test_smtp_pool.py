"""The smtp provider's connection reuse: a NOOP-checked idle connection carries
the next message; a connection the server dropped is replaced, never making a
message go out twice; ``keepalive: 0`` is a connection per send."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.configfile import convert
from collector.email.message import OutgoingEmail
from collector.email.providers import ProviderContext
from collector.email.providers.smtp import SmtpClient, SmtpOptions


def outgoing(i: int) -> OutgoingEmail:
    return OutgoingEmail(email_id=f"e{i}", message_id=f"<m{i}@example.com>", from_="a@example.com",
                         to=[f"user{i}@example.com"], subject=f"hello {i}", text="body", idempotency_key=f"e{i}")


def client(server: Any, **options: Any) -> SmtpClient:
    opts = convert({"host": "127.0.0.1", "port": server.port, "starttls": "off", **options}, SmtpOptions)
    return SmtpClient(opts, ProviderContext(None, name="smtp", index=0))


async def test_an_idle_connection_carries_the_next_messages(smtp_server: Any) -> None:
    smtp = client(smtp_server)
    try:
        for i in range(3):
            await smtp.send(outgoing(i))
        assert smtp.connections_opened == 1
        assert smtp.connections_reused == 2
        assert [m["Subject"] for _, m in smtp_server.messages] == ["hello 0", "hello 1", "hello 2"]
    finally:
        await smtp.close()


async def test_a_dropped_connection_is_replaced_and_nothing_is_sent_twice(smtp_server: Any) -> None:
    smtp = client(smtp_server)
    try:
        await smtp.send(outgoing(0))
        # The server (or a NAT box) drops the idle connection without a word.
        [(_, idle)] = smtp._idle
        transport = idle.transport
        assert isinstance(transport, asyncio.Transport)
        transport.abort()
        await asyncio.sleep(0.05)
        await smtp.send(outgoing(1))
        assert smtp.connections_opened == 2
        assert [m["Subject"] for _, m in smtp_server.messages] == ["hello 0", "hello 1"]
    finally:
        await smtp.close()


async def test_keepalive_zero_opens_a_connection_per_send(smtp_server: Any) -> None:
    smtp = client(smtp_server, keepalive=0)
    for i in range(2):
        await smtp.send(outgoing(i))
    assert smtp.connections_opened == 2 and smtp.connections_reused == 0
    assert smtp._idle == []
    assert len(smtp_server.messages) == 2


async def test_concurrent_sends_each_get_their_own_connection(smtp_server: Any) -> None:
    smtp = client(smtp_server, max_idle_connections=2)
    try:
        await asyncio.gather(*(smtp.send(outgoing(i)) for i in range(5)))
        assert len(smtp_server.messages) == 5
        assert len(smtp._idle) <= 2
    finally:
        await smtp.close()
    assert smtp._idle == []


# --- the idempotency-key lookup with new_key (the notification channel's first attempt) ---------


async def test_new_key_skips_storage_but_never_sends_a_key_twice(make_service: Any, smtp_server: Any,
                                                                 storage: Any) -> None:
    from collector.email.message import SendEmail

    def hello() -> SendEmail:
        return SendEmail(to=["bob@example.com"], subject="Hi", text_body="hello")

    service = await make_service(providers=[smtp_server.provider()])
    queries = 0
    original = storage.query

    async def counting(sql: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal queries
        queries += "email_idempotency" in sql
        return await original(sql, *args, **kwargs)

    storage.query = counting
    try:
        results = await asyncio.gather(*(service.send(hello(), idempotency_key="notification:n1:email",
                                                      new_key=True) for _ in range(3)))
    finally:
        del storage.query
    assert queries == 0
    assert len({r["id"] for r in results}) == 1
    assert len(smtp_server.messages) == 1

    # Another process (a restart) knows nothing in memory: it looks the key up.
    again = await make_service(providers=[smtp_server.provider()])
    record = await again.send(hello(), idempotency_key="notification:n1:email")
    assert record["id"] == results[0]["id"]
    assert len(smtp_server.messages) == 1
