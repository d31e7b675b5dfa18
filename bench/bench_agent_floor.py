"""A yardstick for bench_agent on this machine: the least a Python tailer with
redaction does, in one bare loop, on bench_agent's 1M-line JSON file.

Read 1 MiB chunks, count lines, find card/SSN candidates with one google-re2
prefilter over the chunk, substitute in the lines it hits, zstd level 1 per
chunk: no checkpoints, spool, HTTP, parsing, issuer/Luhn checks or the other
rules (secrets, key names, JSON escapes) the agent has. The field notes' quick
prototype of about this loop took 0.92 CPU-s per 1M lines on the machine where
Fluent Bit took 1.37 (described in one line: its details are not known). Next
to bench_agent's figure on the same machine, this says how much of the agent's
CPU its own machinery costs beyond the bare work. CPU from ``getrusage`` of the
child process (its start included, as bench_agent counts the agent's), median of runs.

It runs the loop and bench_agent's agent in pairs, one right after the
other in alternating order (this machine's speed drifts by 10-40% over
minutes, so only figures of the same minute compare), and prints the agent's
CPU as a multiple of the loop's. The field notes' Fluent Bit took 1.37 / 0.92
= 1.49 times their prototype's CPU; the prototype split the lines where this
loop only counts them, and its description names no work this loop leaves
out, so on this machine Fluent Bit would take at least 1.49 times this loop's
CPU (if its C and this Python slow alike): the agent is compared with that.
The bound is only as good as that reading of a one-line description: here
this loop takes 1.5-1.9 times the prototype's 0.92 while google-re2 scans only
1.1-1.4 times slower than on that machine, so either the prototype did less
than this loop or this machine is slower at the rest (copies, page faults).

It also times two scans the field notes give rates for on that machine
(google-re2 and Python's re over lines without a match) and prints how much
slower or faster this machine is at them.

    python bench/bench_agent_floor.py             # 1M lines, 5 pairs
    python bench/bench_agent_floor.py --quick     # 100k lines, 3 pairs
    python bench/bench_agent_floor.py --no-agent  # the loop alone
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_agent import FLUENT_BIT_CPU_S, _one_run, generate

PROTOTYPE_CPU_S = 0.92  # the field notes' prototype, on the machine that measured Fluent Bit
# The field notes' scan rates on that machine, lines without matches: google-re2 and Python's re.
FIELD_NOTES_RE2_MBS, FIELD_NOTES_RE_MBS = 800.0, 25.0

SCAN_RATES = textwrap.dedent(
    r"""
    import re, resource, sys
    import re2
    pattern = rb"\d(?:[ +-]?\d){12,18}|\d{3}[- ]\d{2}[- ]\d{4}"
    with open(sys.argv[1], "rb") as f:
        data = f.read(64 << 20)
    slow = re.compile(pattern)
    clean = b"\n".join(line for line in data.split(b"\n") if slow.search(line) is None)
    fast = re2.compile(pattern)
    chunks = [clean[i:i + (1 << 20)] for i in range(0, len(clean), 1 << 20)]

    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    rates = []
    for _ in range(3):
        started = cpu()
        assert all(fast.search(chunk) is None for chunk in chunks)
        rates.append(len(clean) / (cpu() - started) / 1e6)
    sample = clean[:4 << 20]
    slow_rates = []
    for _ in range(3):
        started = cpu()
        assert slow.search(sample) is None
        slow_rates.append(len(sample) / (cpu() - started) / 1e6)
    print(max(rates), max(slow_rates))
    """
)

LOOP = textwrap.dedent(
    r"""
    import os, resource, sys
    import re2, zstandard
    card, ssn = rb"\d(?:[ +-]?\d){12,18}", rb"\d{3}[- ]\d{2}[- ]\d{4}"
    prefilter, cards, ssns = re2.compile(card + b"|" + ssn), re2.compile(card), re2.compile(ssn)
    compress = zstandard.ZstdCompressor(level=1).compress
    fd = os.open(sys.argv[1], os.O_RDONLY)
    lines = out = 0
    rest = b""
    while chunk := os.read(fd, 1 << 20):
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        data, rest = data[:cut], data[cut:]
        lines += data.count(b"\n")
        parts, pos = [], 0
        m = prefilter.search(data)
        while m is not None:
            start, end = data.rfind(b"\n", 0, m.start()) + 1, data.find(b"\n", m.end())
            line = cards.sub(b"[REDACTED:credit_card]", data[start:end])
            parts += [data[pos:start], ssns.sub(b"[REDACTED:ssn]", line)]
            pos = end
            m = prefilter.search(data, pos)
        parts.append(data[pos:])
        out += len(compress(b"".join(parts)))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(lines, usage.ru_utime + usage.ru_stime, out)
    """
)


def _floor_run(log: Path, lines: int) -> tuple[float, int]:
    """One run of the bare loop in its own process: CPU-s per 1M lines, compressed bytes."""
    done = subprocess.run([sys.executable, "-c", LOOP, str(log)], check=True, capture_output=True, text=True)
    counted, cpu, out = done.stdout.split()
    if int(counted) != lines:
        raise RuntimeError(f"the loop counted {counted} lines of {lines}")
    return float(cpu) * 1_000_000 / lines, int(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5, help="pairs of runs (the bare loop and the agent)")
    parser.add_argument("--quick", action="store_true", help="100k lines, 3 pairs")
    parser.add_argument("--no-agent", action="store_true", help="the bare loop alone, without the agent's runs")
    args = parser.parse_args()
    if args.quick:
        args.lines, args.runs = 100_000, 3
    with tempfile.TemporaryDirectory(prefix="logferry-bench-floor-") as work:
        # Where bench_agent --log finds a log it generated before (bench_agent.main).
        base = Path(work) / "app.log"
        log = base.with_name(f"{base.name}.{args.lines}")
        size = generate(log, args.lines)
        floors: list[float] = []
        agents: list[float] = []
        out = 0
        for run in range(args.runs):
            # The two in alternating order, one after the other: this machine's
            # speed drifts by 10-40% over minutes, so only figures taken in the
            # same minute compare.
            for which in ("floor", "agent")[:: 1 if run % 2 == 0 else -1]:
                if which == "floor":
                    figure, out = _floor_run(log, args.lines)
                    floors.append(figure)
                elif not args.no_agent:
                    result = _one_run(["--lines", str(args.lines), "--log", str(base)], None)
                    if isinstance(result, str):
                        print(result, file=sys.stderr)
                        return 1
                    agents.append(result[0])
            if agents:
                print(f"pair {run + 1}/{args.runs}: bare loop {floors[-1]:.2f}, agent {agents[-1]:.2f} CPU-s per 1M "
                      f"lines", flush=True)
        # How fast this machine scans (the best of 3 runs each), next to the field
        # notes' figures for the machine that measured Fluent Bit: a rough yardstick.
        done = subprocess.run([sys.executable, "-c", SCAN_RATES, str(log)], check=True, capture_output=True, text=True)
        re2_mbs, re_mbs = map(float, done.stdout.split())
    median = statistics.median(floors)
    print(f"bare loop (read, count lines, card/SSN prefilter + substitution in hit lines, zstd 1): "
          f"{median:.2f} CPU-s per 1M lines (min {min(floors):.2f}, max {max(floors):.2f}; "
          f"{size / args.lines:.0f} B/line, ratio {size / out:.2f}, {os.cpu_count()} CPUs)")
    print(f"(the field notes' prototype of about this loop: {PROTOTYPE_CPU_S:.2f} CPU-s on the machine where "
          f"Fluent Bit took {FLUENT_BIT_CPU_S:.2f}; it split the lines where this loop only counts them)")
    slower = statistics.mean([FIELD_NOTES_RE2_MBS / re2_mbs, FIELD_NOTES_RE_MBS / re_mbs])
    print(f"this machine scans lines without a card or SSN at {re2_mbs:.0f} MB/s with google-re2 and "
          f"{re_mbs:.1f} MB/s with Python's re (the field notes' machine: about {FIELD_NOTES_RE2_MBS:.0f} and "
          f"{FIELD_NOTES_RE_MBS:.0f}): {slower:.2f}x its time, so Fluent Bit's {FLUENT_BIT_CPU_S:.2f} there is "
          f"about {FLUENT_BIT_CPU_S * slower:.2f} CPU-s here, if Fluent Bit's C slows as these scans do "
          f"(a yardstick, not a measurement)")
    if agents:
        # Fluent Bit took FLUENT_BIT_CPU_S / PROTOTYPE_CPU_S times the prototype's CPU on
        # one machine. This loop does no more than the prototype did, so on this
        # machine, in the same minute, Fluent Bit would take at least that many
        # times this loop's CPU (if its C and this Python slow alike).
        factor = FLUENT_BIT_CPU_S / PROTOTYPE_CPU_S
        bounds = [floor * factor for floor in floors]
        below = sum(agent < bound for agent, bound in zip(agents, bounds, strict=True))
        ratios = [agent / floor for agent, floor in zip(agents, floors, strict=True)]
        print(f"agent (bench_agent, redaction on, HTTP to an ack server): median {statistics.median(agents):.2f} "
              f"CPU-s per 1M lines (min {min(agents):.2f}, max {max(agents):.2f}), {statistics.median(ratios):.2f}x "
              f"the bare loop in the same minute (median of {len(ratios)} pairs)")
        print(f"Fluent Bit here, from the field notes' ratio ({FLUENT_BIT_CPU_S:.2f} / {PROTOTYPE_CPU_S:.2f} = "
              f"{factor:.2f}x their prototype) and this loop: at least {statistics.median(bounds):.2f} CPU-s per 1M "
              f"lines; the agent is below that in {below} of {len(agents)} pairs "
              f"(agent / that bound: median {statistics.median(ratios) / factor:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
