"""The spool's segment files: grouped writes, torn tails, removal, restarts."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import agent.spool as spool_module
from agent.spool import MAGIC, FileRange, Spool, SpooledBatch, _encoder
from tests.agent.conftest import agent_config, eventually, write_lines
from tests.agent.ingest_stub import IngestStub
from tests.helpers import free_port


def batch(spool: Spool, body: bytes = b"x" * 100, file_id: str = "f1", end: int = 10) -> SpooledBatch:
    seq = spool.next_seq()
    return SpooledBatch(seq, f"batch-{seq}", 3, 30, [FileRange(file_id, end * seq)], 1.0, "zstd", body)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def test_batches_written_together_come_back_after_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    written = [batch(spool, bytes([i]) * (50 + i)) for i in range(5)]
    spool.write_many(written[:3])
    spool.write(written[3])
    spool.write_many(written[4:])
    assert spool.batches == 5 and len(segments(tmp_path)) == 1
    assert spool.read_body(written[2].seq) == written[2]
    # kill -9: nothing is closed.
    again = Spool(tmp_path)
    assert again.load() == written
    assert again.used_bytes == spool.used_bytes
    assert again.next_seq() == written[-1].seq + 1
    assert again.read_body(written[4].seq).body == written[4].body


def test_each_group_is_synced_unless_sync_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_module, "_fdatasync", lambda fd: synced.append("data"))
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("fsync"), real_fsync(fd))[1])
    durable = Spool(tmp_path / "durable")
    durable.write_many([batch(durable) for _ in range(3)])
    durable.write(batch(durable))
    # One fdatasync per group, and the new segment's directory entry once.
    assert synced.count("data") == 2 and synced.count("fsync") == 1
    synced.clear()
    lazy = Spool(tmp_path / "lazy", sync=False)
    written = [batch(lazy) for _ in range(3)]
    lazy.write_many(written[:2])
    lazy.write(written[2])
    assert synced == []
    # A kill -9 loses nothing: the page cache outlives the process.
    assert Spool(tmp_path / "lazy").load() == written


def test_a_torn_or_corrupt_tail_is_ignored_and_writing_goes_on_in_a_new_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = [batch(spool) for _ in range(2)]
    spool.write_many(kept)
    (segment,) = segments(tmp_path)
    whole = segment.read_bytes()
    # A frame cut short by a crash: its header and half its payload.
    torn = _encoder.encode(batch(spool))
    with segment.open("ab") as out:
        out.write(len(torn).to_bytes(4, "little") + b"\0\0\0\0" + torn[: len(torn) // 2])
    again = Spool(tmp_path)
    assert [b.batch_id for b in again.load()] == [b.batch_id for b in kept]
    fresh = batch(again)
    again.write(fresh)
    assert len(segments(tmp_path)) == 2 and segment.read_bytes().startswith(whole)
    # A frame whose checksum fails ends its segment too.
    with segments(tmp_path)[1].open("r+b") as out:
        out.seek(-3, 2)
        out.write(b"zzz")
    third = Spool(tmp_path)
    assert [b.batch_id for b in third.load()] == [b.batch_id for b in kept]


def test_a_segment_is_removed_only_once_all_its_batches_are(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=300)
    first = [batch(spool) for _ in range(2)]
    spool.write_many(first)  # fills the first segment past 300 bytes
    second = [batch(spool) for _ in range(2)]
    spool.write_many(second)
    assert len(segments(tmp_path)) == 2
    spool.remove(first[1].seq)
    assert len(segments(tmp_path)) == 2
    spool.remove(first[0].seq)
    assert len(segments(tmp_path)) == 1
    spool.remove(second[0].seq)
    spool.remove(second[1].seq)
    assert spool.batches == 0 and spool.used_bytes == 0 and not list(tmp_path.iterdir())
    spool.write(batch(spool))  # the next write starts a new segment
    assert len(segments(tmp_path)) == 1


def test_segments_of_a_crashed_run_are_removed_once_their_batches_are(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    old = [batch(spool) for _ in range(3)]
    spool.write_many(old)
    again = Spool(tmp_path)
    loaded = again.load()
    again.write(batch(again))
    assert len(segments(tmp_path)) == 2
    for b in loaded:
        again.remove(b.seq)
    assert len(segments(tmp_path)) == 1
    again.close()
    assert len(segments(tmp_path)) == 1  # still holds a batch


def test_empty_and_foreign_files_and_spools_of_earlier_versions(tmp_path: Path) -> None:
    (tmp_path / "000000000009.seg").write_bytes(MAGIC[:3])  # created, never synced
    (tmp_path / "000000000010.seg").write_bytes(b"not a segment")
    legacy = SpooledBatch(4, "old-batch", 1, 10, [FileRange("f", 5)], 1.0, "zstd", b"body")
    (tmp_path / "000000000004.batch").write_bytes(_encoder.encode(legacy))
    (tmp_path / "000000000005.batch.tmp").write_bytes(b"half")
    spool = Spool(tmp_path)
    assert spool.load() == [legacy]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000000004.batch", "000000000010.corrupt"]
    assert spool.read_body(4) == legacy
    assert spool.next_seq() == 5
    spool.remove(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000000010.corrupt"]


async def test_spooled_batches_are_resent_with_their_batch_ids_after_a_restart(tmp_path, start_agent) -> None:
    port = free_port()
    (tmp_path / "logs").mkdir()
    app = tmp_path / "logs" / "a.log"
    write_lines(app, [f"line {i}" for i in range(300)])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    cfg = agent_config(tmp_path, f"http://127.0.0.1:{port}", [source], batch={"max_records": 50},
                       collector={"max_in_flight": 2}, spool={"max_bytes": "10MiB"}, shutdown_timeout="100ms")
    running = await start_agent(cfg)
    await eventually(lambda: hasattr(running.agent, "spool") and running.agent.spool.batches == 6,
                     what="every line spooled")
    assert await running.stop() == 0
    spool_dir = tmp_path / "state" / "spool"
    spooled = {b.batch_id for b in Spool(spool_dir).load()}
    assert len(spooled) == 6
    # A write cut short by a crash at the end of the segment changes nothing.
    with segments(spool_dir)[-1].open("ab") as out:
        out.write(b"\xff\x00\x00\x00garbage")
    stub = IngestStub().start(port)
    try:
        running = await start_agent(cfg)
        await eventually(lambda: len(stub.messages()) == 300, what="every line after the restart")
        await eventually(lambda: not list(spool_dir.iterdir()), what="the spool emptied")
        assert set(stub.batches) == spooled
        assert sorted(stub.messages()) == sorted(f"line {i}" for i in range(300))
        assert await running.stop() == 0
    finally:
        stub.stop()


async def test_an_agent_with_spool_sync_off_ships_without_fdatasync(tmp_path, start_agent, monkeypatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(spool_module, "_fdatasync", synced.append)
    port = free_port()
    (tmp_path / "logs").mkdir()
    write_lines(tmp_path / "logs" / "a.log", [f"line {i}" for i in range(200)])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    cfg = agent_config(tmp_path, f"http://127.0.0.1:{port}", [source], batch={"max_records": 50},
                       spool={"sync": False})
    stub = IngestStub().start(port)
    try:
        running = await start_agent(cfg)
        await eventually(lambda: len(stub.messages()) == 200, what="every line")
        assert running.agent.spool.sync is False and synced == []
        assert await running.stop() == 0
    finally:
        stub.stop()
    # The default syncs every group it writes.
    cfg = agent_config(tmp_path, f"http://127.0.0.1:{port}", [source], batch={"max_records": 50})
    write_lines(tmp_path / "logs" / "a.log", [f"more {i}" for i in range(100)])
    stub = IngestStub().start(port)
    try:
        running = await start_agent(cfg)
        await eventually(lambda: len(stub.messages()) == 100, what="the new lines")
        assert running.agent.spool.sync is True and synced
        assert await running.stop() == 0
    finally:
        stub.stop()


def test_a_failed_write_is_retried_in_a_new_segment_and_counted_once(tmp_path: Path, monkeypatch) -> None:
    spool = Spool(tmp_path)
    first = batch(spool)
    spool.write(first)
    doomed = batch(spool)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module, "_fdatasync", full)
    try:
        spool.write(doomed)
    except OSError:
        pass
    else:
        raise AssertionError("the write should have failed")
    monkeypatch.undo()
    spool.write(doomed)  # the agent retries the same batch
    assert len(segments(tmp_path)) == 2 and spool.batches == 2
    again = Spool(tmp_path)
    assert [b.seq for b in again.load()] == [first.seq, doomed.seq]
    again.remove(first.seq)
    again.remove(doomed.seq)
    assert not list(tmp_path.iterdir())


async def test_reading_stops_before_the_spool_would_pass_its_max_bytes(tmp_path, start_agent) -> None:
    """While the collector is away, files are read into the spool only as long
    as one more batch still fits: the spool never holds more than max_bytes."""
    import random

    port = free_port()  # nothing listens: every send fails and is retried
    (tmp_path / "logs").mkdir()
    rng = random.Random(5)
    write_lines(tmp_path / "logs" / "a.log", [f"line {i} {rng.getrandbits(256):064x}" for i in range(4000)])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    limit = 40_000
    cfg = agent_config(tmp_path, f"http://127.0.0.1:{port}", [source], batch={"max_records": 40},
                       collector={"max_in_flight": 1}, spool={"max_bytes": limit}, shutdown_timeout="100ms")
    running = await start_agent(cfg)
    agent = running.agent
    await eventually(lambda: hasattr(agent, "spool") and agent.spool.batches >= 5, what="batches spooled")
    sizes = []
    for _ in range(30):  # reading has stopped: the spool stays where it is
        await asyncio.sleep(0.05)
        sizes.append(agent.spool.used_bytes)
    assert sizes[-1] == sizes[-10]
    assert max(sizes) <= limit, sizes
    assert max(sizes) > limit // 2  # it did fill up to near the limit
    spool_dir = tmp_path / "state" / "spool"
    assert sum(p.stat().st_size for p in spool_dir.iterdir()) <= limit + 1024  # segment headers
    assert await running.stop() == 0
