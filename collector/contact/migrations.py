"""Contact-form tables beyond migration 1 (numbers 50–59)."""

from __future__ import annotations

from collector.schema import Migration

MIGRATIONS = [
    Migration(50, "contact form attachments, stored bounded", (
        # The bytes of attachments, one row per file, apart from the submission
        # rows (which list their metadata) so listing submissions never reads
        # them. Bounded by the intake's count/size limits and by a TTL; erased
        # with the submission. ORDER BY (submission_id, idx) is the identity.
        """CREATE TABLE IF NOT EXISTS contact_attachments (
            submission_id String,
            idx UInt8,
            filename String,
            content_type LowCardinality(String),
            size UInt32,
            sha256 String,
            data String CODEC(ZSTD(3)),
            stored_at DateTime64(3, 'UTC'),
            retention_days UInt16 DEFAULT 90
        ) ENGINE = MergeTree
        ORDER BY (submission_id, idx)
        TTL toDateTime(stored_at) + toIntervalDay(retention_days)""",
    )),
]
