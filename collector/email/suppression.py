"""The suppression list: addresses we must not mail (hard bounces, complaints,
unsubscribes, admin entries).

Kept in memory by keyed hash (every send checks it) and in
``email_suppressions`` with the address sealed, so admins can list and lift
entries. Lifting is a row with ``deleted = 1`` (ReplacingMergeTree).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from collector.email.message import bare_address
from collector.email.repository import ch_time, utc
from collector.pii import PiiCipher, normalise_email
from collector.storage import Storage, new_version

REASONS = ("hard_bounce", "complaint", "unsubscribed", "manual")


class Suppression(msgspec.Struct, kw_only=True):
    address: str
    reason: str
    detail: str = ""
    created_at: dt.datetime


class SuppressionList:
    def __init__(self, storage: Storage, cipher: PiiCipher, *, clock: Callable[[], float]):
        self.storage = storage
        self.cipher = cipher
        self.clock = clock
        self._entries: dict[str, Suppression] = {}

    async def load(self) -> None:
        rows = await self.storage.query(
            "SELECT address_hash, address, reason, detail, created_at FROM email_suppressions FINAL")
        entries = {}
        for row in rows:
            entries[row["address_hash"]] = Suppression(
                address=self.cipher.decrypt(row["address"]), reason=row["reason"], detail=row["detail"],
                created_at=utc(row["created_at"]) or dt.datetime.now(dt.UTC))
        self._entries = entries

    def _hash(self, address: str) -> str:
        return self.cipher.email_hash(bare_address(address))

    def find(self, addresses: Iterable[str]) -> list[tuple[str, Suppression]]:
        """The suppressed ones among ``addresses``."""
        hits = []
        for address in addresses:
            entry = self._entries.get(self._hash(address))
            if entry is not None:
                hits.append((address, entry))
        return hits

    def get(self, address: str) -> Suppression | None:
        return self._entries.get(self._hash(address))

    async def add(self, address: str, reason: str, detail: str = "") -> Suppression:
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {', '.join(REASONS)}")
        bare = normalise_email(bare_address(address))
        key = self._hash(bare)
        existing = self._entries.get(key)
        if existing is not None and existing.reason == reason:
            return existing
        entry = Suppression(address=bare, reason=reason, detail=detail[:500],
                            created_at=dt.datetime.fromtimestamp(self.clock(), dt.UTC))
        await self.storage.insert_rows("email_suppressions", [{
            "address_hash": key, "address": self.cipher.encrypt(bare), "reason": reason,
            "detail": entry.detail, "created_at": ch_time(entry.created_at), "version": new_version(),
        }])
        self._entries[key] = entry
        return entry

    async def lift(self, address: str) -> Suppression | None:
        key = self._hash(address)
        entry = self._entries.get(key)
        if entry is None:
            return None
        await self.storage.insert_rows("email_suppressions", [{
            "address_hash": key, "address": self.cipher.encrypt(entry.address), "reason": entry.reason,
            "detail": entry.detail, "created_at": ch_time(entry.created_at), "version": new_version(),
            "deleted": 1,
        }])
        del self._entries[key]
        return entry

    def list(self, *, reason: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        entries = sorted(self._entries.values(), key=lambda e: e.created_at, reverse=True)
        if reason:
            entries = [e for e in entries if e.reason == reason]
        return [msgspec.to_builtins(e) for e in entries[offset:offset + limit]]

    def __len__(self) -> int:
        return len(self._entries)
