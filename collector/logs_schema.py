"""Tables, indexes and codecs of log reading, tokens and retention (migrations 10–19)."""

from __future__ import annotations

from collector.schema import Migration

# Records each stored batch (migration 16), recreated with the table (17).
_BATCHES_VIEW = """CREATE MATERIALIZED VIEW IF NOT EXISTS ingest_batches_from_logs TO ingest_batches AS
SELECT batch_id, any(agent_id) AS agent_id, now64(3, 'UTC') AS received_at,
       toUInt32(count()) AS accepted
FROM application_logs WHERE batch_id != '' GROUP BY batch_id"""

MIGRATIONS = [
    Migration(10, "token usage counters, summed across collectors", (
        # Each collector appends its usage deltas (one row per token per flush);
        # the sums survive restarts and never lose counts between collectors
        # sharing a ClickHouse server (no read-modify-write of the token row).
        """CREATE TABLE IF NOT EXISTS log_token_usage (
            token_id String,
            uses SimpleAggregateFunction(sum, UInt64),
            last_used SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
        ) ENGINE = AggregatingMergeTree
        ORDER BY token_id""",
    )),
    Migration(11, "per-minute counts per source and level, for histograms", (
        # An aggregate projection: histograms over days read a few thousand rows
        # per day instead of every log. ClickHouse uses it by itself whenever
        # the query groups/filters by toStartOfMinute(timestamp), source, level
        # only, and falls back to the table otherwise (full-text, user_id, ...).
        # Lightweight DELETE (erasure) refuses to run on a table with
        # projections unless told what to do with them: rebuild them. (Added
        # right after the table was created, so there is nothing to materialize.)
        """ALTER TABLE application_logs
            MODIFY SETTING lightweight_mutation_projection_mode = 'rebuild'""",
        """ALTER TABLE application_logs ADD PROJECTION IF NOT EXISTS p_minute_counts (
            SELECT toStartOfMinute(timestamp), source, level, count()
            GROUP BY toStartOfMinute(timestamp), source, level
        )""",
    )),
    Migration(12, "storage strategy: notifications 7 days warm, deliveries with them (emails: 90 days already)", (
        # A notification scheduled for later lives 7 days past its schedule.
        """ALTER TABLE notifications MODIFY TTL
            toDateTime(greatest(created_at, ifNull(scheduled_for, created_at))) + INTERVAL 7 DAY""",
        "ALTER TABLE notification_deliveries MODIFY TTL toDateTime(created_at) + INTERVAL 7 DAY",
    )),
    Migration(13, "the retention tiers last applied to stored logs", (
        # One row per application of the retention config to existing rows; a
        # start with a different config fingerprint re-tiers stored logs.
        """CREATE TABLE IF NOT EXISTS log_retention_state (
            fingerprint String,
            rules String,
            applied_at DateTime64(3, 'UTC')
        ) ENGINE = MergeTree
        ORDER BY applied_at""",
    )),
    Migration(14, "log timestamps: a codec that decodes 4x faster (histograms, full-text scans)", (
        # Histograms and searches that cannot use the p_minute_counts projection
        # read `timestamp` for every candidate row. Delta(8)+ZSTD(1) decoded 10M
        # stamps in 66-138 ms (measured on 2 cores); T64+LZ4 in 33 ms, at ~25%
        # more bytes for this one column (23 vs 18 MiB per 10M rows). A metadata
        # change: new parts (and parts rewritten by merges) use it; older parts
        # keep Delta+ZSTD until merged or expired (OPTIMIZE TABLE … FINAL
        # rewrites them at once, if an operator wants that).
        "ALTER TABLE application_logs MODIFY COLUMN timestamp CODEC(T64, LZ4)",
    )),
    Migration(15, "search words match tags whatever their case", (
        # `q` words are lower-cased (the message index lowers the message), but
        # the tags index did not lower the tags, so `q=payment` missed a tag
        # "Payment". With `preprocessor = lower(tags)` hasAnyTokens lowers the
        # tags too, in parts indexed before or after (measured on chDB 26.9:
        # the same answers with the index not yet materialized). MATERIALIZE
        # rebuilds the index of stored parts as a background mutation.
        "ALTER TABLE application_logs DROP INDEX IF EXISTS idx_tags",
        "ALTER TABLE application_logs ADD INDEX IF NOT EXISTS idx_tags tags "
        "TYPE text(tokenizer = splitByNonAlpha, preprocessor = lower(tags))",
        "ALTER TABLE application_logs MATERIALIZE INDEX idx_tags",
    )),
    Migration(16, "a stored batch is recorded by the insert that stores its logs", (
        # Ingest wrote the logs, then an ingest_batches row: a collector that
        # stopped between the two inserts forgot the batch, and the agent's
        # resend stored its logs twice. Recorded by this view, the batch id
        # goes in with the logs' own INSERT (and ingest makes one insert, not two).
        _BATCHES_VIEW,
    )),
    Migration(17, "logs in granules of 1024 rows and small compressed blocks: rows fetched by search cost 6x less", (
        # A search's page of 100 rows scattered over ~100 granules read a whole
        # 8192-row granule of every column per row (124 MB decompressed for the
        # bench's rare word, 10M logs). With 1024-row granules and compressed
        # blocks of 4-64 KiB a row costs ~1/6 of that (22 MB): p50 ~98 -> ~40 ms.
        # Storage +2.5%; the per-minute projection keeps 8192-row granules (its
        # histograms would otherwise analyse 8x the marks), and the bloom
        # filters keep 16384 rows a block. index_granularity cannot be ALTERed,
        # so the table is rebuilt: copy, swap, drop. The view that records
        # ingested batches follows the table. Run once, with no other collector
        # writing to the same ClickHouse server (rows they write during the
        # copy would stay in the old table); a run interrupted is run again.
        "DROP TABLE IF EXISTS application_logs_rebuild SYNC",
        """CREATE TABLE application_logs_rebuild AS application_logs
        ENGINE = MergeTree
        PARTITION BY toYYYYMMDD(timestamp)
        ORDER BY (toStartOfHour(timestamp), source, level, timestamp)
        TTL toDateTime(timestamp) + toIntervalDay(retention_days)
        SETTINGS index_granularity = 1024, min_compress_block_size = 4096, max_compress_block_size = 65536,
                 lightweight_mutation_projection_mode = 'rebuild'""",
        "ALTER TABLE application_logs_rebuild DROP PROJECTION IF EXISTS p_minute_counts",
        """ALTER TABLE application_logs_rebuild ADD PROJECTION p_minute_counts (
            SELECT toStartOfMinute(timestamp), source, level, count()
            GROUP BY toStartOfMinute(timestamp), source, level
        ) WITH SETTINGS (index_granularity = 8192)""",
        *(f"ALTER TABLE application_logs_rebuild DROP INDEX IF EXISTS {name}"
          for name in ("idx_user", "idx_session", "idx_request")),
        *(f"ALTER TABLE application_logs_rebuild ADD INDEX {name} {column} TYPE bloom_filter(0.01) GRANULARITY 16"
          for name, column in (("idx_user", "user_id"), ("idx_session", "session_id"),
                               ("idx_request", "request_id"))),
        "INSERT INTO application_logs_rebuild SELECT * FROM application_logs",
        "DROP VIEW IF EXISTS ingest_batches_from_logs SYNC",
        "EXCHANGE TABLES application_logs AND application_logs_rebuild",
        "DROP TABLE application_logs_rebuild SYNC",
        _BATCHES_VIEW,
    )),
    Migration(18, "tails resume in ingest order: an index on ingested_at", (
        # A tail that reconnects gets the logs stored since its last event by
        # (ingested_at, id), so late logs (timestamps older than the last one
        # it saw) are not missed; the minmax index lets that query skip every
        # granule stored before the reconnecting client's position.
        "ALTER TABLE application_logs ADD INDEX IF NOT EXISTS idx_ingested ingested_at TYPE minmax GRANULARITY 4",
        "ALTER TABLE application_logs MATERIALIZE INDEX idx_ingested",
    )),
    Migration(19, "a resent batch is answered with the records its first request rejected", (
        # One row per batch with rejections (a JSON array of {index, error}),
        # kept as long as ingest_batches. Journaled: a row written twice is
        # the same row, so a replay changes nothing.
        """CREATE TABLE IF NOT EXISTS ingest_rejections (
            batch_id String,
            received_at DateTime64(3, 'UTC'),
            rejected String CODEC(ZSTD(3))
        ) ENGINE = ReplacingMergeTree
        ORDER BY batch_id
        TTL toDateTime(received_at) + INTERVAL 7 DAY""",
    )),
]
