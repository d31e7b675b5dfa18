"""The in-memory hot state: atomic claims, priority queue, digest buffers, caches."""

from __future__ import annotations

import asyncio

from collector.notifications.hotstate import MISSING, MemoryHotState, QueueItem


async def test_exactly_one_of_many_concurrent_claims_wins() -> None:
    hot = MemoryHotState()
    results = await asyncio.gather(*(hot.claim_dedup("u\x1fk", f"n{i}", 100.0, 300) for i in range(200)))
    winners = [i for i, r in enumerate(results) if r is None]
    assert winners == [0]
    assert set(results[1:]) == {"n0"}


async def test_a_claim_expires_after_the_window_and_can_be_released_by_its_holder_only() -> None:
    hot = MemoryHotState()
    assert await hot.claim_dedup("k", "a", 0.0, 300) is None
    assert await hot.claim_dedup("k", "b", 299.9, 300) == "a"
    await hot.release_dedup("k", "b")
    assert await hot.claim_dedup("k", "b", 299.9, 300) == "a"
    assert await hot.claim_dedup("k", "b", 300.0, 300) is None
    await hot.release_dedup("k", "b")
    assert await hot.claim_dedup("k", "c", 301.0, 300) is None


async def test_due_items_come_out_highest_priority_first_and_only_once() -> None:
    hot = MemoryHotState()
    await hot.schedule(QueueItem(kind="notification", key="low-early", due_at=1.0, priority=1))
    await hot.schedule(QueueItem(kind="notification", key="critical-late", due_at=5.0, priority=4))
    await hot.schedule(QueueItem(kind="notification", key="future", due_at=50.0, priority=4))
    await hot.schedule(QueueItem(kind="notification", key="high", due_at=3.0, priority=3))
    assert [i.key for i in await hot.pop_due(10.0, 10)] == ["critical-late", "high", "low-early"]
    assert await hot.pop_due(10.0, 10) == []
    assert await hot.next_due() == 50.0


async def test_rescheduling_replaces_the_earlier_item() -> None:
    hot = MemoryHotState()
    await hot.schedule(QueueItem(kind="notification", key="n", due_at=1.0))
    await hot.schedule(QueueItem(kind="notification", key="n", due_at=20.0))
    assert await hot.pop_due(10.0, 10) == []
    assert [i.due_at for i in await hot.pop_due(20.0, 10)] == [20.0]
    await hot.schedule(QueueItem(kind="notification", key="x", due_at=1.0))
    await hot.unschedule("notification", "x")
    assert await hot.pop_due(20.0, 10) == [] and await hot.queue_size() == 0


async def test_a_digest_is_taken_whole_exactly_once() -> None:
    hot = MemoryHotState()
    await hot.digest_add("d", ["a", "b"])
    await hot.digest_add("d", ["b", "c"])
    taken = await asyncio.gather(hot.digest_take("d"), hot.digest_take("d"))
    assert sorted(taken, key=len) == [[], ["a", "b", "c"]]


async def test_cache_entries_expire_and_can_be_invalidated() -> None:
    hot = MemoryHotState()
    await hot.cache_put("pref", "u|t", None, 0.0, 60)
    assert await hot.cache_get("pref", "u|t", 59.0) is None
    assert await hot.cache_get("pref", "u|t", 60.0) is MISSING
    await hot.cache_put("pref", "u|t", "v", 0.0, 60)
    await hot.cache_invalidate("pref", "u|t")
    assert await hot.cache_get("pref", "u|t", 1.0) is MISSING
