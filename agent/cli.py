"""``logferry-agent``: run an agent, check its config, try redaction on stdin."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, get_args

from agent.config import Format
from agent.configfile import ConfigError, ConfigInvalid


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logferry-agent", description="Tail, parse, redact and ship logs.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the agent with the `agent:` section of FILE")
    run.add_argument("-c", "--config", required=True, metavar="FILE")
    check = commands.add_parser(
        "check", help="validate the agent config; exit 0, or print every error and exit 2"
    )
    check.add_argument("-c", "--config", required=True, metavar="FILE")
    redact = commands.add_parser(
        "redact", help="print stdin lines redacted with the configured rules",
        description="Print stdin lines redacted with the rules of FILE (the defaults without it). With "
                    "--source or --format, parse each line as that source would and print the redacted "
                    "records as JSON, one a line: what the collector stores.")
    redact.add_argument("-c", "--config", metavar="FILE")
    redact.add_argument("--counts", action="store_true", help="print matches per rule on stderr at the end")
    how = redact.add_mutually_exclusive_group()
    how.add_argument("--source", metavar="NAME", help="parse as FILE's source NAME (its format, pattern, fields, "
                                                      "tags and multiline joining)")
    how.add_argument("--format", choices=sorted(get_args(Format)), help="parse as a source of this format")
    redact.add_argument("--pattern", help="the named-group pattern of --format regex")
    return parser


def _load(path: str) -> object:
    from agent.config import load_agent_config

    cfg = load_agent_config(path)
    if not cfg.sources:
        raise ConfigInvalid([ConfigError("agent.sources", "at least one source is required", path)])
    return cfg


def _print_errors(exc: ConfigInvalid) -> int:
    for error in exc.errors:
        print(str(error), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "check":
        try:
            cfg = _load(args.config)
        except ConfigInvalid as exc:
            return _print_errors(exc)
        from agent.config import AgentConfig

        assert isinstance(cfg, AgentConfig)
        if not cfg.collector.token:
            print(f"{args.config}: agent.collector.token: warning: empty (is the environment variable set?)",
                  file=sys.stderr)
        print(f"{args.config}: ok ({len(cfg.sources)} sources)")
        return 0
    if args.command == "redact":
        if args.source or args.format:
            return _redact_records(args.config, args.source, args.format, args.pattern, args.counts)
        return _redact(args.config, args.counts)
    try:
        cfg = _load(args.config)
    except ConfigInvalid as exc:
        return _print_errors(exc)
    from agent.config import AgentConfig
    from agent.runner import run_agent

    assert isinstance(cfg, AgentConfig)
    try:
        return run_agent(cfg, args.config)
    except RuntimeError as exc:
        print(f"logferry-agent: {exc}", file=sys.stderr)
        return 1


def _redact(path: str | None, counts: bool) -> int:
    from agent.config import RedactConfig
    from agent.redact import Redactor

    cfg = RedactConfig()
    if path:
        from agent.config import load_agent_config

        try:
            cfg = load_agent_config(path).redact
        except ConfigInvalid as exc:
            return _print_errors(exc)
    redactor = Redactor.from_config(cfg)
    out = sys.stdout
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", "replace")
        newline = line.endswith("\n")
        text = line[:-1] if newline else line
        out.write(redactor.redact_text(text) + ("\n" if newline else ""))
    return _done(out, redactor, counts)


def _redact_records(path: str | None, source: str | None, fmt: str | None, pattern: str | None,
                    counts: bool) -> int:
    """stdin's lines parsed as a source, redacted, as JSON records (one a line)."""
    import msgspec

    from agent.config import RedactConfig, SourceConfig, load_agent_config
    from agent.parsers import LineParser
    from agent.redact import Redactor

    redact_cfg = RedactConfig()
    try:
        if path:
            cfg = load_agent_config(path)
            redact_cfg = cfg.redact
            if source is not None:
                matches = [s for s in cfg.sources if s.source == source]
                if not matches:
                    names = ", ".join(sorted({s.source for s in cfg.sources})) or "none"
                    print(f"{path}: agent.sources: no source named {source!r} (there are: {names})",
                          file=sys.stderr)
                    return 2
                src = matches[0]
        elif source is not None:
            print("logferry-agent redact: --source needs -c FILE", file=sys.stderr)
            return 2
        if source is None:
            src = msgspec.convert({"path": "-", "source": "stdin", "format": fmt, "pattern": pattern},
                                  SourceConfig)
    except ConfigInvalid as exc:
        return _print_errors(exc)
    except (msgspec.ValidationError, ValueError) as exc:
        print(f"logferry-agent redact: {exc}", file=sys.stderr)
        return 2
    parser = LineParser(src, "stdin")
    redactor = Redactor.from_config(redact_cfg)
    encode = msgspec.json.Encoder().encode
    out = sys.stdout.buffer
    offset = 0
    batch: list[bytes] = []
    starts: list[int] = []
    if src.multiline is not None:
        # The source's entries, joined as the agent joins them (the last one at the end of input).
        from agent.multiline import MultilineJoiner

        joiner = MultilineJoiner(src.multiline)

        def emit(entries: list[tuple[str, list[str], int, int]]) -> None:
            for first, rest, start, _ in entries:
                out.write(encode(redactor.redact_record(parser.parse_entry(first, rest, start, None))) + b"\n")

        for raw in sys.stdin.buffer:
            line = raw[:-1] if raw.endswith(b"\n") else raw
            emit(joiner.feed(parser.decode(line), offset, offset + len(raw), 0.0))
            offset += len(raw)
        emit(joiner.flush())
        return _done(out, redactor, counts)

    def flush() -> None:
        for record in parser.parse_lines(batch, starts, None):
            out.write(encode(redactor.redact_record(record)) + b"\n")
        batch.clear()
        starts.clear()

    for raw in sys.stdin.buffer:
        line = raw[:-1] if raw.endswith(b"\n") else raw
        batch.append(line)
        starts.append(offset)
        offset += len(raw)
        if len(batch) >= 1000:
            flush()
    flush()
    return _done(out, redactor, counts)


def _done(out: Any, redactor: Any, counts: bool) -> int:
    out.flush()
    if counts:
        for rule, n in sorted(redactor.counts.items()):
            print(f"{rule}: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
