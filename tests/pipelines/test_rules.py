"""Rule types at their edges: exactly N, N−1, window boundaries, throttles, groups."""

from __future__ import annotations

from typing import Any

from pipelines.model import RuleSpec
from pipelines.rules import Firing, Rule, build_rule
from tests.pipelines.conftest import T0, FakeClock, log_event


def rule(clock: FakeClock, **spec: Any) -> Rule:
    from agent.configfile import convert

    return build_rule(convert(spec, RuleSpec), clock=clock)


def feed(r: Rule, clock: FakeClock, times: list[float], **fields: Any) -> list[Firing]:
    fired = []
    for t in times:
        clock.set(max(clock.now, t))
        f = r.observe(log_event(t, **fields))
        if f is not None:
            fired.append(f)
    return fired


# --- frequency -----------------------------------------------------------------


def test_frequency_fires_at_exactly_threshold_within_window(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=5, window="60s")
    fired = feed(r, clock, [T0 + i * 10 for i in range(5)])
    assert len(fired) == 1
    assert fired[0].count == 5
    assert fired[0].details["threshold"] == 5


def test_frequency_does_not_fire_at_threshold_minus_one(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=5, window="60s")
    assert feed(r, clock, [T0 + i * 10 for i in range(4)]) == []


def test_frequency_window_is_half_open_at_its_boundary(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=2, window="60s")
    # Exactly one window apart: the first is outside (t - 60, t].
    assert feed(r, clock, [T0, T0 + 60]) == []
    # A millisecond inside the window fires.
    r2 = rule(clock, type="frequency", threshold=2, window="60s")
    assert len(feed(r2, clock, [T0 + 100, T0 + 159.999])) == 1


def test_frequency_window_slides_old_events_out(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=3, window="60s")
    assert feed(r, clock, [T0, T0 + 30, T0 + 61]) == []  # T0 slid out before the third
    assert len(feed(r, clock, [T0 + 62])) == 1  # 30, 61, 62


def test_frequency_counts_afresh_after_firing(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=3, window="60s")
    fired = feed(r, clock, [T0 + i for i in range(8)])
    assert [f.at for f in fired] == [T0 + 2, T0 + 5]


def test_frequency_throttle_fires_once_per_incident_and_counts_suppressed(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=3, window="60s", throttle="10m")
    fired = feed(r, clock, [T0 + i for i in range(30)])  # ten bursts' worth inside the throttle
    assert len(fired) == 1
    later = feed(r, clock, [T0 + 600 + i for i in range(3)])
    assert len(later) == 1
    assert later[0].suppressed == 27 + 0  # every match held back since the first firing


def test_frequency_throttle_boundary_is_exact(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=1, window="60s", throttle="60s")
    assert len(feed(r, clock, [T0])) == 1
    assert feed(r, clock, [T0 + 59.999]) == []
    assert len(feed(r, clock, [T0 + 60])) == 1


def test_group_by_keeps_groups_apart(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=3, window="60s", group_by=["source", "context.tenant"])
    fired = []
    for i in range(2):
        fired += feed(r, clock, [T0 + i], source="payments", context={"tenant": "a"})
        fired += feed(r, clock, [T0 + i], source="payments", context={"tenant": "b"})
        fired += feed(r, clock, [T0 + i], source="web", context={"tenant": "a"})
    assert fired == []
    fired = feed(r, clock, [T0 + 3], source="payments", context={"tenant": "b"})
    assert len(fired) == 1
    assert fired[0].group == {"source": "payments", "context.tenant": "b"}


def test_throttle_is_per_group(clock: FakeClock) -> None:
    r = rule(clock, type="any", group_by=["source"], throttle="5m")
    assert len(feed(r, clock, [T0], source="a")) == 1
    assert len(feed(r, clock, [T0 + 1], source="b")) == 1
    assert feed(r, clock, [T0 + 2], source="a") == []


def test_future_timestamps_are_clamped_to_the_clock(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=2, window="60s")
    clock.set(T0)
    assert r.observe(log_event(T0 + 3600)) is None  # a host an hour ahead
    clock.set(T0 + 61)
    assert r.observe(log_event(T0 + 61)) is None  # the first counted as T0: out of the window


# --- spike -------------------------------------------------------------------------


def spike(clock: FakeClock, **spec: Any) -> Rule:
    r = rule(clock, type="spike", window="60s", **spec)
    r.covered_since = T0 - 240  # as after a rebuild from storage
    return r


def test_spike_up_fires_at_ratio_times_reference(clock: FakeClock) -> None:
    r = spike(clock, ratio=3, min_reference=2, min_current=1)
    feed(r, clock, [T0 - 100, T0 - 90])  # reference window (T0-120, T0-60]: 2
    fired = feed(r, clock, [T0 - 30 + i for i in range(6)])  # current: 6 = 3 × 2
    assert len(fired) == 1
    assert fired[0].details["direction"] == "up"
    assert fired[0].details["current"] == 6 and fired[0].details["reference"] == 2


def test_spike_up_does_not_fire_below_ratio(clock: FakeClock) -> None:
    r = spike(clock, ratio=3, min_reference=2)
    feed(r, clock, [T0 - 100, T0 - 90])
    assert feed(r, clock, [T0 - 30 + i for i in range(5)]) == []


def test_spike_respects_minimum_counts(clock: FakeClock) -> None:
    r = spike(clock, ratio=2, min_reference=3, min_current=1)
    feed(r, clock, [T0 - 100, T0 - 90])  # reference 2 < 3
    assert feed(r, clock, [T0 - 30 + i for i in range(20)]) == []
    r2 = spike(clock, ratio=2, min_reference=0, min_current=10)
    assert feed(r2, clock, [T0 - 30 + i for i in range(9)]) == []
    assert len(feed(r2, clock, [T0 - 20])) == 1


def test_spike_needs_two_full_windows_of_history(clock: FakeClock) -> None:
    r = rule(clock, type="spike", window="60s", ratio=2, min_reference=0)
    clock.set(T0)
    assert feed(r, clock, [T0 + i for i in range(50)]) == []  # nothing known before T0
    assert feed(r, clock, [T0 + 120 + i for i in range(50)]) != []


def test_spike_down_fires_on_the_clock(clock: FakeClock) -> None:
    r = spike(clock, direction="down", ratio=4, min_reference=8)
    feed(r, clock, [T0 - 110 + i for i in range(8)])  # reference window
    feed(r, clock, [T0 - 30])  # current window: 1; 1 × 4 <= 8
    clock.set(T0)
    fired = r.tick()
    assert len(fired) == 1 and fired[0].details["direction"] == "down"
    assert r.tick() == []  # throttled for one window by default


# --- flatline --------------------------------------------------------------------------


def test_flatline_fires_when_a_group_goes_quiet_for_a_window(clock: FakeClock) -> None:
    r = rule(clock, type="flatline", threshold=1, window="60s", group_by=["source"])
    r.covered_since = T0
    feed(r, clock, [T0 + 10], source="payments")
    clock.set(T0 + 69.999)
    assert r.tick() == []
    clock.set(T0 + 70)  # the event at T0+10 is now exactly one window old: outside
    fired = r.tick()
    assert [f.group for f in fired] == [{"source": "payments"}]
    assert fired[0].count == 0 and fired[0].details["last_seen"] == T0 + 10


def test_flatline_threshold_counts_exactly(clock: FakeClock) -> None:
    r = rule(clock, type="flatline", threshold=3, window="60s")
    r.covered_since = T0 - 60
    feed(r, clock, [T0 + 1, T0 + 2, T0 + 3])
    clock.set(T0 + 30)
    assert r.tick() == []  # exactly 3: not fewer
    clock.set(T0 + 61.5)
    assert len(r.tick()) == 1  # 2 left in the window


def test_flatline_checks_expected_groups_never_seen(clock: FakeClock) -> None:
    r = rule(clock, type="flatline", threshold=1, window="60s", group_by=["source"],
             expect=[{"source": "payments"}, {"source": "web"}])
    r.covered_since = T0
    feed(r, clock, [T0 + 30], source="web")
    clock.set(T0 + 60)
    fired = r.tick()
    assert [f.group for f in fired] == [{"source": "payments"}]


def test_flatline_waits_a_full_window_of_knowledge(clock: FakeClock) -> None:
    r = rule(clock, type="flatline", threshold=1, window="60s")
    r.covered_since = T0
    clock.set(T0 + 59)
    assert r.tick() == []
    clock.set(T0 + 60)
    assert len(r.tick()) == 1


def test_flatline_forgets_groups_gone_longer_than_forget_after(clock: FakeClock) -> None:
    r = rule(clock, type="flatline", threshold=1, window="60s", group_by=["source"], forget_after="10m",
             throttle="1m")
    r.covered_since = T0
    feed(r, clock, [T0], source="old")
    clock.set(T0 + 300)
    assert len(r.tick()) == 1
    clock.set(T0 + 601)
    assert r.tick() == []
    assert r.groups == {}


# --- new_value ---------------------------------------------------------------------------


def test_new_value_fires_once_per_value_within_window(clock: FakeClock) -> None:
    r = rule(clock, type="new_value", fields=["message"], window="1h")
    first = feed(r, clock, [T0], message="disk full")
    assert len(first) == 1 and first[0].details["value"] == {"message": "disk full"}
    assert feed(r, clock, [T0 + 10, T0 + 3599.9], message="disk full") == []
    assert len(feed(r, clock, [T0 + 20], message="db down")) == 1


def test_new_value_is_new_again_after_a_window_without_it(clock: FakeClock) -> None:
    r = rule(clock, type="new_value", fields=["message"], window="1h")
    feed(r, clock, [T0], message="disk full")
    assert len(feed(r, clock, [T0 + 3600], message="disk full")) == 1


def test_new_value_per_group(clock: FakeClock) -> None:
    r = rule(clock, type="new_value", fields=["message"], group_by=["source"], window="1h")
    assert len(feed(r, clock, [T0], source="a", message="x")) == 1
    assert len(feed(r, clock, [T0 + 1], source="b", message="x")) == 1
    assert feed(r, clock, [T0 + 2], source="a", message="x") == []


def test_replayed_values_are_known_and_never_fire(clock: FakeClock) -> None:
    r = rule(clock, type="new_value", fields=["message"], window="1h")
    clock.set(T0 + 100)
    assert r.observe(log_event(T0, message="seen before restart"), replay=True) is None
    assert r.observe(log_event(T0 + 100, message="seen before restart")) is None
    assert r.observe(log_event(T0 + 100, message="really new")) is not None


# --- any -----------------------------------------------------------------------------------


def test_any_fires_per_event_without_throttle(clock: FakeClock) -> None:
    r = rule(clock, type="any")
    assert len(feed(r, clock, [T0, T0, T0 + 1])) == 3


def test_restored_firing_throttles_after_restart(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=2, window="60s", throttle="10m")
    r.restore_firing("", T0 - 60)
    assert feed(r, clock, [T0, T0 + 1]) == []
    assert len(feed(r, clock, [T0 + 541, T0 + 542])) == 1


def test_new_value_memory_is_bounded(clock: FakeClock) -> None:
    r = rule(clock, type="new_value", fields=["message"], window="1h")
    r.max_values = 100  # type: ignore[misc]
    fired = feed(r, clock, [T0 + i * 0.001 for i in range(150)], message="same")
    assert len(fired) == 1
    for i in range(150):
        r.observe(log_event(T0 + 1 + i * 0.001, message=f"id {i}"))
    assert r.stats()["values"] <= 100 and r.stats()["values_evicted"] > 0


def test_spike_windows_are_half_open_at_their_boundary(clock: FakeClock) -> None:
    r = spike(clock, ratio=2, min_reference=1)
    feed(r, clock, [T0 - 60])  # exactly one window before T0: reference, not current
    assert feed(r, clock, [T0]) == []  # current 1, reference 1
    assert len(feed(r, clock, [T0 + 0.5])) == 1  # current 2 = 2 × 1


def test_spike_memory_stays_constant_on_a_busy_stream(clock: FakeClock) -> None:
    r = spike(clock, ratio=1000, min_reference=1)
    for i in range(100_000):
        clock.set(T0 + i * 0.003)  # ~330 events/s for five minutes
        r.observe(log_event(clock.now))
    [counts] = r.counts.values()  # type: ignore[attr-defined]
    assert len(counts.buckets) <= 120
    assert abs(counts.current - 20_000) <= 340  # the last minute, to one bucket (1 s)


# --- resolve ---------------------------------------------------------------------------------


def test_a_frequency_incident_resolves_after_a_quiet_period(clock: FakeClock) -> None:
    r = rule(clock, type="frequency", threshold=2, window="60s", throttle="1h", resolve=True,
             resolve_after="5m", group_by=["source"])
    assert len(feed(r, clock, [T0, T0 + 1], source="a")) == 1
    feed(r, clock, [T0 + 100], source="a")  # still going: the incident stays open (and throttled)
    clock.set(T0 + 399.999)
    assert r.resolutions() == []
    clock.set(T0 + 400)
    [resolved] = r.resolutions()
    assert resolved.group == {"source": "a"} and resolved.details["resolved"] is True
    assert resolved.details["fired_at"] == T0 + 1 and resolved.details["last_match"] == T0 + 100
    assert r.resolutions() == []  # once


def test_a_flatline_incident_resolves_when_the_group_logs_again(clock: FakeClock) -> None:
    r = rule(clock, type="flatline", threshold=1, window="60s", group_by=["source"], resolve=True,
             expect=[{"source": "batch"}])
    r.covered_since = T0
    clock.set(T0 + 60)
    assert len(r.tick()) == 1
    [resolved] = feed(r, clock, [T0 + 90], source="batch")
    assert resolved.details["resolved"] is True and resolved.group == {"source": "batch"}
    assert feed(r, clock, [T0 + 91], source="batch") == []


def test_resolve_options_are_checked() -> None:
    import pytest

    from agent.configfile import ConfigInvalid, convert

    cases = [
        (dict(type="any", resolve=True), "needs `resolve_after`"),
        (dict(type="new_value", fields=["m"], window="1h", resolve=True), "nothing to resolve"),
        (dict(type="frequency", threshold=1, window="1m", resolve_after="1m"), "needs `resolve: true`"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigInvalid, match=message):
            convert(bad, RuleSpec)
