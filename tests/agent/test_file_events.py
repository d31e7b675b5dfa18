"""File events (inotify): the agent wakes when a file it reads grows or a
file its globs match appears, instead of on a poll; discovery stays the net.

The agents here poll and discover every 30 s, so a line shipped within a few
seconds was read because of an event."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from agent.watch import FileEvents, glob_base
from tests.agent.conftest import agent_config, eventually, write_lines

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux only")

SLOW = {"poll_interval": "30s", "discover_interval": "30s"}


def test_glob_base_is_the_directory_before_the_first_wildcard() -> None:
    assert glob_base("/var/log/app/*.log") == "/var/log/app"
    assert glob_base("/srv/**/x.log") == "/srv"
    assert glob_base("/srv/app-[ab]/x.log") == "/srv"
    assert glob_base("/x.log") == "/"
    assert glob_base("/var/log/app.log") == "/var/log"


def test_events_name_what_changed_in_watched_directories(tmp_path: Path) -> None:
    logs, other = tmp_path / "logs", tmp_path / "other"
    logs.mkdir()
    other.mkdir()
    (logs / "a.log").write_text("one\n")
    events = FileEvents()
    try:
        assert events.watch([str(logs), str(other), str(tmp_path / "missing"), str(logs / "a.log")]) == []
        assert events.watched == {str(logs), str(other)}  # gone or not a directory: skipped, not failed
        assert not events.read().modified  # nothing yet
        with (logs / "a.log").open("a") as out:
            out.write("two\n")
        (logs / "b.log").write_text("new\n")
        (logs / "sub").mkdir()
        os.rename(logs / "a.log", logs / "a.log.1")
        changed = events.read()
        assert changed.modified == {str(logs / "a.log"), str(logs / "b.log")}
        assert {str(logs / "b.log"), str(logs / "a.log"), str(logs / "a.log.1")} <= changed.named
        assert changed.dirs == {str(logs / "sub")} and not changed.overflow
        events.watch([str(logs)])  # `other` no longer watched
        (other / "c.log").write_text("x\n")
        assert not events.read().named
        os.rmdir(logs / "sub")
        (logs / "sub").mkdir()
        events.watch([str(logs / "sub")])
        os.rmdir(logs / "sub")  # the kernel drops the watch of a deleted directory
        events.read()
        assert events.watched == frozenset()
    finally:
        events.close()


async def test_an_appended_line_is_read_on_the_event_not_the_poll(tmp_path, stub, start_agent) -> None:
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "a.log"
    write_lines(log, ["first"])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    running = await start_agent(agent_config(tmp_path, stub.url, [source], **SLOW))
    await eventually(lambda: stub.messages() == ["first"], what="the first line")
    assert running.agent._events is not None and running.agent._events_complete
    for n in range(3):
        write_lines(log, [f"later {n}"])
        await eventually(lambda n=n: len(stub.messages()) == n + 2, timeout=5, what=f"line {n} read on its event")
    # A file the glob matches, created after the start: found on its event, not at the next discovery.
    write_lines(tmp_path / "logs" / "b.log", ["in b"])
    await eventually(lambda: "in b" in stub.messages(), timeout=5, what="a new file found on its event")
    # Rotation by rename: the rest of the old file and the new one, on their events.
    os.rename(log, tmp_path / "logs" / "a.log.1")
    with (tmp_path / "logs" / "a.log.1").open("a") as out:
        out.write("after rename\n")
    write_lines(log, ["new a"])
    await eventually(lambda: {"after rename", "new a"} <= set(stub.messages()), timeout=5,
                     what="the rotated file's rest and the new file")
    assert sorted(stub.messages()) == sorted(["first", "later 0", "later 1", "later 2", "in b", "after rename",
                                              "new a"])


async def test_without_file_events_the_poll_decides(tmp_path, stub, start_agent) -> None:
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "a.log"
    write_lines(log, ["first"])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    cfg = agent_config(tmp_path, stub.url, [source], file_events=False, **SLOW)
    running = await start_agent(cfg)
    await eventually(lambda: stub.messages() == ["first"], what="the first line")
    # The first batch's acknowledgement wakes the loop once: let that pass go by.
    await eventually(lambda: running.agent.metrics.batches_pending == 0, what="the batch acknowledged")
    await asyncio.sleep(0.5)
    write_lines(log, ["second"])
    await asyncio.sleep(2)
    assert running.agent._events is None
    assert stub.messages() == ["first"]  # the next poll is 30 s away


async def test_a_symlinked_file_is_read_on_events_in_its_targets_directory(tmp_path, stub, start_agent) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "current.log"
    write_lines(target, ["first"])
    (tmp_path / "logs" / "app.log").symlink_to(target)
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    running = await start_agent(agent_config(tmp_path, stub.url, [source], **SLOW))
    await eventually(lambda: stub.messages() == ["first"], what="the first line")
    assert str(tmp_path / "data") in running.agent._events.watched  # type: ignore[union-attr]
    write_lines(target, ["through the link"])
    await eventually(lambda: "through the link" in stub.messages(), timeout=5, what="the target's growth")


async def test_a_pending_multiline_entry_is_flushed_on_time_without_events(tmp_path, stub, start_agent) -> None:
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "a.log"
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain",
              "multiline": {"mode": "start", "pattern": r"^\S", "timeout": "300ms"}}
    await start_agent(agent_config(tmp_path, stub.url, [source], **SLOW))
    await asyncio.sleep(0.2)
    write_lines(log, ["Traceback (most recent call last):", "  File \"x.py\", line 1"])
    started = time.monotonic()
    await eventually(lambda: len(stub.messages()) == 1, timeout=5, what="the entry flushed by its timeout")
    assert time.monotonic() - started < 3
    assert stub.messages() == ["Traceback (most recent call last):"]


async def test_an_idle_agent_with_file_events_wakes_only_to_discover(tmp_path, stub, start_agent) -> None:
    """With events, an idle agent looks at its files once per discover_interval
    (the net), not every poll_interval."""
    (tmp_path / "logs").mkdir()
    for n in range(20):
        write_lines(tmp_path / "logs" / f"f{n}.log", [f"line {n}"])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    passes: dict[bool, int] = {}
    for events in (True, False):
        state = tmp_path / f"state-{events}"
        cfg = agent_config(tmp_path, stub.url, [source], file_events=events, state_dir=str(state),
                           poll_interval="50ms", discover_interval="1s")
        running = await start_agent(cfg)
        metrics = running.agent.metrics
        await eventually(lambda metrics=metrics: metrics.batches_pending == 0 and metrics.records_shipped == 20,
                         what="every file read")
        await asyncio.sleep(0.3)
        calls = 0
        read_files = running.agent._read_files

        def counted(now: float, read_files=read_files) -> bool:
            nonlocal calls
            calls += 1
            return read_files(now)

        running.agent._read_files = counted  # type: ignore[method-assign]
        await asyncio.sleep(2)
        passes[events] = calls
        await running.stop()
    assert passes[True] <= 4, passes  # ~2 discoveries in 2 s
    assert passes[False] >= 20, passes  # ~40 polls in 2 s


def test_a_full_event_queue_is_reported_as_an_overflow(tmp_path: Path) -> None:
    """Events the kernel could not queue are lost; the overflow says so, and
    the agent then discovers and reads everything (see Agent._on_file_events)."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 50_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many files to create to fill the queue")
    events = FileEvents()
    try:
        events.watch([str(tmp_path)])
        for n in range(limit + 10):
            os.close(os.open(tmp_path / f"f{n}", os.O_CREAT | os.O_WRONLY, 0o600))
        changed = events.read()
        assert changed.overflow
        assert len(changed.named) == limit  # what fitted, then the overflow
    finally:
        events.close()


async def test_growth_of_a_file_waiting_for_a_slot_asks_for_no_discovery(tmp_path, stub, start_agent) -> None:
    """A file queued for a descriptor (max_open_files) is read when a slot
    frees: its writes need no glob. A new file does."""
    (tmp_path / "logs").mkdir()
    write_lines(tmp_path / "logs" / "a.log", ["a 0"])
    write_lines(tmp_path / "logs" / "b.log", ["b 0"])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    running = await start_agent(agent_config(tmp_path, stub.url, [source], max_open_files=1, file_turn="30s",
                                             **SLOW))
    agent = running.agent
    await eventually(lambda: stub.messages() == ["a 0"] and len(agent.tailer.waiting) == 1,
                     what="a.log read, b.log waiting")
    discoveries = 0
    discover = agent._discover

    def counted(now: float) -> None:
        nonlocal discoveries
        discoveries += 1
        discover(now)

    agent._discover = counted  # type: ignore[method-assign]
    for n in range(1, 6):
        write_lines(tmp_path / "logs" / "b.log", [f"b {n}"])
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    assert discoveries == 0
    write_lines(tmp_path / "logs" / "c.log", ["c 0"])
    await eventually(lambda: discoveries >= 1, timeout=5, what="a discovery for the new file")


async def test_a_file_in_a_directory_created_under_a_double_star_glob_is_found_on_its_event(
        tmp_path, stub, start_agent) -> None:
    # logs/**/*.log: a directory made after the start (with one inside it,
    # as mkdir -p does) is watched on its own event, so a file then written
    # in it is read within seconds, not at the next discovery (30 s here).
    logs = tmp_path / "logs"
    (logs / "old" / "empty").mkdir(parents=True)
    write_lines(logs / "old" / "a.log", ["first"])
    source = {"path": str(logs / "**" / "*.log"), "source": "app", "format": "plain"}
    running = await start_agent(agent_config(tmp_path, stub.url, [source], **SLOW))
    await eventually(lambda: stub.messages() == ["first"], what="the first line")
    (logs / "2026-12-03" / "web").mkdir(parents=True)
    await asyncio.sleep(0.3)  # the directory events are handled before the file appears
    write_lines(logs / "2026-12-03" / "web" / "b.log", ["in a new directory"])
    await eventually(lambda: "in a new directory" in stub.messages(), timeout=5, what="a file in a new directory")
    # An empty directory there at the start is watched too.
    write_lines(logs / "old" / "empty" / "c.log", ["in an old empty directory"])
    await eventually(lambda: "in an old empty directory" in stub.messages(), timeout=5,
                     what="a file in a directory empty at the start")
    assert running.agent._events is not None
    assert str(logs / "2026-12-03" / "web") in running.agent._events.watched


async def test_directories_a_glob_cannot_find_files_in_are_not_watched(tmp_path, stub, start_agent) -> None:
    # /srv/*/app.log finds files one level down: deeper directories, and any
    # under a glob without a wildcard in its directories, are left alone.
    srv, flat = tmp_path / "srv", tmp_path / "flat"
    (srv / "a" / "deep").mkdir(parents=True)
    (flat / "sub").mkdir(parents=True)
    write_lines(srv / "a" / "app.log", ["a"])
    sources = [{"path": str(srv / "*" / "app.log"), "source": "srv", "format": "plain"},
               {"path": str(flat / "*.log"), "source": "flat", "format": "plain"}]
    running = await start_agent(agent_config(tmp_path, stub.url, sources, **SLOW))
    await eventually(lambda: stub.messages() == ["a"], what="the first line")
    (srv / "b" / "deeper").mkdir(parents=True)
    (flat / "new").mkdir()
    await asyncio.sleep(0.3)
    write_lines(srv / "b" / "app.log", ["b"])
    await eventually(lambda: "b" in stub.messages(), timeout=5, what="a file in a new directory one level down")
    assert running.agent._events is not None
    watched = running.agent._events.watched
    assert str(srv / "b") in watched and str(srv / "a") in watched
    assert not {str(srv / "a" / "deep"), str(srv / "b" / "deeper"), str(flat / "sub"), str(flat / "new")} & watched


async def test_a_reload_that_adds_a_double_star_glob_watches_its_directories(tmp_path, stub, start_agent) -> None:
    import json

    logs = tmp_path / "logs"
    (logs / "deep" / "er").mkdir(parents=True)
    write_lines(logs / "a.log", ["top"])
    flat = {"path": str(logs / "*.log"), "source": "app", "format": "plain"}
    running = await start_agent(agent_config(tmp_path, stub.url, [flat], **SLOW))
    await eventually(lambda: stub.messages() == ["top"], what="the first line")
    assert running.agent._events is not None and str(logs / "deep" / "er") not in running.agent._events.watched
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(json.dumps({"agent": {
        "collector": {"url": stub.url, "token": "test-token"}, "state_dir": str(tmp_path / "state"),
        "sources": [dict(flat, path=str(logs / "**" / "*.log"))], **SLOW}}))
    running.agent.config_path = str(config_file)
    running.agent.request_reload()
    await eventually(lambda: str(logs / "deep" / "er") in running.agent._events.watched, timeout=5,
                     what="the directories of the reloaded glob watched")
    write_lines(logs / "deep" / "er" / "b.log", ["deep down"])
    await eventually(lambda: "deep down" in stub.messages(), timeout=5, what="a file under the new glob")
