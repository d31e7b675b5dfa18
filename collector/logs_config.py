"""The ``collector.query:`` section: limits of log reading (query, tail, histogram)
and how fast token changes made elsewhere are picked up."""

from __future__ import annotations

import msgspec

from agent.configfile import Duration


class QueryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Longest time range one query, histogram or export may cover (larger → 400).
    max_range: Duration = Duration(31 * 86400.0)
    # Server-side time limit of one read query (ClickHouse max_execution_time); over it → 504.
    query_timeout: Duration = Duration(10.0)
    # Largest `limit` of one page of GET /v1/logs.
    max_limit: int = 1000
    # Rows per storage round trip of an NDJSON export (memory stays bounded by this).
    export_page_rows: int = 20_000
    # Most rows one NDJSON export streams before it ends with a truncation marker (0: no cap).
    export_max_rows: int = 10_000_000
    # Most buckets one histogram may have (range / interval).
    histogram_max_buckets: int = 10_000
    # Concurrent GET /v1/logs/tail streams per token (more → 429).
    tail_max_per_token: int = 5
    # Concurrent tails on this collector, all tokens together.
    tail_max_total: int = 500
    # Interval of the SSE heartbeat comment that keeps proxies from closing an idle tail.
    tail_heartbeat: Duration = Duration(15.0)
    # Logs a tail buffers for a slow client before it closes the stream (the client resumes with Last-Event-ID).
    tail_buffer: int = 10_000
    # Most stored logs replayed on a Last-Event-ID resume before going live.
    tail_resume_max: int = 10_000
    # How often token revocations/creations made by other collectors sharing the storage are picked up.
    token_reload_interval: Duration = Duration(1.0)
    # How often token usage (last_used, use_count) is written to storage.
    token_usage_flush_interval: Duration = Duration(10.0)

    def __post_init__(self) -> None:
        if self.max_range <= 0:
            raise ValueError("max_range must be positive")
        if self.query_timeout <= 0:
            raise ValueError("query_timeout must be positive")
        if not 1 <= self.max_limit <= 100_000:
            raise ValueError("max_limit must be from 1 to 100000")
        if not 100 <= self.export_page_rows <= 1_000_000:
            raise ValueError("export_page_rows must be from 100 to 1000000")
        if self.export_max_rows < 0:
            raise ValueError("export_max_rows cannot be negative")
        if not 10 <= self.histogram_max_buckets <= 100_000:
            raise ValueError("histogram_max_buckets must be from 10 to 100000")
        if self.tail_max_per_token < 1 or self.tail_max_total < 1:
            raise ValueError("tail_max_per_token and tail_max_total must be at least 1")
        if self.tail_heartbeat < 1:
            raise ValueError("tail_heartbeat must be at least 1s")
        if self.tail_buffer < 100:
            raise ValueError("tail_buffer must be at least 100")
        if self.tail_resume_max < 0:
            raise ValueError("tail_resume_max cannot be negative")
        if not 0.1 <= self.token_reload_interval <= 60:
            raise ValueError("token_reload_interval must be from 100ms to 60s")
        if self.token_usage_flush_interval < 1:
            raise ValueError("token_usage_flush_interval must be at least 1s")
