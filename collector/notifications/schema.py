"""Notification tables beyond migration 1 (numbers 30–39)."""

from __future__ import annotations

from collector.schema import Migration

MIGRATIONS = [
    Migration(30, "notifications: retry time, inbox time, creator; id lookups", (
        "ALTER TABLE notifications ADD COLUMN IF NOT EXISTS next_attempt_at Nullable(DateTime64(3, 'UTC'))",
        "ALTER TABLE notifications ADD COLUMN IF NOT EXISTS inbox_at Nullable(DateTime64(3, 'UTC'))",
        "ALTER TABLE notifications ADD COLUMN IF NOT EXISTS created_by String DEFAULT ''",
        # GET /v1/notifications/{id} and restarts look notifications up by id,
        # which is the last key column: a bloom filter skips the other granules.
        "ALTER TABLE notifications ADD INDEX IF NOT EXISTS idx_id id TYPE bloom_filter(0.01) GRANULARITY 1",
    )),
]
