"""ClickHouse tables of the pipelines feature (migrations 20–29).

- ``pipeline_runs``: every run with each step's outcome and the triggering
  event, so a failed step is never lost (status FAILED rows can be found and
  replayed); kept 30 days.
- ``pipeline_firings``: when each rule group fired; rebuilds throttles after a
  restart and tells a schedule which run it last made.
- ``pipeline_groups``: groups a flatline rule expects, with when each was last
  seen (a source that went quiet hours ago is not in the replayed window).
"""

from __future__ import annotations

from collector.schema import Migration

MIGRATIONS = [
    Migration(20, "pipeline runs, firings and flatline groups", (
        """CREATE TABLE IF NOT EXISTS pipeline_runs (
            run_id UUID,
            pipeline LowCardinality(String),
            trigger LowCardinality(String),
            group_key String,
            started_at DateTime64(3, 'UTC'),
            finished_at DateTime64(3, 'UTC'),
            status Enum8('ok' = 1, 'failed' = 2, 'dropped' = 3, 'dry_run' = 4),
            count UInt64 DEFAULT 0,
            steps String DEFAULT '[]' CODEC(ZSTD(3)),
            event String DEFAULT '{}' CODEC(ZSTD(3)),
            error Nullable(String),
            INDEX idx_status status TYPE set(4) GRANULARITY 1
        ) ENGINE = MergeTree
        ORDER BY (pipeline, started_at, run_id)
        TTL toDateTime(started_at) + INTERVAL 30 DAY""",
        """CREATE TABLE IF NOT EXISTS pipeline_firings (
            pipeline LowCardinality(String),
            rule LowCardinality(String),
            group_key String,
            fired_at DateTime64(3, 'UTC'),
            count UInt64 DEFAULT 0
        ) ENGINE = MergeTree
        ORDER BY (pipeline, group_key, fired_at)
        TTL toDateTime(fired_at) + INTERVAL 30 DAY""",
        """CREATE TABLE IF NOT EXISTS pipeline_groups (
            pipeline LowCardinality(String),
            group_key String,
            last_seen DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree(last_seen)
        ORDER BY (pipeline, group_key)
        TTL toDateTime(last_seen) + INTERVAL 30 DAY""",
    )),
]
