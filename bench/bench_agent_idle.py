"""An agent with many quiet files: idle CPU and the delay of a line written now.

Starts ``logferry-agent run`` as a real process on N files (one line each) with
file events on (the default) and then off (polling every ``poll_interval``),
shipping to bench_agent's minimal ack server. Once every file is read, it
measures the agent's CPU over an idle stretch, then appends single lines to
random files and times each until the ack server has it (write to
acknowledged: reading, batching at ``batch.max_wait``, shipping).

    python bench/bench_agent_idle.py                 # 200 files, 10 s idle
    python bench/bench_agent_idle.py --files 1000 --idle 30
    python bench/bench_agent_idle.py --quick         # 50 files, 3 s idle
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_agent import ACK_SERVER, BIN, ROOT, free_port, wait_http

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def run(work: Path, url: str, files: int, idle: float, appends: int, events: bool) -> tuple[float, list[float]]:
    logs = work / "logs"
    config = work / f"agent-{events}.yaml"
    config.write_text(json.dumps({"agent": {
        "collector": {"url": url, "token": "bench"},
        "state_dir": str(work / f"state-{events}"),
        "sources": [{"path": str(logs / "*.log"), "source": "idle", "format": "plain"}],
        "file_events": events,
        "metrics": {"summary_interval": 0},
    }}))

    def acknowledged() -> int:
        with urllib.request.urlopen(f"{url}/stats", timeout=5) as r:
            return int(json.loads(r.read())["records"])

    base = acknowledged()
    agent = subprocess.Popen([str(BIN / "logferry-agent"), "--log-level", "WARNING", "run", "-c", str(config)],
                             cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while acknowledged() - base < files:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent did not read every file")
            time.sleep(0.05)
        time.sleep(1.0)  # the last acknowledgements and checkpoint writes
        before = cpu_seconds(agent.pid)
        time.sleep(idle)
        idle_cpu = cpu_seconds(agent.pid) - before
        delays = []
        rng = random.Random(1)
        for n in range(appends):
            time.sleep(rng.uniform(0.1, 0.3))  # not in step with the agent's poll
            count = acknowledged()
            with (logs / f"f{rng.randrange(files):05d}.log").open("a") as out:
                written = time.monotonic()
                out.write(f"line {n} written now\n")
            while acknowledged() == count:
                time.sleep(0.002)
            delays.append(time.monotonic() - written)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    return idle_cpu / idle, delays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured")
    parser.add_argument("--appends", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="50 files, 3 s idle, 10 appends")
    args = parser.parse_args()
    if args.quick:
        args.files, args.idle, args.appends = 50, 3.0, 10
    work = Path(tempfile.mkdtemp(prefix="logferry-bench-idle-"))
    (work / "logs").mkdir()
    for n in range(args.files):
        (work / "logs" / f"f{n:05d}.log").write_text(f"first line of file {n}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    server = subprocess.Popen([sys.executable, "-c", ACK_SERVER, str(port), "count"], cwd=ROOT, env=env)
    try:
        wait_http(f"{url}/stats")
        print(f"{args.files} files, {args.idle:.0f} s idle, {args.appends} single-line appends; "
              "defaults otherwise (poll_interval 100ms, discover_interval 1s, batch.max_wait 100ms)")
        for events in (True, False):
            share, delays = run(work, url, args.files, args.idle, args.appends, events)
            label = "file events" if events else "polling    "
            print(f"{label}: idle CPU {share * 100:.2f}% of a core; a line written to acknowledged (ms): "
                  f"p50 {statistics.median(delays) * 1000:.0f}  max {max(delays) * 1000:.0f}")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
