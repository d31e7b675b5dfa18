"""Tokens: the spec's LogAccessToken fields, the API, revocation, usage, the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import time

import jwt
import pytest

from collector.auth import TokenScope, TokenService, hash_token
from tests.conftest import SECRET, cli


async def create(client, admin, tokens, **body):
    resp = await client.post("/v1/tokens", json=body, headers=tokens.headers(admin))
    return resp.status, await resp.json()


async def test_created_token_has_every_field_of_the_spec(app_client, admin_token, tokens, storage):
    status, body = await create(app_client, admin_token, tokens, kind="logs", name="grafana",
                                permissions={"sources": ["payments-*"], "min_level": "warning"},
                                ip_whitelist=["10.0.0.0/8", "2001:db8::/32"], expires_in="2h")
    assert status == 201, body
    token = body["token"]
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], issuer="logferry")
    assert claims["jti"] == body["id"] and claims["knd"] == "logs"
    assert body["name"] == "grafana" and body["kind"] == "logs"
    assert body["permissions"] == {"sources": ["payments-*"], "min_level": "WARN"}
    assert body["ip_whitelist"] == ["10.0.0.0/8", "2001:db8::/32"]
    assert body["revoked"] is False and body["use_count"] == 0 and body["last_used"] is None
    assert "admin token" in body["created_by"]
    created = dt.datetime.fromisoformat(body["created_at"])
    expires = dt.datetime.fromisoformat(body["expires_at"])
    assert dt.timedelta(hours=2) - dt.timedelta(seconds=2) < expires - created <= dt.timedelta(hours=2)
    assert "token_hash" not in body
    [row] = storage.query_sync("SELECT token_hash, permissions FROM log_access_tokens FINAL WHERE id = {i:String}",
                               {"i": body["id"]})
    # Storage holds the SHA-256 of the token, never the token.
    assert row["token_hash"] == hash_token(token)
    assert token not in str(storage.query_sync("SELECT * FROM log_access_tokens"))


async def test_default_expiry_is_24_hours(app_client, admin_token, tokens):
    _, body = await create(app_client, admin_token, tokens, kind="service", name="app")
    span = dt.datetime.fromisoformat(body["expires_at"]) - dt.datetime.fromisoformat(body["created_at"])
    assert span == dt.timedelta(hours=24)


INVALID_REQUESTS = [
    ({"kind": "logs", "name": "x"}, "permissions"),
    ({"kind": "logs", "name": "x", "permissions": {}}, "permissions"),
    ({"kind": "root", "name": "x"}, "kind"),
    ({"kind": "service", "name": ""}, "name"),
    ({"kind": "service", "name": "x", "expires_in": "0s"}, "expires_in"),
    ({"kind": "service", "name": "x", "expires_in": "soon"}, "expires_in"),
    ({"kind": "service", "name": "x", "expires_in": -5}, "expires_in"),
    ({"kind": "user", "name": "x"}, "user_id"),
    ({"kind": "service", "name": "x", "ip_whitelist": ["10.0.0.0/33"]}, "ip_whitelist"),
    ({"kind": "logs", "name": "x", "permissions": {"min_level": "LOUD"}}, "min_level"),
    ({"kind": "logs", "name": "x", "permissions": {"sources": ["a"], "admin": True}}, "admin"),
]


async def test_invalid_token_requests_name_the_field(app_client, admin_token, tokens):
    for body, field in INVALID_REQUESTS:
        status, err = await create(app_client, admin_token, tokens, **body)
        assert status == 400, (body, err)
        assert field in err["error"]["message"], (body, err)


async def test_list_never_shows_secrets_and_revoke_is_immediate(app_client, admin_token, tokens, storage):
    _, made = await create(app_client, admin_token, tokens, kind="logs", name="ro",
                           permissions={"sources": ["*"]})
    headers = tokens.headers(made["token"])
    assert (await app_client.get("/v1/logs", headers=headers)).status == 200
    resp = await app_client.get("/v1/tokens", headers=tokens.headers(admin_token))
    listed = {t["id"]: t for t in (await resp.json())["tokens"]}
    assert made["token"] not in str(listed)
    assert not any("token_hash" in t or "token" in t for t in listed.values())
    assert listed[made["id"]]["use_count"] == 1
    resp = await app_client.delete(f"/v1/tokens/{made['id']}", headers=tokens.headers(admin_token))
    assert resp.status == 200 and (await resp.json())["revoked"] is True
    # Refused on the very next request.
    assert (await app_client.get("/v1/logs", headers=headers)).status == 401
    resp = await app_client.delete("/v1/tokens/nope", headers=tokens.headers(admin_token))
    assert resp.status == 404
    actions = [r["action"] for r in storage.query_sync("SELECT action FROM audit_log ORDER BY at")]
    assert actions == ["token.create", "token.revoke"]


async def test_revocation_reaches_another_collector_within_a_second(make_client, make_config, tokens):
    admin = tokens.create("admin")
    logs = tokens.create("logs", scope=TokenScope(sources=["*"]))
    first = await make_client(make_config())
    second = await make_client(make_config())  # shares the storage, like collectors behind a load balancer
    assert (await second.get("/v1/logs", headers=tokens.headers(logs))).status == 200
    token_id = jwt.decode(logs, options={"verify_signature": False})["jti"]
    resp = await first.delete(f"/v1/tokens/{token_id}", headers=tokens.headers(admin))
    assert resp.status == 200
    revoked_at = time.monotonic()
    while (await second.get("/v1/logs", headers=tokens.headers(logs))).status == 200:
        assert time.monotonic() - revoked_at < 1.5, "still accepted after 1.5 s"
        await asyncio.sleep(0.05)
    assert time.monotonic() - revoked_at <= 1.5


async def test_usage_is_counted_in_memory_and_survives_a_restart(make_client, make_config, tokens, storage):
    admin = tokens.create("admin")
    logs = tokens.create("logs", scope=TokenScope(min_level="ERROR"))
    client = await make_client(make_config())
    for _ in range(3):
        assert (await client.get("/v1/logs", headers=tokens.headers(logs))).status == 200
    # No storage write per request.
    assert storage.query_sync("SELECT count() n FROM log_token_usage")[0]["n"] == 0
    await client.close()  # flushes usage on shutdown
    client = await make_client(make_config())
    resp = await client.get("/v1/tokens", headers=tokens.headers(admin))
    by_name = {t["name"]: t for t in (await resp.json())["tokens"]}
    assert by_name["test-logs"]["use_count"] == 3
    assert by_name["test-logs"]["last_used"] is not None


def test_usage_counts_from_two_collectors_add_up(storage):
    one, two = TokenService(storage, SECRET), TokenService(storage, SECRET)
    record, token = one.create_sync(kind="service", name="s", created_by="t")
    two.load_sync()

    async def use(service: TokenService, n: int) -> None:
        for _ in range(n):
            await service.verify(token, "127.0.0.1")

    asyncio.run(use(one, 2))
    asyncio.run(use(two, 5))
    one.flush_usage_sync()
    two.flush_usage_sync()
    three = TokenService(storage, SECRET)
    three.load_sync()
    assert three.get(record.id).use_count == 7


def test_cli_creates_lists_and_revokes_tokens(tmp_path):
    config = tmp_path / "logferry.yaml"
    config.write_text(f"collector:\n  secret_key: {SECRET}\n  storage: {{dsn: 'chdb://{tmp_path}/ch'}}\n")
    made = subprocess.run([cli("logferry-collector"), "token", "create", "-c", str(config), "--kind", "logs",
                           "--name", "ci", "--sources", "web", "api-*", "--min-level", "WARN",
                           "--ip", "10.0.0.0/8", "::1/128", "--expires-in", "1h"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    token_id = jwt.decode(token, SECRET, algorithms=["HS256"], issuer="logferry")["jti"]
    listed = subprocess.run([cli("logferry-collector"), "token", "list", "-c", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and token_id in listed.stdout and "active" in listed.stdout
    assert token not in listed.stdout
    revoked = subprocess.run([cli("logferry-collector"), "token", "revoke", "-c", str(config), token_id],
                             capture_output=True, text=True, timeout=120)
    assert revoked.returncode == 0, revoked.stderr
    listed = subprocess.run([cli("logferry-collector"), "token", "list", "-c", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert "revoked" in listed.stdout
    bad = subprocess.run([cli("logferry-collector"), "token", "create", "-c", str(config), "--kind", "logs",
                          "--name", "unscoped"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "permissions" in bad.stderr


@pytest.mark.slow
# The shared CollectorProcess fixture leaves its log file open (reported to its owner).
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_cli_goes_through_the_running_collector_when_it_holds_the_data(collector_process):
    """chDB's folder is locked by `serve`: the CLI uses the API with a bootstrap token."""
    import urllib.error
    import urllib.request

    token = collector_process.create_token("logs", "while-running", "--sources", "web")
    token_id = jwt.decode(token, SECRET, algorithms=["HS256"], issuer="logferry")["jti"]
    request = urllib.request.Request(f"{collector_process.url}/v1/logs",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    config = str(collector_process.config_path)
    out = subprocess.run([cli("logferry-collector"), "token", "revoke", "-c", config, token_id],
                         capture_output=True, text=True, timeout=120, cwd=collector_process.workdir)
    assert out.returncode == 0, out.stderr
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    refused.value.close()
    listed = subprocess.run([cli("logferry-collector"), "token", "list", "-c", config],
                            capture_output=True, text=True, timeout=120, cwd=collector_process.workdir)
    assert token_id in listed.stdout and "revoked" in listed.stdout
