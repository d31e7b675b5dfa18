"""The agent's own counters, as Prometheus text and as a one-line summary.

Counters are plain attributes bumped on the hot path (no locks: one event
loop). Per-rule redaction counts come from the :class:`agent.redact.Redactor`
and per-file lag from the tailer when the metrics are rendered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class AgentMetrics:
    def __init__(self) -> None:
        self.lines_read = 0
        self.bytes_read = 0
        self.records_shipped = 0
        self.records_rejected = 0
        self.batches_shipped = 0
        self.batches_duplicate = 0
        self.batches_dead_lettered = 0
        self.retries = 0
        self.parse_errors = 0
        self.lines_truncated = 0
        self.files_open = 0
        self.files_waiting = 0
        self.spool_bytes = 0
        self.batches_pending = 0
        self.files_lost = 0
        self.redactions: Callable[[], dict[str, int]] = dict
        self.file_lag: Callable[[], Iterable[tuple[str, str, int]]] = list

    def prometheus(self) -> str:
        """The metrics in the Prometheus text exposition format."""
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
            out.append(f"# HELP logferry_agent_{name} {help_text}")
            out.append(f"# TYPE logferry_agent_{name} {kind}")
            for labels, value in samples:
                out.append(f"logferry_agent_{name}{labels} {value}")

        def counter(name: str, help_text: str, value: float) -> None:
            metric(name, "counter", help_text, [("", value)])

        counter("lines_read_total", "Lines read from sources.", self.lines_read)
        counter("bytes_read_total", "Bytes read from sources.", self.bytes_read)
        counter("records_shipped_total", "Records the collector stored.", self.records_shipped)
        counter("records_rejected_total", "Records the collector refused (dead-lettered).",
                self.records_rejected)
        counter("batches_shipped_total", "Batches acknowledged by the collector.", self.batches_shipped)
        counter("batches_duplicate_total", "Batches the collector had already stored.",
                self.batches_duplicate)
        counter("batches_dead_lettered_total", "Batches written to the dead-letter file.",
                self.batches_dead_lettered)
        counter("retries_total", "Delivery attempts that will be retried.", self.retries)
        counter("parse_errors_total", "Lines parsed here kept as plain records because they did not parse "
                "(lines shipped as read are counted by the collector: logferry_ingest_parse_errors_total).",
                self.parse_errors)
        counter("lines_truncated_total", "Lines cut at max_line.", self.lines_truncated)
        counter("files_lost_total", "Checkpointed files found gone at start with lines possibly unread.",
                self.files_lost)
        metric("redactions_total", "counter", "Values redacted, per rule.",
               [(f'{{rule="{_escape(rule)}"}}', n) for rule, n in sorted(self.redactions().items())])
        metric("files_open", "gauge", "Files open for reading (at most max_open_files).", [("", self.files_open)])
        metric("files_waiting", "gauge", "Files waiting for a slot under max_open_files.",
               [("", self.files_waiting)])
        metric("spool_bytes", "gauge", "Bytes of batches waiting in the spool.", [("", self.spool_bytes)])
        metric("batches_pending", "gauge", "Batches not yet acknowledged.", [("", self.batches_pending)])
        metric("file_lag_bytes", "gauge", "Bytes of a file not yet acknowledged by the collector.",
               [(f'{{source="{_escape(s)}",path="{_escape(p)}"}}', lag) for s, p, lag in self.file_lag()])
        return "\n".join(out) + "\n"

    def summary(self) -> str:
        """One line for the log: totals and the largest lag."""
        lags = [lag for _, _, lag in self.file_lag()]
        redacted = sum(self.redactions().values())
        return (
            f"lines={self.lines_read} bytes={self.bytes_read} shipped={self.records_shipped} "
            f"batches={self.batches_shipped} retries={self.retries} "
            f"dead_lettered={self.batches_dead_lettered} "
            f"rejected={self.records_rejected} redacted={redacted} parse_errors={self.parse_errors} "
            f"files={self.files_open} files_waiting={self.files_waiting} "
            f"pending_batches={self.batches_pending} spool_bytes={self.spool_bytes} "
            f"max_lag_bytes={max(lags, default=0)}"
        )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
