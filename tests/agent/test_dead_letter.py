"""The dead-letter file is size-capped and rotated by rename (.1 … .keep)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, DeadLetterConfig
from agent.configfile import ConfigInvalid, convert
from agent.deadletter import DeadLetterFile
from tests.agent.conftest import agent_config, eventually, write_lines


def entry(i: int) -> bytes:
    return json.dumps({"index": i, "record": {"message": f"dead {i:04d}", "pad": "x" * 60}}).encode() + b"\n"


def indexes(path: Path) -> list[int]:
    return [json.loads(line)["index"] for line in path.read_text().splitlines()]


def test_writing_past_the_cap_rotates_and_keeps_only_keep_files(tmp_path: Path) -> None:
    path = tmp_path / "dead-letter.ndjson"
    dead = DeadLetterFile(path, max_bytes=1024, keep=2)
    size = len(entry(0))
    for i in range(100):
        dead.append(entry(i))
    per_file = 1024 // size
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["dead-letter.ndjson", "dead-letter.ndjson.1", "dead-letter.ndjson.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 1024
    # The newest entry is in the current file; older ones follow in .1, then .2, nothing is split.
    assert indexes(path)[-1] == 99
    kept = indexes(tmp_path / "dead-letter.ndjson.2") + indexes(tmp_path / "dead-letter.ndjson.1") + indexes(path)
    assert kept == list(range(100 - len(kept), 100))
    assert len(indexes(tmp_path / "dead-letter.ndjson.1")) == per_file


def test_an_append_larger_than_the_cap_goes_whole_into_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "dead-letter.ndjson"
    dead = DeadLetterFile(path, max_bytes=1024, keep=1)
    dead.append(entry(0))
    big = b"".join(entry(i) for i in range(1, 40))
    dead.append(big)
    assert path.read_bytes() == big
    assert indexes(tmp_path / "dead-letter.ndjson.1") == [0]
    dead.append(entry(40))
    assert indexes(path) == [40] and indexes(tmp_path / "dead-letter.ndjson.1") == list(range(1, 40))
    assert not (tmp_path / "dead-letter.ndjson.2").exists()


def test_keep_0_and_max_bytes_0(tmp_path: Path) -> None:
    path = tmp_path / "dead-letter.ndjson"
    DeadLetterFile(path, max_bytes=1024, keep=5).append(entry(0))
    for n in (1, 2, 4, 5):  # a gap at .3
        (tmp_path / f"dead-letter.ndjson.{n}").write_bytes(entry(-n))
    only = DeadLetterFile(path, max_bytes=1024, keep=0)  # `keep` lowered: older files go at the next rotation
    for i in range(1, 30):
        only.append(entry(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dead-letter.ndjson"]
    assert indexes(path)[-1] == 29
    unbounded = DeadLetterFile(tmp_path / "other.ndjson", max_bytes=0, keep=3)
    for i in range(50):
        unbounded.append(entry(i))
    assert indexes(tmp_path / "other.ndjson") == list(range(50))


def test_config_defaults_and_limits() -> None:
    assert DeadLetterConfig() == DeadLetterConfig(max_bytes=64 * 1024 * 1024, keep=3)  # type: ignore[arg-type]
    cfg = convert({"dead_letter": {"max_bytes": "1MiB", "keep": 5}}, AgentConfig)
    assert (cfg.dead_letter.max_bytes, cfg.dead_letter.keep) == (1024 * 1024, 5)
    with pytest.raises(ConfigInvalid):
        convert({"dead_letter": {"max_bytes": "100B"}}, AgentConfig)
    with pytest.raises(ConfigInvalid):
        convert({"dead_letter": {"keep": -1}}, AgentConfig)


async def test_the_agent_rotates_its_dead_letter_file(tmp_path, stub, start_agent) -> None:
    stub.reject = lambda r: "refused for the test"
    (tmp_path / "logs").mkdir()
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    cfg = agent_config(tmp_path, stub.url, [source], batch={"max_records": 2}, collector={"max_in_flight": 1},
                       dead_letter={"max_bytes": "1KiB", "keep": 2})
    write_lines(tmp_path / "logs" / "a.log", [f"doomed {i:03d}" for i in range(60)])
    running = await start_agent(cfg)
    state = tmp_path / "state"
    await eventually(lambda: running.agent.metrics.records_rejected == 60, what="every record rejected")
    current = state / "dead-letter.ndjson"
    rotated = [state / "dead-letter.ndjson.1", state / "dead-letter.ndjson.2"]
    assert current.exists() and all(p.exists() for p in rotated)
    assert not (state / "dead-letter.ndjson.3").exists()
    files = [rotated[1], rotated[0], current]
    messages = [json.loads(line)["record"]["message"] for p in files for line in p.read_text().splitlines()]
    assert messages[-1] == "doomed 059"  # the newest entry is in the current file
    assert messages == [f"doomed {i:03d}" for i in range(60 - len(messages), 60)]
    assert all(p.stat().st_size <= 1024 for p in files)


def test_holds_finds_a_batch_in_the_current_or_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "dead-letter.ndjson"
    dead = DeadLetterFile(path, max_bytes=4 * 1024 * 1024, keep=2)
    assert not dead.holds("b-1")  # no file yet
    pad = b"x" * ((1 << 20) - 20)  # puts the next entry across the 1 MiB read boundary
    dead.append(pad + b"\n" + json.dumps({"batch_id": "b-1", "index": 0}, separators=(",", ":")).encode() + b"\n")
    assert dead.holds("b-1") and not dead.holds("b-10") and not dead.holds("b-")
    dead.rotate()
    dead.append(b'{"batch_id":"b-2","index":3}\n')
    assert dead.holds("b-1") and dead.holds("b-2")  # .1 and the current file
    dead.rotate()
    dead.append(b'{"batch_id":"b-3","index":0}\n')
    dead.rotate()  # b-1 went with .2, beyond keep
    assert not dead.holds("b-1") and dead.holds("b-2") and dead.holds("b-3")


def dead_letters(state: Path) -> list[dict[str, object]]:
    path = state / "dead-letter.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_rejections_of_a_batch_whose_answer_was_lost_are_dead_lettered(tmp_path, stub, start_agent) -> None:
    """The collector stored the batch, then the connection dropped before its
    answer: the resend is answered as a duplicate carrying the rejections,
    which are dead-lettered once."""
    stub.reject = lambda r: "refused: too loud" if "LOUD" in r.message else None
    stub.lose_answers = 1
    (tmp_path / "logs").mkdir()
    write_lines(tmp_path / "logs" / "a.log", ["fine 1", "LOUD 2", "fine 3"])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    cfg = agent_config(tmp_path, stub.url, [source], collector={"max_in_flight": 1})
    running = await start_agent(cfg)
    await eventually(lambda: running.agent.metrics.records_rejected == 1, what="the rejection dead-lettered")
    assert stub.duplicates == 1 and stub.lose_answers == 0
    entries = dead_letters(tmp_path / "state")
    assert [(e["record"]["message"], e["reason"]) for e in entries] == [("LOUD 2", "refused: too loud")]  # type: ignore[index]
    assert sorted(stub.messages()) == ["fine 1", "fine 3"]
    # What the agent writes is what it looks for before writing a resent batch again.
    assert DeadLetterFile(tmp_path / "state" / "dead-letter.ndjson", 1 << 20, 3).holds(str(entries[0]["batch_id"]))


async def test_a_resent_batch_already_dead_lettered_is_not_dead_lettered_again(tmp_path, stub, start_agent) -> None:
    """The agent wrote the rejections to the dead-letter file and stopped
    before acknowledging the batch: the resend's duplicate answer names the
    same rejections, and the file keeps one copy of them."""
    sent: list[str] = []

    def unavailable(batch: Any) -> tuple[int, dict[str, str], bytes]:
        sent.append(batch.batch_id)
        return 503, {"Retry-After": "1"}, b'{"error": {"code": "storage_unavailable", "message": "later"}}'

    stub.answer_batch = unavailable
    (tmp_path / "logs").mkdir()
    write_lines(tmp_path / "logs" / "a.log", ["fine 1", "LOUD 2"])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    cfg = agent_config(tmp_path, stub.url, [source], collector={"max_in_flight": 1})
    running = await start_agent(cfg)
    await eventually(lambda: bool(sent), what="the batch sent")
    await running.stop()  # unacknowledged: it stays in the spool
    batch_id = sent[0]
    # What the stopped agent had done, and the collector too: the entry is in
    # a rotated dead-letter file by now; the collector stored the batch.
    state = tmp_path / "state"
    earlier = {"time": 1.0, "batch_id": batch_id, "index": 1, "reason": "refused: too loud",
               "record": {"timestamp": "", "level": "", "source": "app", "message": "LOUD 2"}}
    (state / "dead-letter.ndjson.1").write_text(json.dumps(earlier, separators=(",", ":")) + "\n")
    other = {**earlier, "batch_id": "another-batch"}
    (state / "dead-letter.ndjson").write_text(json.dumps(other, separators=(",", ":")) + "\n")
    with stub.lock:
        stub.batches[batch_id] = []
        stub.rejections[batch_id] = [{"index": 1, "error": "refused: too loud"}]
    stub.answer_batch = None
    again = await start_agent(cfg)
    await eventually(lambda: again.agent.metrics.batches_duplicate == 1, what="the duplicate answer")
    assert stub.duplicates == 1
    assert dead_letters(state) == [other]
    assert again.agent.metrics.records_rejected == 0
    assert [json.loads(line) for line in (state / "dead-letter.ndjson.1").read_text().splitlines()] == [earlier]


async def test_a_slow_dead_letter_write_stalls_neither_reading_nor_shipping(tmp_path, stub, start_agent,
                                                                           monkeypatch) -> None:
    """The dead-letter file's fsynced appends (and holds()' scans of rotated
    files) run off the event loop: while one waits on a slow disk, other
    lines are read and shipped, and the waiting batch is acknowledged (its
    checkpoint moving) only once its entry is written."""
    release = threading.Event()
    writing = threading.Event()
    append = DeadLetterFile.append

    def slow_append(self: DeadLetterFile, data: bytes) -> None:
        writing.set()
        release.wait(15)
        append(self, data)

    monkeypatch.setattr(DeadLetterFile, "append", slow_append)
    stub.reject = lambda r: "refused: too loud" if "LOUD" in r.message else None
    (tmp_path / "logs").mkdir()
    write_lines(tmp_path / "logs" / "a.log", ["LOUD 1"])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    cfg = agent_config(tmp_path, stub.url, [source], collector={"max_in_flight": 2})
    running = await start_agent(cfg)
    try:
        await eventually(writing.is_set, what="the dead-letter append under way")
        write_lines(tmp_path / "logs" / "b.log", ["fine 2"])
        await eventually(lambda: stub.messages() == ["fine 2"], what="a later line shipped meanwhile")
        assert dead_letters(tmp_path / "state") == []
        assert running.agent.metrics.batches_pending == 1  # the dead-lettering batch, not acknowledged yet
    finally:
        release.set()
    await eventually(lambda: len(dead_letters(tmp_path / "state")) == 1, what="the entry written")
    await eventually(lambda: running.agent.metrics.batches_pending == 0, what="the batch acknowledged")
    assert dead_letters(tmp_path / "state")[0]["record"]["message"] == "LOUD 1"  # type: ignore[index]


async def test_concurrent_dead_letters_rotate_without_losing_or_splitting_entries(tmp_path, stub,
                                                                                 start_agent) -> None:
    stub.reject = lambda r: "refused for the test"
    (tmp_path / "logs").mkdir()
    for name in "abcd":
        write_lines(tmp_path / "logs" / f"{name}.log", [f"doomed {name} {i:03d}" for i in range(10)])
    source = {"path": str(tmp_path / "logs" / "*.log"), "source": "app", "format": "plain"}
    cfg = agent_config(tmp_path, stub.url, [source], batch={"max_records": 2}, collector={"max_in_flight": 4},
                       dead_letter={"max_bytes": "1KiB", "keep": 30})
    running = await start_agent(cfg)
    await eventually(lambda: running.agent.metrics.records_rejected == 40, what="every record rejected")
    await eventually(lambda: running.agent.metrics.batches_pending == 0, what="every batch acknowledged")
    state = tmp_path / "state"
    files = [state / "dead-letter.ndjson", *state.glob("dead-letter.ndjson.*")]
    assert len(files) > 3  # rotated meanwhile
    assert all(p.stat().st_size <= 1024 for p in files)
    entries = [json.loads(line) for p in files for line in p.read_text().splitlines()]  # each whole
    assert sorted(e["record"]["message"] for e in entries) == sorted(
        f"doomed {name} {i:03d}" for name in "abcd" for i in range(10))
