"""``logferry-agent``: run an agent, check its config, try redaction on stdin."""

from __future__ import annotations

import argparse
import logging
import sys

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
    redact = commands.add_parser("redact", help="print stdin lines redacted with the configured rules")
    redact.add_argument("-c", "--config", metavar="FILE")
    redact.add_argument("--counts", action="store_true", help="print matches per rule on stderr at the end")
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
    out.flush()
    if counts:
        for rule, n in sorted(redactor.counts.items()):
            print(f"{rule}: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
