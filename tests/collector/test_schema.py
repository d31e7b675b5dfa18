"""Migrations: idempotent, and every field of every entity of the data model exists."""

from __future__ import annotations

import datetime as dt

from collector.schema import all_migrations, migrate
from collector.storage import Storage

# data-model.md, entity by entity (the JWT itself is never stored: token_hash is).
SPEC_FIELDS = {
    "application_logs": ["id", "timestamp", "level", "source", "message", "context", "user_id", "session_id",
                         "request_id", "ip_address", "user_agent", "duration_ms", "error_stack", "tags"],
    "log_access_tokens": ["token_hash", "created_by", "created_at", "expires_at", "permissions", "name",
                          "last_used", "use_count", "ip_whitelist", "revoked"],
    "notifications": ["id", "user_id", "type", "priority", "title", "message", "data", "channels", "created_at",
                      "scheduled_for", "sent_at", "status", "delivery_attempts", "error_message", "dedup_key"],
    "notification_preferences": ["id", "user_id", "notification_type", "enabled", "channels", "quiet_hours",
                                 "frequency", "created_at", "updated_at"],
    "email_messages": ["id", "message_id", "from", "to", "cc", "bcc", "subject", "html_body", "text_body",
                       "attachments", "template_id", "template_data", "provider", "status", "created_at", "sent_at",
                       "delivered_at", "opened_at", "clicked_at", "bounce_type", "error_message", "retry_count"],
    "notification_deliveries": ["id", "notification_id", "channel", "status", "sent_at", "delivered_at",
                                "failed_at", "provider_message_id", "error_message", "metadata"],
    "contact_submissions": ["id", "name", "email", "phone", "subject", "message", "attachments", "ip_address",
                            "user_agent", "referrer", "submitted_at", "status", "assigned_to", "responded_at",
                            "response_email_id"],
    "audit_log": ["id", "at", "actor", "action", "target", "details"],
}


def test_running_migrations_twice_applies_nothing_the_second_time(storage: Storage) -> None:
    # The fixture already migrated; a second and third run change nothing.
    assert migrate(storage) == []
    assert migrate(storage) == []
    versions = [r["version"] for r in storage.query_sync("SELECT version FROM schema_migrations FINAL")]
    assert sorted(versions) == [m.version for m in all_migrations()]


def test_a_fresh_database_gets_every_table(chdb_dsn: str) -> None:
    fresh = Storage(chdb_dsn, "t_fresh_schema")
    try:
        applied = migrate(fresh)
        assert [m.version for m in applied] == [m.version for m in all_migrations()]
        tables = {r["name"] for r in fresh.query_sync("SHOW TABLES")}
        assert set(SPEC_FIELDS) <= tables
        assert {"users", "email_suppressions", "ingest_batches", "schema_migrations"} <= tables
    finally:
        fresh.command_sync("DROP DATABASE IF EXISTS t_fresh_schema")
        fresh.close()


def test_every_entity_has_every_field_of_the_spec(storage: Storage) -> None:
    for table, fields in SPEC_FIELDS.items():
        columns = {r["name"] for r in storage.query_sync(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            {"db": storage.database, "t": table})}
        missing = [f for f in fields if f not in columns]
        assert not missing, f"{table} lacks {missing}"


def test_logs_have_retention_ttl_day_partitions_and_a_text_index(storage: Storage) -> None:
    ddl = storage.command_sync("SHOW CREATE TABLE application_logs")
    assert "TTL toDateTime(timestamp) + toIntervalDay(retention_days)" in ddl
    assert "PARTITION BY toYYYYMMDD(timestamp)" in ddl
    assert "TYPE text(" in ddl
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.000")
    storage.insert_rows_sync("application_logs", [
        {"id": "00000000-0000-0000-0000-000000000001", "timestamp": now, "level": "INFO",
         "source": "web", "message": "Payment Declined", "tags": ["billing"]}])
    rows = storage.query_sync("SELECT count() AS n FROM application_logs WHERE hasAllTokens(message, ['declined'])")
    assert rows == [{"n": 1}]


def test_mutable_entities_keep_the_newest_version(storage: Storage) -> None:
    base = {"user_id": "u1", "notification_type": "alerts", "id": "00000000-0000-0000-0000-000000000002",
            "channels": {"email": True}, "frequency": "INSTANT", "created_at": "2026-11-25 10:00:00.000",
            "updated_at": "2026-11-25 10:00:00.000"}
    storage.insert_rows_sync("notification_preferences", [{**base, "enabled": True, "version": 1}])
    storage.insert_rows_sync("notification_preferences", [{**base, "enabled": False, "version": 3}])
    storage.insert_rows_sync("notification_preferences", [{**base, "enabled": True, "version": 2}])
    rows = storage.query_sync("SELECT enabled FROM notification_preferences FINAL WHERE user_id = 'u1'")
    assert rows == [{"enabled": False}]


def test_the_granularity_rebuild_keeps_every_log_and_the_batch_view(chdb_dsn: str) -> None:
    """Migration 17 rebuilds application_logs (index_granularity cannot be
    altered): stored logs survive it exactly once, a run interrupted after the
    swap is run again harmlessly, and ingested batches are still recorded."""
    import uuid

    from collector.logs_schema import MIGRATIONS as LOG_MIGRATIONS
    from tests.collector.conftest import log_row

    db = Storage(chdb_dsn, "t_rebuild_upgrade")
    try:
        migrate(db, [m for m in all_migrations() if m.version < 17])
        now = dt.datetime.now(dt.UTC)
        rows = [log_row(timestamp=now - dt.timedelta(minutes=i), message=f"log {i}", user_id=f"u{i % 7}",
                        tags=["a", "B"], batch_id="b-old", retention_days=90) for i in range(3000)]
        db.insert_rows_sync("application_logs", rows)
        columns = "toString(id) AS id, message, user_id, tags, batch_id, retention_days"
        before = db.query_sync(f"SELECT {columns} FROM application_logs ORDER BY id")
        assert [m.version for m in migrate(db)] == [m.version for m in all_migrations() if m.version >= 17]
        after = db.query_sync(f"SELECT {columns} FROM application_logs ORDER BY id")
        assert after == before and len(after) == 3000

        [ddl] = db.query_sync("SHOW CREATE TABLE application_logs")
        text = ddl["statement"]
        assert "index_granularity = 1024" in text and "max_compress_block_size = 65536" in text
        assert "WITH SETTINGS (index_granularity = 8192)" in text  # the per-minute projection
        assert text.count("bloom_filter(0.01) GRANULARITY 16") == 3
        assert "idx_message" in text and "preprocessor = lower(tags)" in text
        assert {r["name"] for r in db.query_sync("SHOW TABLES")}.isdisjoint({"application_logs_rebuild"})

        # Interrupted after the swap: the whole migration runs again, nothing doubles.
        [seventeen] = [m for m in LOG_MIGRATIONS if m.version == 17]
        for statement in seventeen.statements:
            db.command_sync(statement)
        assert db.query_sync(f"SELECT {columns} FROM application_logs ORDER BY id") == before

        # The view still records batches from the logs' own insert.
        batch_id = str(uuid.uuid4())
        db.insert_rows_sync("application_logs", [log_row(batch_id=batch_id, agent_id="ag") for _ in range(3)])
        [recorded] = db.query_sync("SELECT agent_id, sum(accepted) AS n FROM ingest_batches "
                                   "WHERE batch_id = {b:String} GROUP BY agent_id", {"b": batch_id})
        assert recorded == {"agent_id": "ag", "n": 3}
    finally:
        db.command_sync("DROP DATABASE IF EXISTS t_rebuild_upgrade")
        db.close()
