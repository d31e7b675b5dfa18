"""Rule types over event streams: any, frequency, spike, flatline, new_value.

A rule sees the events its pipeline matched, split into groups by
``group_by``; each group has its own sliding window and its own throttle.
Windows are half-open, ``(t - window, t]``: an event exactly ``window``
seconds older than ``t`` is outside. Times are event timestamps (clamped to
the clock, so a host with a fast clock cannot hold a window open); the clock
drives only what happens without events (flatline, spike down, pruning).

State is rebuilt after a restart by replaying stored events through
:meth:`Rule.observe` with ``replay=True`` (records, never fires) after
restoring past firings with :meth:`Rule.restore_firing`.

No storage or HTTP here: the engine feeds events and acts on :class:`Firing`\\ s.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
import orjson

from pipelines.match import field_getter
from pipelines.model import RuleSpec

RECENT_EVENTS = 20

Clock = Callable[[], float]


class Firing(msgspec.Struct, kw_only=True):
    """A rule decided to run the pipeline's steps for one group."""

    group_key: str
    group: dict[str, Any]
    count: int
    at: float
    event: Mapping[str, Any] | None = None
    events: list[Mapping[str, Any]] = []
    # Matches the throttle held back since this group last fired.
    suppressed: int = 0
    # Rule-specific figures: window, threshold, current, reference, ratio, value, …
    details: dict[str, Any] = {}


def event_time(event: Mapping[str, Any], field: str, now: float) -> float:
    """The event's time in epoch seconds, clamped to ``now``."""
    value = event.get(field)
    if isinstance(value, dt.datetime):
        ts = value.timestamp() if value.tzinfo else value.replace(tzinfo=dt.UTC).timestamp()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        ts = float(value)
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return now
        ts = parsed.timestamp() if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC).timestamp()
    else:
        return now
    return min(ts, now)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()[:16]


class _Group:
    __slots__ = ("first_seen", "last_seen", "recent", "suppressed", "times")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.recent: deque[Mapping[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.last_seen = float("-inf")
        self.first_seen = float("inf")
        self.suppressed = 0

    def add(self, ts: float, event: Mapping[str, Any] | None, cap: int | None = None) -> None:
        times = self.times
        if not times or ts >= times[-1]:
            times.append(ts)
        else:
            bisect.insort(times, ts)
        if cap is not None and len(times) > cap:
            del times[: len(times) - cap]
        if event is not None:
            self.recent.append(event)
        self.last_seen = max(self.last_seen, ts)
        self.first_seen = min(self.first_seen, ts)

    def count_in(self, start: float, end: float) -> int:
        """Events with ``start < t <= end``."""
        return bisect.bisect_right(self.times, end) - bisect.bisect_right(self.times, start)

    def prune_before(self, cutoff: float) -> None:
        """Forget times ``<= cutoff``."""
        i = bisect.bisect_right(self.times, cutoff)
        if i:
            del self.times[:i]


class Rule:
    """Base: grouping, throttling, bookkeeping. Subclasses decide when to fire."""

    type = "any"

    def __init__(self, spec: RuleSpec, *, time_field: str = "timestamp", clock: Clock,
                 covered_since: float | None = None):
        self.spec = spec
        self.time_field = time_field
        self.clock = clock
        self.window = float(spec.window or 0.0)
        self.throttle = float(spec.throttle)
        self._getters = [field_getter(f) for f in spec.group_by]
        self._group_cache: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
        self.groups: dict[str, _Group] = {}
        self.last_fired: dict[str, float] = {}
        # The earliest time this rule's state knows about: before it, absence
        # of events means "not looked", not "quiet".
        self.covered_since = covered_since
        # Open incidents (with `resolve`): group key → [fired at, last match].
        self.incidents: dict[str, list[float]] = {}
        self.resolve_after = float(spec.resolve_after or spec.window or 0.0)

    # --- grouping and throttling -------------------------------------------

    def group_of(self, event: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        getters = self._getters
        if not getters:
            return "", {}
        values = tuple(g(event) for g in getters) if len(getters) > 1 else (getters[0](event),)
        try:
            found = self._group_cache.get(values)
        except TypeError:  # an unhashable value (a list in context)
            found = None
        if found is not None:
            return found
        group = dict(zip(self.spec.group_by, values, strict=True))
        found = (orjson.dumps(list(values), default=str).decode(), group)
        try:
            if len(self._group_cache) >= 10_000:
                self._group_cache.clear()
            self._group_cache[values] = found
        except TypeError:
            pass
        return found

    @staticmethod
    def group_from_key(fields: list[str], key: str) -> dict[str, Any]:
        if not key:
            return {}
        return dict(zip(fields, orjson.loads(key), strict=False))

    def throttled(self, key: str, at: float) -> bool:
        last = self.last_fired.get(key)
        return last is not None and at - last < self.effective_throttle

    @property
    def effective_throttle(self) -> float:
        return self.throttle

    def restore_firing(self, key: str, at: float) -> None:
        """A firing stored before a restart: throttles as if it just happened."""
        if at > self.last_fired.get(key, float("-inf")):
            self.last_fired[key] = at

    def _fire(self, key: str, group: dict[str, Any], state: _Group | None, *, at: float, count: int,
              event: Mapping[str, Any] | None, details: dict[str, Any]) -> Firing:
        self.last_fired[key] = at
        if self.spec.resolve:
            incident = self.incidents.get(key)
            if incident is None:
                self.incidents[key] = [at, at]
            else:
                incident[1] = max(incident[1], at)
        suppressed = 0
        recent: list[Mapping[str, Any]] = []
        if state is not None:
            suppressed, state.suppressed = state.suppressed, 0
            recent = list(state.recent)
        return Firing(group_key=key, group=group, count=count, at=at, event=event, events=recent,
                      suppressed=suppressed, details={"type": self.type, **details})

    def _state(self, key: str) -> _Group:
        state = self.groups.get(key)
        if state is None:
            state = self.groups[key] = _Group()
        return state

    # --- the interface the engine uses ----------------------------------------

    def observe(self, event: Mapping[str, Any], *, replay: bool = False, ts: float | None = None) -> Firing | None:
        """Take one matching event; return a firing if the rule fires now.
        ``ts`` is the event's time if the caller already computed it."""
        if ts is None:
            ts = event_time(event, self.time_field, self.clock())
        if self.covered_since is None:
            self.covered_since = ts
        key, group = self.group_of(event)
        incident = self.incidents.get(key)
        if incident is not None and ts > incident[1]:
            incident[1] = ts
        return self._observe(event, ts, key, group, replay)

    def resolutions(self) -> list[Firing]:
        """Incidents over by now (no matches for ``resolve_after``): one
        ``resolved`` firing each. Throttles do not hold these back."""
        if not self.incidents:
            return []
        now = self.clock()
        over = [k for k, (_, last) in self.incidents.items() if now - last >= self.resolve_after]
        return [self._resolved(key, now) for key in over]

    def _resolved(self, key: str, at: float) -> Firing:
        fired_at, last = self.incidents.pop(key)
        state = self.groups.get(key)
        event = state.recent[-1] if state is not None and state.recent else None
        return Firing(group_key=key, group=self.group_from_key(self.spec.group_by, key), count=0, at=at,
                      event=event, details={"type": self.type, "resolved": True, "fired_at": fired_at,
                                            "last_match": last})

    def restore_incident(self, key: str, fired_at: float) -> None:
        """An incident open at a restart (fired, never resolved)."""
        if self.spec.resolve and key not in self.incidents:
            self.incidents[key] = [fired_at, fired_at]

    def _observe(self, event: Mapping[str, Any], ts: float, key: str, group: dict[str, Any],
                 replay: bool) -> Firing | None:
        if replay:
            return None
        state = self._state(key)
        state.recent.append(event)
        if self.throttled(key, ts):
            state.suppressed += 1
            return None
        return self._fire(key, group, state, at=ts, count=1, event=event, details={})

    def tick(self) -> list[Firing]:
        """Evaluate what depends on the clock alone and forget stale state."""
        now = self.clock()
        horizon = self.effective_throttle
        for key in [k for k, at in self.last_fired.items() if now - at >= horizon]:
            del self.last_fired[key]
        if type(self) is Rule:
            for key in [k for k in self.groups if k not in self.last_fired]:
                del self.groups[key]
        return []

    def lookback(self) -> float:
        """How far back a rebuild must replay stored events."""
        return 0.0

    def stats(self) -> dict[str, int]:
        return {"groups": len(self.groups), "throttled": len(self.last_fired)}


class FrequencyRule(Rule):
    """Fire when ``threshold`` events fall within ``window``; then start counting afresh."""

    type = "frequency"

    def __init__(self, spec: RuleSpec, **kwargs: Any):
        super().__init__(spec, **kwargs)
        assert spec.threshold is not None
        self.threshold = spec.threshold

    def restore_firing(self, key: str, at: float) -> None:
        super().restore_firing(key, at)
        state = self.groups.get(key)
        if state is not None:
            state.prune_before(at)

    def _observe(self, event: Mapping[str, Any], ts: float, key: str, group: dict[str, Any],
                 replay: bool) -> Firing | None:
        fired_at = self.last_fired.get(key)
        if replay and fired_at is not None and ts <= fired_at:
            return None  # counted towards a firing that already happened
        state = self._state(key)
        state.add(ts, event, cap=self.threshold)
        times = state.times
        if len(times) < self.threshold:
            return None
        newest = times[-1]
        if newest - times[0] >= self.window:
            return None
        if replay:
            return None
        if self.throttled(key, newest):
            # A burst the throttle holds back: counted, then counting starts afresh.
            state.suppressed += len(times)
            times.clear()
            return None
        times.clear()  # the incident fired: the next one needs `threshold` fresh events
        return self._fire(key, group, state, at=newest, count=self.threshold, event=event,
                          details={"threshold": self.threshold, "window": self.window})

    def tick(self) -> list[Firing]:
        super().tick()
        now = self.clock()
        for key in [k for k, s in self.groups.items()
                    if (not s.times or s.times[-1] <= now - self.window) and k not in self.last_fired]:
            del self.groups[key]
        return []

    def lookback(self) -> float:
        return self.window


class _SpikeCounts:
    """Counts of the current and the reference window, in buckets of
    ``window / SPIKE_BUCKETS`` seconds, kept up to date incrementally: memory
    and time per event stay constant however busy the stream is."""

    __slots__ = ("buckets", "current", "head", "reference")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.head: int | None = None
        self.current = 0
        self.reference = 0

    def advance(self, head: int, n: int) -> None:
        """Move the newest bucket to ``head``: buckets slide from the current
        window, ``(head - n, head]``, into the reference one, ``(head - 2n, head - n]``."""
        if self.head is None:
            self.head = head
            return
        if head <= self.head:
            return
        if head - self.head >= 2 * n:
            self.buckets.clear()
            self.current = self.reference = 0
            self.head = head
            return
        buckets = self.buckets
        for h in range(self.head + 1, head + 1):
            moving = buckets.get(h - n, 0)
            self.current -= moving
            self.reference += moving
            self.reference -= buckets.pop(h - 2 * n, 0)
        self.head = head

    def add(self, index: int, n: int) -> None:
        self.advance(index, n)
        head = self.head if self.head is not None else index
        if index > head - n:
            self.current += 1
        elif index > head - 2 * n:
            self.reference += 1
        else:
            return  # older than both windows
        self.buckets[index] = self.buckets.get(index, 0) + 1


#: Buckets per window for spike rules: counts are exact to window/60.
SPIKE_BUCKETS = 60


class SpikeRule(Rule):
    """Compare the count in the last ``window`` with the ``window`` before it."""

    type = "spike"

    def __init__(self, spec: RuleSpec, **kwargs: Any):
        super().__init__(spec, **kwargs)
        self.bucket = self.window / SPIKE_BUCKETS
        self.counts: dict[str, _SpikeCounts] = {}

    @property
    def effective_throttle(self) -> float:
        # Without a throttle a spike would fire on every event while it lasts.
        return self.throttle or self.window

    def _index(self, t: float) -> int:
        # Rounded first: float division must not move an event to the previous bucket.
        return int(round(t / self.bucket, 6) // 1)

    def _full(self, t: float) -> bool:
        return self.covered_since is not None and t - self.covered_since >= 2 * self.window

    def _check(self, key: str, group: dict[str, Any], state: _Group, counts: _SpikeCounts, t: float,
               event: Mapping[str, Any] | None, directions: tuple[str, ...]) -> Firing | None:
        if not self._full(t):
            return None
        current, reference = counts.current, counts.reference
        spec = self.spec
        fired = None
        if "up" in directions and current >= spec.min_current and reference >= spec.min_reference \
                and current >= spec.ratio * reference and current > reference:
            fired = "up"
        elif "down" in directions and reference >= spec.min_reference and reference > 0 \
                and current * spec.ratio <= reference:
            fired = "down"
        if fired is None:
            return None
        if self.throttled(key, t):
            state.suppressed += 1
            return None
        return self._fire(key, group, state, at=t, count=current, event=event, details={
            "direction": fired, "current": current, "reference": reference, "window": self.window,
            "ratio": (current / reference) if reference else None,
        })

    def _observe(self, event: Mapping[str, Any], ts: float, key: str, group: dict[str, Any],
                 replay: bool) -> Firing | None:
        state = self._state(key)
        state.recent.append(event)
        state.last_seen = max(state.last_seen, ts)
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = _SpikeCounts()
        counts.add(self._index(ts), SPIKE_BUCKETS)
        if replay or self.spec.direction == "down":
            return None
        return self._check(key, group, state, counts, ts, event, ("up",))

    def tick(self) -> list[Firing]:
        super().tick()
        now = self.clock()
        head = self._index(now)
        firings = []
        for key, counts in list(self.counts.items()):
            counts.advance(head, SPIKE_BUCKETS)
            state = self._state(key)
            if self.spec.direction in ("down", "both"):
                fired = self._check(key, self.group_from_key(self.spec.group_by, key), state, counts, now,
                                    state.recent[-1] if state.recent else None, ("down",))
                if fired is not None:
                    firings.append(fired)
            if not counts.current and not counts.reference and key not in self.last_fired:
                del self.counts[key]
                self.groups.pop(key, None)
        return firings

    def lookback(self) -> float:
        return 2 * self.window

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "groups": len(self.counts)}


class FlatlineRule(Rule):
    """Fire when a group has fewer than ``threshold`` events within ``window``."""

    type = "flatline"

    def __init__(self, spec: RuleSpec, **kwargs: Any):
        super().__init__(spec, **kwargs)
        assert spec.threshold is not None
        self.threshold = spec.threshold
        self.expected: dict[str, dict[str, Any]] = {}
        for entry in spec.expect:
            values = [entry[f] for f in spec.group_by]
            self.expected[orjson.dumps(values).decode()] = dict(entry)
        if not spec.group_by:
            self.expected[""] = {}

    @property
    def effective_throttle(self) -> float:
        return self.throttle or self.window

    def _observe(self, event: Mapping[str, Any], ts: float, key: str, group: dict[str, Any],
                 replay: bool) -> Firing | None:
        self._state(key).add(ts, event, cap=self.threshold)
        if key in self.incidents and not replay:
            return self._resolved(key, ts)  # the group logs again
        if key in self.incidents and replay and ts > self.incidents[key][0]:
            del self.incidents[key]  # it came back before the restart
        return None

    def resolutions(self) -> list[Firing]:
        return []  # flatline incidents end when the group logs (see _observe)

    def tick(self) -> list[Firing]:
        super().tick()
        now = self.clock()
        if self.covered_since is None or now - self.covered_since < self.window:
            return []
        firings = []
        for key in set(self.groups) | set(self.expected):
            state = self.groups.get(key)
            forgotten = state is not None and state.last_seen <= now - self.spec.forget_after
            if forgotten and key not in self.expected:
                del self.groups[key]
                continue
            count = state.count_in(now - self.window, now) if state is not None else 0
            if count >= self.threshold:
                continue
            if self.throttled(key, now):
                continue
            group = self.expected.get(key) or self.group_from_key(self.spec.group_by, key)
            last = state.recent[-1] if state is not None and state.recent else None
            last_seen = state.last_seen if state is not None and state.times else None
            firings.append(self._fire(key, group, state, at=now, count=count, event=last, details={
                "threshold": self.threshold, "window": self.window, "last_seen": last_seen,
            }))
        return firings

    def lookback(self) -> float:
        return self.window

    def known_groups(self) -> dict[str, float]:
        """Groups seen, with when they were last seen (persisted by the engine,
        since a group that went quiet long ago is not in the replayed window)."""
        return {k: s.last_seen for k, s in self.groups.items() if s.last_seen > float("-inf")}

    def restore_group(self, key: str, last_seen: float) -> None:
        state = self._state(key)
        state.last_seen = max(state.last_seen, last_seen)


class NewValueRule(Rule):
    """Fire the first time the value of ``fields`` is seen within ``window``."""

    type = "new_value"

    def __init__(self, spec: RuleSpec, **kwargs: Any):
        super().__init__(spec, **kwargs)
        self._value_getters = [field_getter(f) for f in spec.fields]
        self.seen: dict[str, dict[str, float]] = {}
        self._values = 0
        self.evicted = 0

    #: Values remembered per rule; beyond it the least recently seen tenth is
    #: forgotten (and may fire again). Guards memory against fields that are
    #: unique per line (ids, numbers in messages).
    max_values = 200_000

    def _evict(self) -> None:
        everything = sorted((at, key, value) for key, seen in self.seen.items() for value, at in seen.items())
        cut = everything[: max(1, len(everything) // 10)]
        for _, key, value in cut:
            del self.seen[key][value]
        self._values -= len(cut)
        self.evicted += len(cut)

    def _observe(self, event: Mapping[str, Any], ts: float, key: str, group: dict[str, Any],
                 replay: bool) -> Firing | None:
        values = [g(event) for g in self._value_getters]
        if all(v is None for v in values):
            return None
        value_key = orjson.dumps(values, default=str).decode()
        seen = self.seen.setdefault(key, {})
        previous = seen.get(value_key)
        if previous is None:
            self._values += 1
            if self._values > self.max_values:
                self._evict()
        if previous is None or ts > previous:
            seen[value_key] = ts
        if replay or (previous is not None and ts - previous < self.window):
            return None
        state = self._state(key)
        state.recent.append(event)
        if self.throttled(key, ts):
            state.suppressed += 1
            return None
        value = dict(zip(self.spec.fields, values, strict=True))
        return self._fire(key, group, state, at=ts, count=1, event=event,
                          details={"value": value, "window": self.window,
                                   "previously_seen": previous})

    def tick(self) -> list[Firing]:
        super().tick()
        cutoff = self.clock() - self.window
        for key, seen in list(self.seen.items()):
            stale = [v for v, at in seen.items() if at <= cutoff]
            for value_key in stale:
                del seen[value_key]
            self._values -= len(stale)
            if not seen:
                del self.seen[key]
                if key not in self.last_fired:
                    self.groups.pop(key, None)
        return []

    def lookback(self) -> float:
        return self.window

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "values": self._values, "values_evicted": self.evicted}


RULE_TYPES: dict[str, type[Rule]] = {
    "any": Rule, "frequency": FrequencyRule, "spike": SpikeRule,
    "flatline": FlatlineRule, "new_value": NewValueRule,
}


def build_rule(spec: RuleSpec, *, clock: Clock, time_field: str = "timestamp",
               covered_since: float | None = None) -> Rule:
    return RULE_TYPES[spec.type](spec, clock=clock, time_field=time_field, covered_since=covered_since)


def replay(rule: Rule, events: Iterable[Mapping[str, Any]]) -> int:
    n = 0
    for event in events:
        rule.observe(event, replay=True)
        n += 1
    return n
