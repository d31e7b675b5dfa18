"""Tailing real files with a running agent: rotation, truncation, deletion,
inode reuse, many files, long and partial lines, start_at, restart."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.agent.conftest import agent_config, eventually, write_lines
from tests.agent.ingest_stub import IngestStub


def src(tmp_path: Path, pattern: str = "logs/*.log", **kw: object) -> dict[str, object]:
    return {"path": str(tmp_path / pattern), "source": "app", "format": "plain", **kw}


def count(stub: IngestStub, prefix: str) -> list[str]:
    return sorted(m for m in stub.messages() if m.startswith(prefix))


async def test_rotated_file_is_read_to_the_end_even_when_deleted(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.log"
    write_lines(app, [f"old {i}" for i in range(100)])
    running = await start_agent(agent_config(tmp_path, stub.url, [src(tmp_path)]))
    await eventually(lambda: len(count(stub, "old")) == 100, what="first lines")
    # The writer still holds the old file: lines written after the rename
    # and the deletion must arrive too.
    writer = app.open("a")
    app.rename(logs / "app.log.1")
    write_lines(app, [f"new {i}" for i in range(50)])
    writer.write("".join(f"old late {i}\n" for i in range(20)))
    writer.flush()
    (logs / "app.log.1").unlink()
    writer.write("old after delete\n")
    writer.close()
    await eventually(lambda: len(count(stub, "new")) == 50 and len(count(stub, "old")) == 121,
                     what="both files")
    assert sorted(stub.messages()) == sorted(set(stub.messages()))  # no duplicates
    assert await running.stop() == 0


async def test_copytruncate_and_truncation_start_again_at_zero(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.log"
    write_lines(app, [f"before {i}" for i in range(30)])
    await start_agent(agent_config(tmp_path, stub.url, [src(tmp_path)]))
    await eventually(lambda: len(count(stub, "before")) == 30)
    (logs / "app.log.1").write_bytes(app.read_bytes())  # copy … (not matched by *.log.1? it is not)
    with app.open("r+") as f:
        f.truncate(0)
    write_lines(app, ["after 1", "after 2"])
    await eventually(lambda: count(stub, "after") == ["after 1", "after 2"], what="lines after truncation")
    # Truncated and rewritten past the old offset within one poll: the fingerprint notices.
    app.write_text("".join(f"rewritten {i:04d} padding padding padding\n" for i in range(40)))
    await eventually(lambda: len(count(stub, "rewritten")) == 40, what="rewritten file")
    assert len(count(stub, "before")) == 30


async def test_inode_reuse_is_not_mistaken_for_the_file_already_read(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.log"
    write_lines(app, [f"first file line {i}" for i in range(40)])
    cfg = agent_config(tmp_path, stub.url, [src(tmp_path)])
    running = await start_agent(cfg)
    await eventually(lambda: len(count(stub, "first")) == 40)
    assert await running.stop() == 0
    ino = app.stat().st_ino
    app.unlink()
    # A new file, same inode (tmpfs/ext4 reuse freed inodes), longer than the old offset.
    for attempt in range(50):
        candidate = logs / f"tmp{attempt}.txt"
        write_lines(candidate, [f"second file line {i} with other content" for i in range(60)], mode="w")
        if candidate.stat().st_ino == ino:
            candidate.rename(app)
            break
        candidate.unlink()
    else:
        write_lines(app, [f"second file line {i} with other content" for i in range(60)], mode="w")
    await start_agent(cfg)
    await eventually(lambda: len(count(stub, "second")) == 60, what="every line of the new file")
    checkpoint = (tmp_path / "state" / "checkpoints.json").read_text()
    assert "second file line" not in checkpoint and "first file line" not in checkpoint  # hashes only


async def test_many_files_new_files_globstar_excludes_and_symlinks(tmp_path, stub, start_agent) -> None:
    root = tmp_path / "logs"
    for i in range(40):
        d = root / f"svc{i % 4}" / "deep"
        d.mkdir(parents=True, exist_ok=True)
        write_lines(d / f"f{i}.log", [f"file {i} line {j}" for j in range(25)])
    write_lines(root / "svc0" / "debug.log", ["excluded line"])
    (root / "link.log").symlink_to(root / "svc1" / "deep" / "f1.log")  # same inode: read once
    source = src(tmp_path, "logs/**/*.log", exclude=["debug.log"])
    await start_agent(agent_config(tmp_path, stub.url, [source]))
    await eventually(lambda: len(count(stub, "file")) == 1000, what="1000 lines of 40 files")
    write_lines(root / "svc3" / "late.log", ["file late"])
    await eventually(lambda: "file late" in stub.messages(), what="a file created while running")
    assert "excluded line" not in stub.messages()
    assert len(stub.messages()) == len(set(stub.messages())) == 1001


async def test_long_partial_and_undecodable_lines(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.log"
    app.write_bytes(b"short\n" + b"L" * 5000 + b"\nafter long\nbad \xff\xfe bytes\npartial without newline")
    await start_agent(agent_config(tmp_path, stub.url, [src(tmp_path, max_line=1024)], read_chunk="4KiB"))
    await eventually(lambda: "bad \ufffd\ufffd bytes" in stub.messages(), what="lines with bad bytes")
    messages = stub.messages()
    long = [m for m in messages if m.startswith("LLL")]
    assert len(long) == 1 and long[0].startswith("L" * 1024) and "truncated at 1024 bytes" in long[0]
    assert "after long" in messages and "short" in messages
    assert not any("partial" in m for m in messages)  # waits for its newline
    with app.open("ab") as f:
        f.write(b" now complete\n")
    await eventually(lambda: "partial without newline now complete" in stub.messages(), what="completed line")


async def test_start_at_end_skips_existing_content_only_at_first_start(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    write_lines(logs / "old.log", ["history 1", "history 2"])
    cfg = agent_config(tmp_path, stub.url, [src(tmp_path, start_at="end")])
    running = await start_agent(cfg)
    await eventually(lambda: running.agent.metrics.files_open == 1)
    write_lines(logs / "old.log", ["live 1"])
    write_lines(logs / "new.log", ["brand new file"])  # new files start at the beginning
    await eventually(lambda: {"live 1", "brand new file"} <= set(stub.messages()))
    assert await running.stop() == 0
    write_lines(logs / "old.log", ["while stopped"])
    await start_agent(cfg)
    await eventually(lambda: "while stopped" in stub.messages(), what="lines written while stopped")
    assert not any(m.startswith("history") for m in stub.messages())
    assert len(stub.messages()) == 3


async def test_restart_resumes_after_the_last_acknowledged_line(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.log"
    write_lines(app, [json.dumps({"msg": f"line {i}", "level": "info"}) for i in range(500)])
    cfg = agent_config(tmp_path, stub.url, [src(tmp_path, format="json")], batch={"max_records": 64})
    running = await start_agent(cfg)
    await eventually(lambda: len(stub.messages()) == 500)
    assert await running.stop() == 0
    saved = json.loads((tmp_path / "state" / "checkpoints.json").read_text())
    (entry,) = saved["files"].values()
    assert entry["offset"] == app.stat().st_size and entry["ino"] == app.stat().st_ino
    assert not os.listdir(tmp_path / "state" / "spool")
    write_lines(app, [json.dumps({"msg": f"line {i}"}) for i in range(500, 520)])
    await start_agent(cfg)
    await eventually(lambda: len(stub.messages()) == 520)
    assert sorted(stub.messages()) == sorted(f"line {i}" for i in range(520))
    assert max(len(b) for b in stub.batches.values()) <= 64


async def test_multiline_entry_is_flushed_after_its_timeout(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    write_lines(logs / "app.log", ["2026-11-25 04:00:00 ERROR failed", "Traceback (most recent call last):",
                                   '  File "a.py", line 1', "ZeroDivisionError: division by zero"])
    source = src(tmp_path, multiline={"mode": "continuation", "timeout": "200ms"})
    await start_agent(agent_config(tmp_path, stub.url, [source]))
    await eventually(lambda: len(stub.records) == 1, what="the traceback as one record")
    (record,) = stub.records
    assert record.message == "failed" and record.error_stack is not None
    assert record.error_stack.endswith("ZeroDivisionError: division by zero")


async def test_deleted_file_is_released(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    write_lines(logs / "a.log", [f"a {i}" for i in range(10)])
    running = await start_agent(agent_config(tmp_path, stub.url, [src(tmp_path)]))
    await eventually(lambda: len(stub.messages()) == 10)
    (logs / "a.log").unlink()
    await eventually(lambda: running.agent.metrics.files_open == 0, what="the descriptor released")
    await eventually(lambda: json.loads((tmp_path / "state" / "checkpoints.json").read_text())["files"] == {},
                     what="its checkpoint entry dropped")
