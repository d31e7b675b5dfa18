"""The email feature's tables and columns (migrations 40–49)."""

from __future__ import annotations

from collector.schema import Migration

MIGRATIONS = [
    Migration(40, "email: provider names, queue state, outbox, idempotency, webhook receipts, events", (
        # Third-party providers are stored by name (the Enum holds the built-ins);
        # tags and the queue state let a restarted collector pick up its queue.
        """ALTER TABLE email_messages
            ADD COLUMN IF NOT EXISTS provider_name LowCardinality(String) DEFAULT '',
            ADD COLUMN IF NOT EXISTS tags Array(String) DEFAULT [],
            ADD COLUMN IF NOT EXISTS transactional Bool DEFAULT true,
            ADD COLUMN IF NOT EXISTS next_attempt_at Nullable(DateTime64(3, 'UTC')),
            ADD COLUMN IF NOT EXISTS sending_since Nullable(DateTime64(3, 'UTC')),
            ADD COLUMN IF NOT EXISTS open_count UInt32 DEFAULT 0,
            ADD COLUMN IF NOT EXISTS click_count UInt32 DEFAULT 0,
            ADD COLUMN IF NOT EXISTS provider_response Nullable(String)""",
        # What a queued message needs to be sent after a restart (bodies as sent,
        # attachment bytes); deleted once the message is sent or has failed.
        """CREATE TABLE IF NOT EXISTS email_outbox (
            email_id String,
            payload String CODEC(ZSTD(3)),
            created_at DateTime64(3, 'UTC'),
            version UInt64,
            deleted UInt8 DEFAULT 0
        ) ENGINE = ReplacingMergeTree(version, deleted)
        ORDER BY email_id
        TTL toDateTime(created_at) + INTERVAL 7 DAY""",
        # A caller's Idempotency-Key → the one message it created.
        """CREATE TABLE IF NOT EXISTS email_idempotency (
            key String,
            email_id String,
            created_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree
        ORDER BY key
        TTL toDateTime(created_at) + INTERVAL 7 DAY""",
        # Webhook deliveries already processed: Svix ids and Mailgun signature
        # tokens, kept well beyond the ±5 minute tolerance so restarts do not
        # re-accept a replay.
        """CREATE TABLE IF NOT EXISTS email_webhook_receipts (
            source LowCardinality(String),
            receipt_id String,
            received_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree
        ORDER BY (source, receipt_id)
        TTL toDateTime(received_at) + INTERVAL 7 DAY""",
        # Every normalised delivery/engagement event, for history and counts.
        """CREATE TABLE IF NOT EXISTS email_events (
            email_id String,
            type LowCardinality(String),
            provider LowCardinality(String),
            occurred_at DateTime64(3, 'UTC'),
            received_at DateTime64(3, 'UTC'),
            recipient_hash String DEFAULT '',
            severity LowCardinality(String) DEFAULT '',
            reason String DEFAULT '',
            url String DEFAULT '',
            suspected_scanner Bool DEFAULT false,
            raw String DEFAULT '{}'
        ) ENGINE = MergeTree
        ORDER BY (email_id, occurred_at)
        TTL toDateTime(received_at) + INTERVAL 90 DAY""",
    )),
    Migration(41, "email: the outbox keeps the message's row of a send in progress", (
        "ALTER TABLE email_outbox ADD COLUMN IF NOT EXISTS record String DEFAULT '' CODEC(ZSTD(3))",
    )),
]
