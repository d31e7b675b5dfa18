"""Retention tiers: TTL per row, re-tiering stored logs when the config changes."""

from __future__ import annotations

import datetime as dt

from collector.retention import retier_sync

NOW = dt.datetime.now(dt.UTC)


def stored(storage) -> dict[str, int]:
    return {r["message"]: r["retention_days"]
            for r in storage.query_sync("SELECT message, retention_days FROM application_logs")}


async def test_new_logs_get_their_sources_tier(make_client, make_config, admin_token, tokens, storage):
    config = make_config(retention={"default_tier": "standard",
                                    "rules": [{"sources": ["payments-*"], "tier": "enterprise"},
                                              {"sources": ["acme-*"], "tier": "premium"}]})
    client = await make_client(config)
    records = [{"timestamp": NOW.isoformat(), "level": "INFO", "source": s, "message": s}
               for s in ("web", "payments-api", "acme-web")]
    resp = await client.post("/v1/ingest", json={"agent_id": "a", "batch_id": "", "host": "h", "records": records},
                             headers=tokens.headers(admin_token))
    assert resp.status == 200, await resp.text()
    assert stored(storage) == {"web": 30, "payments-api": 365, "acme-web": 90}


def test_changing_a_tier_applies_to_stored_rows_and_their_ttl(storage, make_config):
    old = (NOW - dt.timedelta(days=45)).strftime("%Y-%m-%d %H:%M:%S.000")
    rows = [{"id": f"00000000-0000-0000-0000-00000000000{i}", "timestamp": old, "level": "INFO", "source": s,
             "message": s, "retention_days": 90} for i, s in enumerate(("payments-api", "web"))]
    storage.insert_rows_sync("application_logs", rows)
    premium = make_config(retention={"default_tier": "premium"})
    assert retier_sync(storage, premium, wait=True) == {}
    assert retier_sync(storage, premium, wait=True) is None  # unchanged config: nothing to do
    storage.command_sync("OPTIMIZE TABLE application_logs FINAL")
    assert stored(storage) == {"payments-api": 90, "web": 90}

    # Downgrade everything but payments to standard (30 days): the 45-day-old web log expires.
    standard = make_config(retention={"default_tier": "standard",
                                      "rules": [{"sources": ["payments-*"], "tier": "premium"}]})
    assert retier_sync(storage, standard, wait=True) == {30: ["web"]}
    storage.command_sync("OPTIMIZE TABLE application_logs FINAL")
    assert stored(storage) == {"payments-api": 90}
    audit = storage.query_sync("SELECT action, details FROM audit_log WHERE action = 'retention.retier'")
    assert audit and '"web"' in audit[-1]["details"]


def test_storage_strategy_ttls(storage):
    def ttl(table: str) -> str:
        return storage.query_sync(f"SHOW CREATE TABLE {table}")[0]["statement"].split("TTL", 1)[1]

    assert "toIntervalDay(7)" in ttl("notifications") and "scheduled_for" in ttl("notifications")
    assert "toIntervalDay(7)" in ttl("notification_deliveries")
    assert "toIntervalDay(90)" in ttl("email_messages")
    assert "TTL" not in storage.query_sync("SHOW CREATE TABLE audit_log")[0]["statement"]
