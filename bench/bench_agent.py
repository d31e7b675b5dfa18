"""Agent throughput: CPU seconds per million lines, tail to acknowledged batches.

Generates a JSON log (about 190 bytes a line, 1% of lines with a card number
or an SSN), runs ``logferry-agent run`` as a real process with redaction on
(the default) against a local collector, waits until every line is
acknowledged, stops the agent with SIGTERM and reports the agent process's
CPU time (user + system) and peak RSS from ``wait4``.

The default collector is a minimal ack server in its own process (it counts
records and answers like the real one), so the figure is the agent's alone;
``--collector real`` ships to ``logferry-collector serve`` (chDB) instead.
``--profile`` runs the agent under cProfile and prints where the time goes.

    python bench/bench_agent.py               # 1M lines
    python bench/bench_agent.py --quick       # 100k lines
    python bench/bench_agent.py --lines 200000 --profile
    python bench/bench_agent.py --repeat 8      # median, min and max of 8 runs
    python bench/bench_agent.py --repeat 20 --against /tmp/old   # A/B: 20 pairs against another tree
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# --format regex: the plain lines, each field a named group.
PLAIN_PATTERN = (r"(?P<timestamp>\S+ \S+) (?P<level>[A-Z]+) (?P<message>.*?) request_id=(?P<request_id>\S+) "
                 r"user_id=(?P<user_id>\S+) took (?P<duration_ms>[\d.]+) ms$")
FLUENT_BIT_CPU_S = 1.37  # 1.16 user + 0.21 sys per 1M lines, tail + json parser, no redaction, no HTTP

ACK_SERVER = textwrap.dedent(
    """
    import sys, msgspec
    from aiohttp import web
    from agent.parsers import parse_shipped_lines
    from agent.wire import LINES_FEATURE, decode_msgpack_batch
    try:  # the formats it parses as shipped lines, as the collector says them
        from agent.parsers import SHIPPED_FORMATS
        from agent.wire import lines_feature
        FEATURES = sorted(lines_feature(fmt) for fmt in SHIPPED_FORMATS)
        from agent.wire import MULTILINE_FEATURE
        FEATURES = sorted([*FEATURES, MULTILINE_FEATURE])
    except ImportError:  # an agent tree from before other formats than JSON were shipped as read
        FEATURES = [LINES_FEATURE]
    seen = set()
    count = 0
    COUNT_ONLY = sys.argv[2] == "count"
    async def ingest(request):
        global count
        body = await request.read()
        batch = decode_msgpack_batch(body)
        if batch.batch_id in seen:
            return web.json_response({"accepted": 0, "rejected": [], "duplicate": True,
                                      "features": FEATURES})
        seen.add(batch.batch_id)
        # Lines shipped as read are parsed as the collector parses them.
        accepted = len(batch.records)
        lines = 0
        for group in batch.lines:
            if COUNT_ONLY:  # each line ends with a newline (agent.wire.Lines); none is blank here
                n = group.data.count(b"\\n")
                accepted += n
            else:
                numbered, n, _ = parse_shipped_lines(group, batch.host)
                accepted += len(numbered)
            lines += n
        count += accepted
        return web.json_response({"accepted": accepted, "rejected": [], "duplicate": False,
                                  "features": FEATURES, "lines": lines})
    async def stats(request):
        return web.json_response({"records": count})
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/ingest", ingest)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
    """
)

PATHS = ["/api/orders", "/api/users/me", "/api/cart/items", "/login", "/api/search", "/checkout/confirm"]
LEVELS = ["info"] * 6 + ["debug", "warn", "error"]
CARDS = ["4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005", "6011111111111117"]


def _vm_hwm(pid: int) -> int:
    """The process's peak resident set in KiB, from /proc (0 if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def generate(path: Path, lines: int, seed: int = 7, fmt: str = "json") -> int:
    """``lines`` log lines in ``fmt`` (json, logfmt, plain, nginx, syslog: RFC 5424
    with structured data, regex: plain lines, or multiline: plain lines, every 20th followed by a
    Java stack trace of 9 lines, so ``lines`` entries), 1% of them with a card number or an SSN;
    the same content whatever the format."""
    rng = random.Random(seed)
    size = 0
    start = time.time() - lines / 1000
    with path.open("w") as out:
        for i in range(lines):
            when = time.gmtime(start + i / 1000)
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", when) + f".{i % 1000:03d}Z"
            method, target = rng.choice(["GET", "POST", "PUT"]), f"{rng.choice(PATHS)}/{rng.randint(1, 99999)}"
            status = rng.choice([200, 200, 200, 201, 404, 500])
            secret = ""
            if i % 100 == 0:
                secret = (f"card {rng.choice(CARDS)}" if i % 200 == 0
                          else f"ssn {rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}")
            level, request_id = rng.choice(LEVELS), str(uuid.UUID(int=rng.getrandbits(128)))
            user_id, duration = f"u{rng.randint(1, 50000)}", round(rng.random() * 300, 2)
            if fmt == "nginx":
                query = f"?note={secret.replace(' ', '-')}" if secret else ""
                line = (f"10.{i % 200}.{rng.randint(0, 255)}.{rng.randint(1, 254)} - {user_id} "
                        f"[{time.strftime('%d/%b/%Y:%H:%M:%S +0000', when)}] \"{method} {target}{query} HTTP/1.1\" "
                        f"{status} {rng.randint(200, 20000)} \"-\" \"Mozilla/5.0 (X11; Linux x86_64) "
                        f"req/{request_id}\" {duration / 1000:.3f}")
            else:
                message = f"{method} {target} completed status={status}" + (f" {secret}" if secret else "")
                if fmt == "logfmt":
                    line = (f'ts={ts} level={level} msg="{message}" request_id={request_id} user_id={user_id} '
                            f"duration_ms={duration}")
                elif fmt == "syslog":
                    severity = {"debug": 7, "info": 6, "warn": 4, "error": 3}.get(level, 6)
                    line = (f'<{128 + severity}>1 {ts} web-{i % 8} shop {1000 + i % 50} - '
                            f'[req@32473 request_id="{request_id}" user_id="{user_id}" duration_ms="{duration}"] '
                            f"{message}")
                elif fmt in ("plain", "regex", "multiline"):  # regex: the plain lines, read with PLAIN_PATTERN
                    line = (f"{ts[:10]} {ts[11:23]} {level.upper()} {message} request_id={request_id} "
                            f"user_id={user_id} took {duration} ms")
                    if fmt == "multiline" and i % 20 == 7:  # a Java stack trace: 9 more lines
                        line += (f"\njava.lang.IllegalStateException: order {i} failed"
                                 + "".join(f"\n\tat com.example.shop.Orders.step{k}(Orders.java:{100 + k})"
                                           for k in range(8)))
                else:
                    line = json.dumps({"ts": ts, "level": level, "msg": message, "request_id": request_id,
                                       "user_id": user_id, "duration_ms": duration}, separators=(",", ":"))
            out.write(line + "\n")
            size += len(line) + 1
    return size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def _one_run(argv: list[str], pythonpath: str | None) -> tuple[float, str] | str:
    """One bench run in its own process: (CPU-s per 1M lines, peak RSS) or what went wrong."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=False, env=env)
    found = re.search(r"-> ([0-9.]+) CPU-s per 1M lines", done.stdout)
    if done.returncode != 0 or found is None:
        return f"{done.stdout}{done.stderr}exit {done.returncode}"
    rss = re.search(r"peak RSS: ([0-9.]+) MiB", done.stdout)
    return float(found.group(1)), rss.group(1) if rss else "?"


def repeat(times: int, log: Path | None, against: Path | None) -> int:
    """Run this bench ``times`` times with the same arguments, one process a
    run; with ``against``, ``times`` pairs: this checkout's agent and the one
    in ``against``, both on PYTHONPATH, in alternating order."""
    argv = []
    skip = False
    for arg in sys.argv[1:]:
        if skip or arg.startswith(("--repeat=", "--against=")):
            skip = False
            continue
        if arg in ("--repeat", "--against"):
            skip = True
            continue
        argv.append(arg)
    cache = None
    if log is None:
        cache = Path(tempfile.mkdtemp(prefix="logferry-bench-log-"))
        argv += ["--log", str(cache / "bench.log")]
    arms: list[tuple[str, str | None]] = [("", None)]
    if against is not None:
        arms = [("this", str(ROOT)), ("other", str(against.resolve()))]
    figures: dict[str, list[float]] = {name: [] for name, _ in arms}
    try:
        for run in range(1, times + 1):
            shown = []
            for name, path in arms if run % 2 else arms[::-1]:
                result = _one_run(argv, path)
                if isinstance(result, str):
                    print(result, file=sys.stderr)
                    print(f"run {run} ({name or 'the agent'}) failed", file=sys.stderr)
                    return 1
                figures[name].append(result[0])
                shown.append(f"{name + ' ' if name else ''}{result[0]:.2f} CPU-s (peak RSS {result[1]} MiB)")
            print(f"run {run}/{times}: " + ", ".join(shown), flush=True)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    for name, values in figures.items():
        label = f" ({name})" if name else ""
        print(f"agent CPU{label} over {times} runs: median {statistics.median(values):.2f}, "
              f"min {min(values):.2f}, max {max(values):.2f} CPU-s per 1M lines "
              f"(Fluent Bit tail+json, no redaction/HTTP: {FLUENT_BIT_CPU_S})")
    if against is not None:
        diffs = [a - b for a, b in zip(figures["this"], figures["other"], strict=True)]
        print(f"this - other, per pair: median {statistics.median(diffs):+.3f}, "
              f"mean {statistics.mean(diffs):+.3f} CPU-s; this lower in {sum(d < 0 for d in diffs)} of {times} pairs "
              "(same code: about half, and 6 pairs can differ by 10%)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100k lines")
    parser.add_argument("--format", choices=["json", "logfmt", "plain", "nginx", "syslog", "regex", "multiline"],
                        default="json",
                        help="the log's format (every one ships the lines without a redaction hit as read, "
                             "to a collector that parses that format)")
    parser.add_argument("--collector", choices=["ack", "ack-count", "real"], default="ack",
                        help="ack: an ack server that parses the lines shipped as read, as the collector does; "
                             "ack-count: one that only counts them (less CPU beside the agent); real: the collector")
    parser.add_argument("--profile", nargs="?", const="wall", choices=["wall", "cpu"],
                        help="print the agent's top functions (cProfile; `cpu`: timed by process CPU time, "
                             "which costs a system call per event)")
    parser.add_argument("--no-redact", action="store_true", help="turn redaction off, for comparison")
    parser.add_argument("--py-spy", type=Path, metavar="OUT",
                        help="sample the agent with py-spy (if installed) into OUT, collapsed stacks")
    parser.add_argument("--log", type=Path, help="generate the log here once and reuse it in later runs")
    parser.add_argument("--max-records", type=int, help="batch.max_records (default: the agent's, 10000)")
    parser.add_argument("--max-bytes", help="batch.max_bytes, e.g. 4MiB (default: the agent's, 2MiB)")
    parser.add_argument("--read-chunk", help="read_chunk, e.g. 1MiB (default: the agent's, 256KiB)")
    parser.add_argument("--zstd-level", type=int, help="collector.zstd_level (default: the agent's, 1)")
    parser.add_argument("--compression", choices=["zstd", "gzip", "none"],
                        help="collector.compression (default: the agent's)")
    parser.add_argument("--no-spool-sync", action="store_true", help="spool.sync: false (no fdatasync per group)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run N times (the log generated once) and print the median, min and max: a small "
                             "machine's CPU time for the same work drifts by 10-20%% over minutes")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="with --repeat N: N pairs of runs, this checkout's agent and the `agent` package in DIR "
                             "(e.g. `git archive REV agent | tar -x -C DIR`), in alternating order")
    args = parser.parse_args()
    if args.against is not None and not (args.against / "agent" / "__init__.py").is_file():
        parser.error(f"--against {args.against}: no agent package there")
    if args.repeat > 1 or args.against is not None:
        return repeat(max(args.repeat, 2), args.log, args.against)
    lines = 100_000 if args.quick else args.lines
    work = Path(tempfile.mkdtemp(prefix="logferry-bench-"))
    log_path = work / "logs" / "app.log"
    log_path.parent.mkdir()
    t0 = time.monotonic()
    if args.log is not None:
        suffix = "" if args.format == "json" else f".{args.format}"
        cached = args.log.with_name(f"{args.log.name}.{lines}{suffix}")
        if not cached.exists():
            generate(cached, lines, fmt=args.format)
        os.link(cached, log_path)
        size = log_path.stat().st_size
    else:
        size = generate(log_path, lines, fmt=args.format)
    print(f"generated {lines} lines, {size / 1e6:.1f} MB ({size / lines:.0f} B/line) in {time.monotonic() - t0:.1f}s")

    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    collector: subprocess.Popen[bytes] | None = None
    real = None
    if args.collector != "real":
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        collector = subprocess.Popen([sys.executable, "-c", ACK_SERVER, str(port),
                                      # Multiline entries span lines: counted as the records they make.
                                      "count" if args.collector == "ack-count" and args.format != "multiline"
                                      else "parse"], cwd=ROOT, env=env)
        wait_http(f"{url}/stats")
        token = "bench"

        def acknowledged() -> int:
            with urllib.request.urlopen(f"{url}/stats", timeout=5) as r:
                return int(json.loads(r.read())["records"])
    else:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import CollectorProcess

        (work / "collector").mkdir()
        real = CollectorProcess(work / "collector")
        real.start()
        url, token = real.url, real.ingest_token
        total = {"n": 0}

        def acknowledged() -> int:
            # Count through the agent's metrics instead: querying 1M rows is the collector's cost.
            return total["n"]

    metrics_port = free_port()
    config = work / "agent.yaml"
    config.write_text(json.dumps({"agent": {
        "collector": {"url": url, "token": token,
                      **({"zstd_level": args.zstd_level} if args.zstd_level is not None else {}),
                      **({"compression": args.compression} if args.compression else {})},
        "state_dir": str(work / "state"),
        "sources": [{"path": str(log_path.parent / "*.log"), "source": "bench",
                     "format": "plain" if args.format == "multiline" else args.format,
                     **({"pattern": PLAIN_PATTERN} if args.format == "regex" else {}),
                     **({"multiline": {"mode": "start"}} if args.format == "multiline" else {})}],
        "redact": {"enabled": not args.no_redact},
        **({"spool": {"sync": False}} if args.no_spool_sync else {}),
        **({"read_chunk": args.read_chunk} if args.read_chunk else {}),
        "batch": {"max_wait": "100ms", **({"max_records": args.max_records} if args.max_records else {}),
                  **({"max_bytes": args.max_bytes} if args.max_bytes else {})},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}", "summary_interval": 0},
    }}))
    command = [str(BIN / "logferry-agent"), "--log-level", "WARNING", "run", "-c", str(config)]
    profile_out = work / ("agent.prof.cpu" if args.profile == "cpu" else "agent.prof")
    if args.profile:
        # `wall` (cProfile's default clock) counts waits for the collector, the disk and the GIL too;
        # `cpu` counts none of them but inflates short calls.
        profiled = ("import cProfile, sys, time\n"
                    "from agent.cli import main\n"
                    "p = cProfile.Profile(time.process_time) if sys.argv[1].endswith('.cpu') else cProfile.Profile()\n"
                    "try:\n    p.runcall(main, sys.argv[2:])\n"
                    "finally:\n    p.dump_stats(sys.argv[1])\n")
        command = [sys.executable, "-c", profiled, str(profile_out),
                   "--log-level", "WARNING", "run", "-c", str(config)]
    started = time.monotonic()
    agent = subprocess.Popen(command, cwd=ROOT, env=env)
    spy = None
    if args.py_spy:
        # Samples the agent's threads; py-spy's idle detection misses some waits (fsync, queue gets).
        spy = subprocess.Popen([str(BIN / "py-spy"), "record", "-f", "raw", "-r", "200", "--nonblocking", "--gil",
                                "-o", str(args.py_spy), "--pid", str(agent.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def shipped() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("logferry_agent_records_shipped_total "):
                        return int(float(line.split()[1]))
        except OSError:
            pass
        return 0

    try:
        while True:
            n = acknowledged() if args.collector != "real" else shipped()
            if n >= lines:
                break
            if agent.poll() is not None:
                raise RuntimeError(f"agent exited with {agent.returncode}")
            if time.monotonic() - started > 900:
                raise RuntimeError(f"timed out with {n} of {lines} acknowledged")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        hwm = _vm_hwm(agent.pid)
        agent.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(agent.pid, 0)
        agent.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if agent.poll() is None:
            agent.kill()
        if spy is not None:
            spy.wait(60)
        if collector is not None:
            collector.terminate()
            collector.wait()
        if real is not None:
            real.stop()
    cpu = usage.ru_utime + usage.ru_stime
    per_million = cpu * 1_000_000 / lines
    print(f"agent: {lines} lines acknowledged in {elapsed:.2f}s wall ({lines / elapsed:,.0f} lines/s), "
          f"exit {agent.returncode}")
    print(f"agent CPU: {usage.ru_utime:.2f}s user + {usage.ru_stime:.2f}s sys = {cpu:.2f}s "
          f"-> {per_million:.2f} CPU-s per 1M lines (Fluent Bit tail+json, no redaction/HTTP: "
          f"{FLUENT_BIT_CPU_S:.2f})")
    # ru_maxrss also counts this process's size at the fork (Linux keeps the
    # pre-exec high-water mark); VmHWM is the agent's own, read before SIGTERM.
    print(f"agent peak RSS: {hwm / 1024:.1f} MiB (VmHWM; goal < 64 MiB), ru_maxrss {usage.ru_maxrss / 1024:.1f} MiB; "
          f"{usage.ru_minflt:,} page faults; {usage.ru_nvcsw + usage.ru_nivcsw:,} context switches; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"redaction: {'off' if args.no_redact else 'on'}; spool sync: {'off' if args.no_spool_sync else 'on'}; "
          f"collector: {args.collector}")
    if args.profile:
        import pstats

        print()
        pstats.Stats(str(profile_out)).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
