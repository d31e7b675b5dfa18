"""``logferry-collector``: serve, migrate, tokens, pipelines."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import signal
import sys
import urllib.error
import urllib.request
import uuid
from typing import Any

from agent.configfile import ConfigInvalid, Duration
from collector.config import CollectorConfig, load_collector_config
from collector.storage import StorageLocked, StorageUnavailable, open_storage
from plugins.manager import PluginLoadError

log = logging.getLogger("logferry.collector")


def _load(path: str) -> CollectorConfig:
    config, _ = load_collector_config(path)
    return config


def _print_errors(exc: ConfigInvalid) -> int:
    for error in exc.errors:
        print(f"error: {error}", file=sys.stderr)
    return 2


# --- serve / migrate -----------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from collector.app import create_app, tune_gc
    from collector.logsetup import configure_logging

    config = _load(args.config)
    configure_logging(args.log_level)
    app = create_app(config)

    async def run() -> None:
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        try:
            await runner.setup()
        except StorageUnavailable as exc:
            raise SystemExit(f"error: {exc}") from None
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
        await site.start()
        tune_gc()
        log.info("collector listening", extra={"listen": config.listen, "storage": config.storage.dsn.split("@")[-1]})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("collector stopping")
        await runner.cleanup()
        log.info("collector stopped")

    asyncio.run(run())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from collector.schema import migrate

    config = _load(args.config)
    try:
        storage = open_storage(config.storage.dsn, config.storage.database)
    except StorageUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        applied = migrate(storage)
    finally:
        storage.close()
    if applied:
        for m in applied:
            print(f"applied migration {m.version}: {m.name}")
    else:
        print("schema is up to date")
    return 0


# --- tokens: directly on storage, or through the running collector -----------------


def _api(config: CollectorConfig, method: str, path: str, body: Any = None) -> Any:
    """Call a running collector's API with a short-lived bootstrap admin token."""
    from collector.auth import BOOTSTRAP_TTL, mint_token

    now = dt.datetime.now(dt.UTC)
    token = mint_token(config.secret_key, uuid.uuid4().hex, "admin", now + BOOTSTRAP_TTL - dt.timedelta(seconds=5),
                       issued_at=now.timestamp(), bootstrap=True)
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{host}:{config.port}{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise SystemExit(f"error: the running collector refused: {detail}") from None


def _with_storage_or_api(config: CollectorConfig, direct: Any, via_api: Any) -> Any:
    """Open storage directly; if a running collector holds it, go through its API."""
    try:
        storage = open_storage(config.storage.dsn, config.storage.database)
    except StorageLocked:
        try:
            return via_api()
        except OSError as exc:
            raise SystemExit(
                "error: the data folder is locked by another process, and no collector answers at "
                f"{config.listen} ({exc}). Stop the other process or start the collector."
            ) from None
    except StorageUnavailable as exc:
        # chDB does not always say "Cannot lock file" in the exception (the
        # detail may go to stderr only): a running collector may still be the
        # cause, so ask it before giving up.
        if not config.storage.dsn.startswith("chdb://"):
            raise SystemExit(f"error: {exc}") from None
        try:
            return via_api()
        except OSError as api_exc:
            raise SystemExit(f"error: {exc}; and no collector answers at {config.listen} ({api_exc})") from None
    try:
        from collector.schema import migrate

        migrate(storage)
        return direct(storage)
    finally:
        storage.close()


def cmd_token_create(args: argparse.Namespace) -> int:
    from collector.auth import TokenScope, TokenService

    config = _load(args.config)
    scope = None
    if args.sources or args.min_level or args.levels:
        try:
            scope = TokenScope(sources=args.sources or [], min_level=args.min_level, levels=args.levels)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    expires = None
    if args.expires_in:
        try:
            expires = dt.timedelta(seconds=Duration.parse(args.expires_in))
        except ValueError as exc:
            print(f"error: --expires-in: {exc}", file=sys.stderr)
            return 2

    def direct(storage: Any) -> tuple[str, str]:
        service = TokenService(storage, config.secret_key)
        service.load_sync()
        record, token = service.create_sync(
            kind=args.kind, name=args.name, created_by="cli", expires_in=expires, permissions=scope,
            ip_whitelist=args.ip or [], user_id=args.user,
        )
        return record.id, token

    def via_api() -> tuple[str, str]:
        body: dict[str, Any] = {"kind": args.kind, "name": args.name, "ip_whitelist": args.ip or [],
                                "user_id": args.user}
        if expires is not None:
            body["expires_in"] = expires.total_seconds()
        if scope is not None:
            body["permissions"] = {"sources": scope.sources, "min_level": scope.min_level, "levels": scope.levels}
        out = _api(config, "POST", "/v1/tokens", body)
        return out["id"], out["token"]

    try:
        token_id, token = _with_storage_or_api(config, direct, via_api)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"created {args.kind} token {token_id} ({args.name}); it is shown only this once:", file=sys.stderr)
    print(token)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from collector.auth import TokenService

    config = _load(args.config)

    def direct(storage: Any) -> list[dict[str, Any]]:
        service = TokenService(storage, config.secret_key)
        service.load_sync()
        return [{k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in r.public().items()}
                for r in service.list()]

    tokens = _with_storage_or_api(config, direct, lambda: _api(config, "GET", "/v1/tokens")["tokens"])
    print(f"{'ID':32}  {'KIND':8}  {'NAME':24}  {'EXPIRES':25}  {'USES':>6}  STATE")
    for t in tokens:
        state = "revoked" if t["revoked"] else "active"
        print(f"{t['id']:32}  {t['kind']:8}  {t['name'][:24]:24}  {str(t['expires_at'])[:25]:25}  "
              f"{t['use_count']:>6}  {state}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from collector.auth import TokenService

    config = _load(args.config)

    def direct(storage: Any) -> bool:
        service = TokenService(storage, config.secret_key)
        service.load_sync()
        return service.revoke_sync(args.id) is not None

    def via_api() -> bool:
        _api(config, "DELETE", f"/v1/tokens/{args.id}")
        return True

    if not _with_storage_or_api(config, direct, via_api):
        print(f"error: no token with id {args.id}", file=sys.stderr)
        return 1
    print(f"revoked token {args.id}")
    return 0


# --- pipelines -------------------------------------------------------------------


def cmd_pipelines_check(args: argparse.Namespace) -> int:
    from pipelines.cli import check_command

    return int(check_command(args.config))


def cmd_pipelines_test(args: argparse.Namespace) -> int:
    from pipelines.cli import test_command

    return int(test_command(args.pipeline, args.events))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logferry-collector", description="The logferry collector.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the collector (creates/migrates the schema on start)")
    serve.add_argument("-c", "--config", required=True)
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=cmd_serve)

    mig = sub.add_parser("migrate", help="create or upgrade the ClickHouse schema, idempotently")
    mig.add_argument("-c", "--config", required=True)
    mig.set_defaults(func=cmd_migrate)

    token = sub.add_parser("token", help="create, list or revoke tokens")
    tsub = token.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser("create", help="print a new token (the only time it is shown)")
    create.add_argument("-c", "--config", required=True)
    create.add_argument("--kind", required=True, choices=["admin", "ingest", "logs", "user", "service"])
    create.add_argument("--name", required=True)
    create.add_argument("--sources", nargs="+", metavar="GLOB")
    create.add_argument("--min-level")
    create.add_argument("--levels", nargs="+")
    create.add_argument("--ip", nargs="+", metavar="CIDR")
    create.add_argument("--expires-in", metavar="DURATION", help="e.g. 24h (default), 7d")
    create.add_argument("--user", metavar="USER_ID")
    create.set_defaults(func=cmd_token_create)
    lst = tsub.add_parser("list", help="list tokens without secrets")
    lst.add_argument("-c", "--config", required=True)
    lst.set_defaults(func=cmd_token_list)
    rev = tsub.add_parser("revoke", help="revoke a token by id")
    rev.add_argument("-c", "--config", required=True)
    rev.add_argument("id")
    rev.set_defaults(func=cmd_token_revoke)

    pipes = sub.add_parser("pipelines", help="check or dry-run pipelines")
    psub = pipes.add_subparsers(dest="pipelines_command", required=True)
    check = psub.add_parser("check", help="load every configured pipeline and plugin")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_pipelines_check)
    test = psub.add_parser("test", help="dry run a pipeline over events; sends nothing")
    test.add_argument("pipeline")
    test.add_argument("--events", required=True)
    test.set_defaults(func=cmd_pipelines_test)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigInvalid as exc:
        return _print_errors(exc)
    except PluginLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
