"""Preference resolution, quiet hours across midnight and DST, batching windows."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.notifications.model import Priority
from collector.notifications.preferences import (
    Frequency,
    Preference,
    PreferenceInput,
    QuietHours,
    local_instant,
    plan_delivery,
    window_close,
)

UTC = dt.UTC
NY = zoneinfo.ZoneInfo("America/New_York")
NINE = dt.time(9, 0)


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(UTC)


def preference(**fields: object) -> Preference:
    base: dict[str, object] = {
        "id": "p", "user_id": "u", "notification_type": "alerts", "enabled": True,
        "channels": {"email": True, "sms": False, "push": False, "in_app": True},
        "quiet_hours": None, "frequency": Frequency.INSTANT,
        "created_at": at("2026-01-01T00:00:00+00:00"), "updated_at": at("2026-01-01T00:00:00+00:00"),
    }
    base.update(fields)
    return Preference(**base)  # type: ignore[arg-type]


def plan(priority: Priority = Priority.MEDIUM, pref: Preference | None = None, *,
         requested: tuple[str, ...] = ("email", "in_app"), when: str = "2026-06-01T12:00:00+00:00",
         tz: str = "UTC"):  # type: ignore[no-untyped-def]
    return plan_delivery(user_id="u", notification_type="alerts", priority=priority, requested=requested,
                         reference=at(when), preference=pref, default_channels=["email"], user_timezone=tz,
                         digest_time=NINE)


# --- quiet hours -----------------------------------------------------------------------


NIGHT = QuietHours(start="22:00", end="08:00", timezone="America/New_York")


@pytest.mark.parametrize(("local", "end"), [
    ("2026-06-01T23:30:00-04:00", "2026-06-02T08:00:00-04:00"),   # after start: ends tomorrow
    ("2026-06-02T07:59:00-04:00", "2026-06-02T08:00:00-04:00"),   # after midnight: ends today
    ("2026-06-01T22:00:00-04:00", "2026-06-02T08:00:00-04:00"),   # start is inside
])
def test_quiet_hours_crossing_midnight_end_at_the_next_end(local: str, end: str) -> None:
    assert NIGHT.end_of_quiet(at(local)) == at(end)


@pytest.mark.parametrize("local", ["2026-06-02T08:00:00-04:00", "2026-06-01T21:59:59-04:00",
                                   "2026-06-01T12:00:00-04:00"])
def test_outside_quiet_hours_nothing_is_deferred(local: str) -> None:
    assert NIGHT.end_of_quiet(at(local)) is None


def test_quiet_hours_within_a_day() -> None:
    lunch = QuietHours(start="12:00", end="13:30", timezone="UTC")
    assert lunch.end_of_quiet(at("2026-06-01T12:10:00+00:00")) == at("2026-06-01T13:30:00+00:00")
    assert lunch.end_of_quiet(at("2026-06-01T13:30:00+00:00")) is None


def test_quiet_night_that_springs_forward_ends_at_local_eight_edt() -> None:
    # 2027-03-14: New York jumps from 02:00 EST to 03:00 EDT. The night is an
    # hour shorter; the end is 08:00 local (12:00 UTC), not 13:00 UTC.
    assert NIGHT.end_of_quiet(at("2027-03-13T23:00:00-05:00")) == at("2027-03-14T12:00:00+00:00")


def test_quiet_night_that_falls_back_ends_at_local_eight_est() -> None:
    # 2026-11-01: 02:00 EDT becomes 01:00 EST; 08:00 local is 13:00 UTC.
    assert NIGHT.end_of_quiet(at("2026-10-31T23:00:00-04:00")) == at("2026-11-01T13:00:00+00:00")
    # At 01:30 the second time (EST), still quiet, same end.
    assert NIGHT.end_of_quiet(at("2026-11-01T06:30:00+00:00")) == at("2026-11-01T13:00:00+00:00")


def test_an_end_skipped_by_the_spring_jump_ends_when_the_clocks_jump() -> None:
    early = QuietHours(start="23:00", end="02:30", timezone="America/New_York")
    # 02:30 does not exist on 2027-03-14: the quiet ends at the jump (03:00 EDT = 07:00 UTC).
    assert early.end_of_quiet(at("2027-03-14T01:00:00-05:00")) == at("2027-03-14T07:00:00+00:00")
    assert local_instant(dt.date(2027, 3, 14), dt.time(2, 30), NY) == at("2027-03-14T07:00:00+00:00")


@pytest.mark.parametrize(("fields", "message"), [
    ({"start": "22:00", "end": "22:00"}, "must differ"),
    ({"start": "25:00", "end": "08:00"}, "quiet_hours.start must be a local time"),
    ({"start": "22:00", "end": "08:00", "timezone": "Mars/Olympus"}, "unknown IANA timezone"),
])
def test_invalid_quiet_hours_are_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(fields, QuietHours)


def test_a_preference_needs_one_enabled_channel() -> None:
    with pytest.raises(msgspec.ValidationError, match="at least one channel must be enabled"):
        msgspec.convert({"channels": {"email": False, "sms": False}}, PreferenceInput)
    parsed = msgspec.convert({"channels": {"In-App": True}, "frequency": "daily_digest"}, PreferenceInput)
    assert parsed.channels == {"in_app": True, "email": False, "sms": False, "push": False}
    assert parsed.frequency == "DAILY_DIGEST"


# --- plans -------------------------------------------------------------------------------


def test_a_type_without_preference_goes_by_email_only() -> None:
    result = plan(requested=("sms", "email", "in_app"))
    assert result.channels == ("email",)
    assert not result.batched


def test_without_preference_a_request_with_no_email_is_cancelled_with_the_reason() -> None:
    result = plan(requested=("in_app",))
    assert result.channels == ()
    assert result.reason is not None and "default channels (email)" in result.reason


def test_disabled_type_sends_nothing() -> None:
    result = plan(pref=preference(enabled=False))
    assert result.channels == () and "disabled" in (result.reason or "")


def test_quiet_hours_defer_never_drop() -> None:
    result = plan(pref=preference(quiet_hours=NIGHT), when="2026-06-02T03:00:00+00:00")  # 23:00 EDT
    assert result.channels == ("email", "in_app")
    assert result.due_at == at("2026-06-02T08:00:00-04:00")


def test_high_priority_is_never_batched_but_keeps_quiet_hours() -> None:
    pref = preference(frequency=Frequency.DAILY_DIGEST, quiet_hours=NIGHT)
    result = plan(Priority.HIGH, pref, when="2026-06-01T16:00:00+00:00")
    assert not result.batched and result.due_at == at("2026-06-01T16:00:00+00:00")
    night = plan(Priority.HIGH, pref, when="2026-06-02T03:00:00+00:00")
    assert night.due_at == at("2026-06-02T08:00:00-04:00")


preferences = st.builds(
    preference,
    enabled=st.booleans(),
    channels=st.fixed_dictionaries({c: st.booleans() for c in ("email", "sms", "push", "in_app")}),
    quiet_hours=st.one_of(st.none(), st.builds(
        QuietHours,
        start=st.sampled_from(["00:00", "06:00", "12:00", "18:30", "22:00", "23:59"]),
        end=st.sampled_from(["00:30", "07:00", "08:00", "13:00", "21:00"]),
        timezone=st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]),
    )),
    frequency=st.sampled_from(list(Frequency)),
)


@settings(max_examples=300, deadline=None)
@given(pref=st.one_of(st.none(), preferences),
       requested=st.lists(st.sampled_from(["email", "sms", "push", "in_app"]), min_size=1, unique=True),
       when=st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2028, 1, 1),
                         timezones=st.just(UTC)))
def test_no_preference_can_block_or_delay_a_critical_notification(
        pref: Preference | None, requested: list[str], when: dt.datetime) -> None:
    result = plan_delivery(user_id="u", notification_type="alerts", priority=Priority.CRITICAL,
                           requested=requested, reference=when, preference=pref, default_channels=["email"],
                           user_timezone="America/New_York", digest_time=NINE)
    assert result.channels == tuple(requested)
    assert result.due_at == when
    assert not result.batched


# --- windows --------------------------------------------------------------------------------


def test_five_minute_windows_are_fixed_and_a_boundary_opens_the_next() -> None:
    assert window_close(Frequency.BATCHED_5MIN, at("2026-06-01T12:03:10+00:00"), UTC, NINE) == \
        at("2026-06-01T12:05:00+00:00")
    assert window_close(Frequency.BATCHED_5MIN, at("2026-06-01T12:05:00+00:00"), UTC, NINE) == \
        at("2026-06-01T12:10:00+00:00")


def test_hourly_windows_align_to_the_users_local_hour() -> None:
    kolkata = zoneinfo.ZoneInfo("Asia/Kolkata")  # UTC+05:30: local hours end at :30 UTC
    assert window_close(Frequency.BATCHED_HOURLY, at("2026-06-01T12:10:00+00:00"), kolkata, NINE) == \
        at("2026-06-01T12:30:00+00:00")


def test_daily_digest_is_at_the_local_time_across_a_dst_change() -> None:
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")  # 2027-03-28 02:00 CET → 03:00 CEST
    first = window_close(Frequency.DAILY_DIGEST, at("2027-03-27T10:00:00+01:00"), berlin, NINE)
    assert first == at("2027-03-28T09:00:00+02:00")
    assert first - window_close(Frequency.DAILY_DIGEST, at("2027-03-26T10:00:00+01:00"), berlin, NINE) == \
        dt.timedelta(hours=23)


def test_batched_plan_shares_one_digest_key_per_window() -> None:
    pref = preference(frequency=Frequency.BATCHED_HOURLY)
    a = plan(pref=pref, when="2026-06-01T12:01:00+00:00")
    b = plan(pref=pref, when="2026-06-01T12:59:59+00:00")
    c = plan(pref=pref, when="2026-06-01T13:00:00+00:00")
    assert a.digest_key == b.digest_key != c.digest_key
    assert a.due_at == at("2026-06-01T13:00:00+00:00")


def test_a_window_closing_in_quiet_hours_waits_for_their_end() -> None:
    pref = preference(frequency=Frequency.BATCHED_HOURLY, quiet_hours=NIGHT)
    result = plan(pref=pref, when="2026-06-02T03:10:00+00:00")  # 23:10 EDT, window closes 00:00 EDT
    assert result.due_at == at("2026-06-02T08:00:00-04:00")
    assert result.digest_key is not None and result.digest_key.endswith(str(int(result.due_at.timestamp() * 1000)))


@settings(max_examples=400, deadline=None)
@given(quiet=st.builds(
           QuietHours,
           start=st.sampled_from(["00:00", "01:30", "02:30", "06:00", "12:00", "22:00", "23:59"]),
           end=st.sampled_from(["00:30", "02:15", "03:00", "07:00", "08:00", "13:00"]),
           timezone=st.sampled_from(["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe",
                                     "America/Santiago", "Asia/Kolkata"])),
       when=st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2028, 1, 1),
                         timezones=st.just(UTC)))
def test_quiet_hours_end_is_later_outside_the_window_and_within_a_day(quiet: QuietHours, when: dt.datetime) -> None:
    end = quiet.end_of_quiet(when)
    if end is None:
        return
    assert when < end
    assert quiet.end_of_quiet(end) is None
    # Within a day, unless a DST jump swallowed the window between two quiet
    # periods (its start and end map to one instant): then the next day's.
    tz = zoneinfo.ZoneInfo(quiet.timezone)
    day = (end.astimezone(tz) - dt.timedelta(days=1)).date()
    swallowed = local_instant(day, dt.time.fromisoformat(quiet.end), tz) >= \
        local_instant(day, dt.time.fromisoformat(quiet.start), tz)
    assert end <= when + dt.timedelta(hours=25) or swallowed


def test_quiet_hours_whose_open_window_a_dst_jump_swallows_go_on_to_the_next_day() -> None:
    # New York, 2027-03-14: 02:00 jumps to 03:00, so the 02:15-02:30 window
    # between quiet hours 02:30-02:15 does not exist that day.
    quiet = QuietHours(start="02:30", end="02:15", timezone="America/New_York")
    evening = dt.datetime(2027, 3, 14, 0, 0, tzinfo=UTC)  # 19:00 EST on the 13th
    assert quiet.end_of_quiet(evening) == dt.datetime(2027, 3, 15, 6, 15, tzinfo=UTC)  # 02:15 EDT on the 15th
    # A normal night: the window is there.
    assert quiet.end_of_quiet(dt.datetime(2027, 3, 21, 0, 0, tzinfo=UTC)) == dt.datetime(2027, 3, 21, 6, 15,
                                                                                          tzinfo=UTC)
