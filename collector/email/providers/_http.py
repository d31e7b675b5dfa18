"""What the HTTP providers share: a session, a deadline, error classification."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from collector.email.providers import ProviderContext, TransientError, classify_http_status


class HttpProviderClient:
    """Uses the collector's shared session, or its own when there is none (CLI, tests)."""

    provider = "http"

    def __init__(self, context: ProviderContext, timeout: float):
        self._shared = context.http
        self._own: aiohttp.ClientSession | None = None
        self.timeout = timeout
        self.logger = context.logger

    def session(self) -> aiohttp.ClientSession:
        if self._shared is not None and not self._shared.closed:
            return self._shared
        if self._own is None or self._own.closed:
            self._own = aiohttp.ClientSession()
        return self._own

    async def request(self, call: Callable[[aiohttp.ClientSession], Awaitable[aiohttp.ClientResponse]]
                      ) -> dict[str, Any]:
        """Do one request within the deadline; 2xx JSON back, or Transient/PermanentError."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await call(self.session())
                async with response:
                    text = await response.text()
                    if response.status >= 300:
                        raise classify_http_status(response.status, text, self.provider)
                    try:
                        data = await response.json(content_type=None)
                    except ValueError:
                        raise TransientError(f"{self.provider} answered {response.status} without JSON") from None
                    return data if isinstance(data, dict) else {}
        except TimeoutError:
            raise TransientError(f"{self.provider}: no answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"{self.provider}: {exc.__class__.__name__}: {exc}") from None

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()
