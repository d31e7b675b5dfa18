"""The ``collector:`` section of the config file, as typed Structs.

Each feature owns the Struct of its own sub-section in its own module; this
module only assembles them. Defaults live in the Structs.
"""

from __future__ import annotations

import ipaddress

import msgspec

from agent.config import RedactConfig
from agent.configfile import ByteSize, Duration, YamlDocument, load_yaml, section
from collector.contact.config import ContactConfig
from collector.email.config import EmailConfig
from collector.logs_config import QueryConfig
from collector.notifications.config import NotificationsConfig

TIERS = {"standard": 30, "premium": 90, "enterprise": 365}


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # chdb:///path (embedded, default) or http(s)://user:pass@host:8123/db
    dsn: str = "chdb://./data/clickhouse"
    # Database the tables live in (created if missing).
    database: str = "logferry"
    # Upper bound of one read query on the server side.
    query_timeout: Duration = Duration(10.0)
    # Folder of the local write-ahead journal that stores logs, notifications, their deliveries
    # and emails durably (fsync) before ClickHouse does; "" = beside the chDB folder
    # (<folder>-journal/<database>) or ./data/journal/<database> for a server; "off" = write
    # straight to ClickHouse.
    journal: str = ""
    # How long journaled rows may wait before the background flush inserts them into ClickHouse
    # (reads of those tables flush at once).
    journal_flush_interval: Duration = Duration(0.25)
    # Rows of one table stored in the journal but not yet in ClickHouse beyond which writes
    # are refused (503 with Retry-After) until ClickHouse catches up: bounded memory while it
    # is away. Logs: ingest.max_pending_rows (429 with Retry-After).
    journal_max_unflushed_rows: int = 200_000

    def __post_init__(self) -> None:
        if not self.dsn.startswith(("chdb://", "http://", "https://")):
            raise ValueError("dsn must start with chdb://, http:// or https://")
        if not self.database.replace("_", "").isalnum():
            raise ValueError("database must be letters, digits and underscores")
        if not 0 < self.journal_flush_interval <= 60:
            raise ValueError("journal_flush_interval must be between 0 and 60 seconds")
        if self.journal_max_unflushed_rows < 1000:
            raise ValueError("journal_max_unflushed_rows must be at least 1000")


class IngestConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Largest request body accepted, as sent (compressed).
    max_body: ByteSize = ByteSize(16 * 1024 * 1024)
    # Largest body after zstd/gzip decompression (guards against bombs).
    max_decompressed: ByteSize = ByteSize(64 * 1024 * 1024)
    # Without the journal (storage.journal: off): logs are inserted at most this often, and
    # requests wait for the insert of their rows.
    flush_interval: Duration = Duration(0.1)
    # Rows waiting for ClickHouse (in the journal, or for a flush) before ingest answers 429
    # with Retry-After.
    max_pending_rows: int = 500_000


class RetentionRule(msgspec.Struct, forbid_unknown_fields=True):
    # Source globs this tier applies to.
    sources: list[str]
    tier: str

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}")


class RetentionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Tier of logs whose source matches no rule: standard (30 d), premium (90 d), enterprise (365 d).
    default_tier: str = "standard"
    # First matching rule wins.
    rules: list[RetentionRule] = []

    def __post_init__(self) -> None:
        if self.default_tier not in TIERS:
            raise ValueError(f"default_tier must be one of {', '.join(TIERS)}")


class PluginsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Plugin names (built-in or entry point) not to load.
    block: list[str] = []


class CollectorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:8080"
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    # Signs tokens and tracking links; at least 32 characters.
    secret_key: str = ""
    # Globs of pipeline YAML files.
    pipelines: list[str] = []
    public_url: str = "http://127.0.0.1:8080"
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    redact: RedactConfig = msgspec.field(default_factory=RedactConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    # Peers whose X-Forwarded-For is believed (CIDRs).
    trusted_proxies: list[str] = []
    plugins: PluginsConfig = msgspec.field(default_factory=PluginsConfig)
    email: EmailConfig = msgspec.field(default_factory=EmailConfig)
    notifications: NotificationsConfig = msgspec.field(default_factory=NotificationsConfig)
    contact: ContactConfig = msgspec.field(default_factory=ContactConfig)
    # Log reading limits: query range and timeout, exports, histograms, tails, token reloads.
    query: QueryConfig = msgspec.field(default_factory=QueryConfig)
    # Restrict /metrics to admin tokens.
    metrics_require_token: bool = False

    def __post_init__(self) -> None:
        if len(self.secret_key) < 32:
            raise ValueError("secret_key must be at least 32 characters (set LOGFERRY_SECRET_KEY)")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("listen must be HOST:PORT")
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {cidr!r} is not an IP network") from None

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def load_collector_config(path: str) -> tuple[CollectorConfig, YamlDocument]:
    """Load and validate the ``collector:`` section; raises ConfigInvalid with every error."""
    doc = load_yaml(path)
    return section(doc, "collector", CollectorConfig), doc
