"""Counters and gauges served as Prometheus text at ``/metrics``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[str, float] = defaultdict(float)
        self._gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, value: float = 1.0) -> None:
        self._counters[name] += value

    def get(self, name: str) -> float:
        return self._counters.get(name, 0.0)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time."""
        self._gauges[name] = read

    def render(self) -> str:
        lines = []
        for name in sorted(self._counters):
            lines.append(f"# TYPE {name} counter")
            lines.append(f"{name} {self._counters[name]:g}")
        for name in sorted(self._gauges):
            try:
                value = float(self._gauges[name]())
            except Exception:  # noqa: S112 - a gauge that cannot be read is left out
                continue
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {value:g}")
        return "\n".join(lines) + "\n"
