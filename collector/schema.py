"""The ClickHouse schema: versioned, idempotent migrations.

Migration 1 creates a table for every entity of data-model.md. Features add
their own migrations in their own modules (numbered in their own range:
10–19 logs/tokens, 20–29 pipelines, 30–39 notifications, 40–49 email,
50–59 contact forms) and list the module in ``MIGRATION_MODULES``.

Design, per table:
- Immutable, high-volume rows (logs, audit) use MergeTree.
- Mutable entities use ReplacingMergeTree(version): an update is a new row
  with a larger version; reads use FINAL (or argMax) so concurrent writers
  resolve to the newest version. The ORDER BY is the entity's identity, so
  two versions of one entity always collapse together.
- Every index the spec lists is served by an ORDER BY prefix, a projection or a
  skip index; the comment beside each says which.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable

import msgspec

from collector.storage import Storage

log = logging.getLogger("logferry.collector.schema")


class Migration(msgspec.Struct, frozen=True):
    version: int
    name: str
    statements: tuple[str, ...]


LEVEL_ENUM = "Enum8('DEBUG' = 1, 'INFO' = 2, 'WARN' = 3, 'ERROR' = 4, 'CRITICAL' = 5)"

MIGRATIONS: list[Migration] = [
    Migration(1, "every entity of the data model", (
        # ApplicationLog.
        # - ORDER BY (toStartOfHour(timestamp), source, level, timestamp): the
        #   primary index serves `timestamp` ranges (hour buckets, then exact),
        #   `source, timestamp` (source is the second key) and `level, timestamp`.
        # - idx_level (minmax) skips granules below a minimum level.
        # - idx_user (bloom_filter) serves `user_id, timestamp`; session/request ids likewise.
        # - idx_message / idx_tags: the full-text `text` index (GA since 26.2)
        #   for `message, tags` search (hasAllTokens / hasToken / hasPhrase).
        # - Per-row retention: retention_days (30/90/365) drives the TTL, so a tier
        #   change for existing rows is an ALTER … UPDATE of that column.
        # - Codecs: Delta+ZSTD for the monotonic-ish timestamp, ZSTD(3) for text,
        #   LowCardinality for sources and hosts.
        f"""CREATE TABLE IF NOT EXISTS application_logs (
            id UUID,
            timestamp DateTime64(3, 'UTC') CODEC(Delta(8), ZSTD(1)),
            level {LEVEL_ENUM},
            source LowCardinality(String),
            message String CODEC(ZSTD(3)),
            context String DEFAULT '{{}}' CODEC(ZSTD(3)),
            user_id Nullable(String),
            session_id Nullable(String),
            request_id Nullable(String),
            ip_address Nullable(String),
            user_agent Nullable(String) CODEC(ZSTD(3)),
            duration_ms Nullable(Float64),
            error_stack Nullable(String) CODEC(ZSTD(3)),
            tags Array(LowCardinality(String)),
            host LowCardinality(String) DEFAULT '',
            file String DEFAULT '' CODEC(ZSTD(3)),
            offset UInt64 DEFAULT 0 CODEC(Delta(8), ZSTD(1)),
            agent_id LowCardinality(String) DEFAULT '',
            batch_id String DEFAULT '' CODEC(ZSTD(1)),
            ingested_at DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta(8), ZSTD(1)),
            retention_days UInt16 DEFAULT 30,
            INDEX idx_level level TYPE minmax GRANULARITY 1,
            INDEX idx_user user_id TYPE bloom_filter(0.01) GRANULARITY 2,
            INDEX idx_session session_id TYPE bloom_filter(0.01) GRANULARITY 2,
            INDEX idx_request request_id TYPE bloom_filter(0.01) GRANULARITY 2,
            INDEX idx_message message TYPE text(tokenizer = splitByNonAlpha, preprocessor = lower(message)),
            INDEX idx_tags tags TYPE text(tokenizer = splitByNonAlpha)
        ) ENGINE = MergeTree
        PARTITION BY toYYYYMMDD(timestamp)
        ORDER BY (toStartOfHour(timestamp), source, level, timestamp)
        TTL toDateTime(timestamp) + toIntervalDay(retention_days)
        SETTINGS index_granularity = 8192""",
        # Ingest idempotency: one row per stored batch_id, kept a week (longer
        # than any agent retries), so a resent batch is recognised after a restart.
        """CREATE TABLE IF NOT EXISTS ingest_batches (
            batch_id String,
            agent_id LowCardinality(String),
            received_at DateTime64(3, 'UTC'),
            accepted UInt32
        ) ENGINE = ReplacingMergeTree
        ORDER BY batch_id
        TTL toDateTime(received_at) + INTERVAL 7 DAY""",
        # LogAccessToken and the other token kinds. The JWT itself is never
        # stored: token_hash (SHA-256) is the lookup key; id is the JWT's jti.
        # ORDER BY id is the identity; token_hash lookups go through a bloom filter
        # (and the collector's in-memory cache).
        """CREATE TABLE IF NOT EXISTS log_access_tokens (
            id String,
            token_hash String,
            kind LowCardinality(String),
            name String,
            created_by String,
            created_at DateTime64(3, 'UTC'),
            expires_at DateTime64(3, 'UTC'),
            permissions String DEFAULT '{}',
            user_id Nullable(String),
            last_used Nullable(DateTime64(3, 'UTC')),
            use_count UInt64 DEFAULT 0,
            ip_whitelist Array(String),
            revoked Bool DEFAULT false,
            version UInt64,
            INDEX idx_hash token_hash TYPE bloom_filter(0.001) GRANULARITY 1
        ) ENGINE = ReplacingMergeTree(version)
        ORDER BY id""",
        # Notification.
        # - ORDER BY (user_id, created_at, id): serves `user_id, created_at`.
        # - idx_status + idx_scheduled: `status, scheduled_for` (the live queue
        #   itself is in memory; this serves the rebuild on start).
        # - idx_dedup (bloom_filter) + created_at: `dedup_key, created_at`.
        # - idx_title / idx_nmessage: full-text `title, message`.
        """CREATE TABLE IF NOT EXISTS notifications (
            id UUID,
            user_id String,
            type LowCardinality(String),
            priority Enum8('LOW' = 1, 'MEDIUM' = 2, 'HIGH' = 3, 'CRITICAL' = 4),
            title String,
            message String CODEC(ZSTD(3)),
            data Nullable(String),
            channels Array(LowCardinality(String)),
            created_at DateTime64(3, 'UTC'),
            scheduled_for Nullable(DateTime64(3, 'UTC')),
            sent_at Nullable(DateTime64(3, 'UTC')),
            status Enum8('PENDING' = 1, 'QUEUED' = 2, 'SENT' = 3, 'FAILED' = 4, 'CANCELLED' = 5),
            delivery_attempts UInt16 DEFAULT 0,
            error_message Nullable(String),
            dedup_key Nullable(String),
            read_at Nullable(DateTime64(3, 'UTC')),
            version UInt64,
            INDEX idx_status status TYPE set(8) GRANULARITY 1,
            INDEX idx_scheduled scheduled_for TYPE minmax GRANULARITY 1,
            INDEX idx_dedup dedup_key TYPE bloom_filter(0.01) GRANULARITY 1,
            INDEX idx_title title TYPE text(tokenizer = splitByNonAlpha, preprocessor = lower(title)),
            INDEX idx_nmessage message TYPE text(tokenizer = splitByNonAlpha, preprocessor = lower(message))
        ) ENGINE = ReplacingMergeTree(version)
        ORDER BY (user_id, created_at, id)
        TTL toDateTime(created_at) + INTERVAL 30 DAY""",
        # NotificationPreference: ORDER BY (user_id, notification_type) makes the
        # pair unique by construction (the spec's validation rule).
        """CREATE TABLE IF NOT EXISTS notification_preferences (
            id UUID,
            user_id String,
            notification_type String,
            enabled Bool DEFAULT true,
            channels Map(LowCardinality(String), Bool),
            quiet_hours Nullable(String),
            frequency Enum8('INSTANT' = 1, 'BATCHED_5MIN' = 2, 'BATCHED_HOURLY' = 3, 'DAILY_DIGEST' = 4),
            created_at DateTime64(3, 'UTC'),
            updated_at DateTime64(3, 'UTC'),
            version UInt64,
            deleted UInt8 DEFAULT 0
        ) ENGINE = ReplacingMergeTree(version, deleted)
        ORDER BY (user_id, notification_type)""",
        # EmailMessage. Addresses are encrypted (AES-GCM) with keyed hashes for
        # lookups (the spec's PII rule).
        # - ORDER BY (created_at, id); idx_estatus + the key's created_at serve
        #   `status, created_at`; idx_message_id (bloom) serves webhook lookups by
        #   provider `message_id`; full-text on subject and text_body.
        """CREATE TABLE IF NOT EXISTS email_messages (
            id UUID,
            message_id String DEFAULT '',
            header_message_id String DEFAULT '',
            `from` String,
            `to` Array(String),
            to_hash Array(String),
            cc Array(String),
            bcc Array(String),
            subject String,
            html_body Nullable(String) CODEC(ZSTD(3)),
            text_body String CODEC(ZSTD(3)),
            attachments String DEFAULT '[]',
            template_id Nullable(String),
            template_data Nullable(String),
            provider Enum8('RESEND' = 1, 'MAILGUN' = 2, 'SMTP' = 3, 'NONE' = 0),
            status Enum8('QUEUED' = 1, 'SENT' = 2, 'DELIVERED' = 3, 'BOUNCED' = 4, 'FAILED' = 5),
            created_at DateTime64(3, 'UTC'),
            sent_at Nullable(DateTime64(3, 'UTC')),
            delivered_at Nullable(DateTime64(3, 'UTC')),
            opened_at Nullable(DateTime64(3, 'UTC')),
            clicked_at Nullable(DateTime64(3, 'UTC')),
            bounce_type Nullable(String),
            error_message Nullable(String),
            retry_count UInt16 DEFAULT 0,
            notification_id Nullable(String),
            idempotency_key String DEFAULT '',
            version UInt64,
            INDEX idx_estatus status TYPE set(8) GRANULARITY 1,
            INDEX idx_message_id message_id TYPE bloom_filter(0.01) GRANULARITY 1,
            INDEX idx_subject subject TYPE text(tokenizer = splitByNonAlpha, preprocessor = lower(subject)),
            INDEX idx_text_body text_body TYPE text(tokenizer = splitByNonAlpha, preprocessor = lower(text_body))
        ) ENGINE = ReplacingMergeTree(version)
        ORDER BY (created_at, id)
        TTL toDateTime(created_at) + INTERVAL 90 DAY""",
        # NotificationDelivery: ORDER BY (notification_id, channel) makes the
        # pair unique (the spec's rule); provider ids are looked up by bloom filter.
        """CREATE TABLE IF NOT EXISTS notification_deliveries (
            id UUID,
            notification_id String,
            channel Enum8('EMAIL' = 1, 'SMS' = 2, 'PUSH' = 3, 'IN_APP' = 4),
            status Enum8('PENDING' = 1, 'SENT' = 2, 'DELIVERED' = 3, 'FAILED' = 4),
            sent_at Nullable(DateTime64(3, 'UTC')),
            delivered_at Nullable(DateTime64(3, 'UTC')),
            failed_at Nullable(DateTime64(3, 'UTC')),
            provider_message_id Nullable(String),
            error_message Nullable(String),
            metadata Nullable(String),
            user_id String DEFAULT '',
            created_at DateTime64(3, 'UTC'),
            version UInt64,
            INDEX idx_provider_id provider_message_id TYPE bloom_filter(0.01) GRANULARITY 1
        ) ENGINE = ReplacingMergeTree(version)
        ORDER BY (notification_id, channel)
        TTL toDateTime(created_at) + INTERVAL 30 DAY""",
        # ContactFormSubmission; email and phone encrypted, with keyed hashes.
        """CREATE TABLE IF NOT EXISTS contact_submissions (
            id UUID,
            name String,
            email String,
            email_hash String,
            phone Nullable(String),
            phone_hash Nullable(String),
            subject String,
            message String CODEC(ZSTD(3)),
            attachments String DEFAULT '[]',
            ip_address String,
            user_agent String,
            referrer Nullable(String),
            submitted_at DateTime64(3, 'UTC'),
            status Enum8('NEW' = 1, 'IN_PROGRESS' = 2, 'RESPONDED' = 3, 'CLOSED' = 4, 'SPAM' = 5),
            assigned_to Nullable(String),
            responded_at Nullable(DateTime64(3, 'UTC')),
            response_email_id Nullable(String),
            spam_score Float32 DEFAULT 0,
            spam_signals String DEFAULT '[]',
            version UInt64,
            INDEX idx_cstatus status TYPE set(8) GRANULARITY 1,
            INDEX idx_email_hash email_hash TYPE bloom_filter(0.01) GRANULARITY 1
        ) ENGINE = ReplacingMergeTree(version)
        ORDER BY (submitted_at, id)""",
        # The users directory: where notifications go. PII encrypted, phone and
        # email hashed for lookups.
        """CREATE TABLE IF NOT EXISTS users (
            user_id String,
            email Nullable(String),
            email_hash Nullable(String),
            phone Nullable(String),
            phone_hash Nullable(String),
            timezone String DEFAULT 'UTC',
            push_subscriptions String DEFAULT '[]',
            attributes String DEFAULT '{}',
            updated_at DateTime64(3, 'UTC'),
            version UInt64,
            deleted UInt8 DEFAULT 0
        ) ENGINE = ReplacingMergeTree(version, deleted)
        ORDER BY user_id""",
        # Suppressed email addresses (hard bounces, complaints), by keyed hash.
        """CREATE TABLE IF NOT EXISTS email_suppressions (
            address_hash String,
            address String,
            reason LowCardinality(String),
            detail String DEFAULT '',
            created_at DateTime64(3, 'UTC'),
            version UInt64,
            deleted UInt8 DEFAULT 0
        ) ENGINE = ReplacingMergeTree(version, deleted)
        ORDER BY address_hash""",
        # The audit trail: append-only, no TTL, exempt from erasure.
        """CREATE TABLE IF NOT EXISTS audit_log (
            id UUID,
            at DateTime64(3, 'UTC'),
            actor String,
            action LowCardinality(String),
            target String,
            details String DEFAULT '{}',
            ip_address String DEFAULT ''
        ) ENGINE = MergeTree
        ORDER BY (at, id)""",
    )),
]

# Modules that hold further migrations in a list named MIGRATIONS.
MIGRATION_MODULES: tuple[str, ...] = (
    "pipelines.schema",
    "collector.email.migrations",
    "collector.logs_schema",
    "collector.notifications.schema",
    "collector.contact.migrations",
)


def all_migrations() -> list[Migration]:
    found = list(MIGRATIONS)
    for name in MIGRATION_MODULES:
        found.extend(importlib.import_module(name).MIGRATIONS)
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


def applied_versions(storage: Storage) -> set[int]:
    storage.command_sync(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
            version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
        ) ENGINE = ReplacingMergeTree ORDER BY version"""
    )
    return {row["version"] for row in storage.query_sync("SELECT version FROM schema_migrations FINAL")}


def migrate(storage: Storage, migrations: Iterable[Migration] | None = None) -> list[Migration]:
    """Apply what is missing, in order; return what was applied. Idempotent:
    every statement is IF NOT EXISTS-safe, so a migration interrupted half-way
    is simply run again."""
    done = applied_versions(storage)
    applied = []
    for migration in migrations if migrations is not None else all_migrations():
        if migration.version in done:
            continue
        # One line before, too: a migration that rebuilds a large table takes a while.
        log.info("applying migration", extra={"version": migration.version, "migration": migration.name})
        for statement in migration.statements:
            storage.command_sync(statement)
        storage.insert_rows_sync("schema_migrations", [{"version": migration.version, "name": migration.name}])
        log.info("migration applied", extra={"version": migration.version, "migration": migration.name})
        applied.append(migration)
    return applied
