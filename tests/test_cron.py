"""Cron conversion to KFP's six-field, seconds-first form; validation; next fire times.

Expected fire times are worked out by hand from a calendar (2026-01-01 is a Thursday)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from anyflow.cron import CronError, next_fire_times, to_kfp_cron

UTC = timezone.utc


@pytest.mark.parametrize("given, kfp", [
    ("0 3 * * *", "0 0 3 * * *"),                # 5 fields: seconds 0 prepended
    ("*/15 * * * 1-5", "0 */15 * * * 1-5"),
    ("30 0 3 * * *", "30 0 3 * * *"),             # already KFP form: unchanged
    ("  0   3 * *   MON ", "0 0 3 * * MON"),       # whitespace normalised, names kept
    ("0 0 1,15 JAN,JUL ?", "0 0 0 1,15 JAN,JUL ?"),
    ("@daily", "0 0 0 * * *"),
    ("@hourly", "0 0 * * * *"),
])
def test_to_kfp_cron(given: str, kfp: str) -> None:
    assert to_kfp_cron(given) == kfp


@pytest.mark.parametrize("bad, words", [
    ("", "empty"),
    ("* * *", "has 3 fields"),
    ("0 0 0 0 0 0 0", "has 7 fields"),
    ("0 24 * * *", "hour value 24 is out of range 0-23"),
    ("60 * * * * *", "second value 60 is out of range 0-59"),
    ("0 3 32 * *", "day-of-month value 32 is out of range 1-31"),
    ("0 3 * 13 *", "month value 13 is out of range 1-12"),
    ("0 3 * * 8", "day-of-week value 8 is out of range 0-6"),
    ("0 3 * * FUNDAY", "day-of-week field has invalid value 'FUNDAY'"),
    ("*/0 * * * *", "step in '*/0' must be at least 1"),
    ("0 5-2 * * *", "range '5-2' runs backwards"),
    ("0 3 * * 1;2", "is not valid"),
    ("? 3 * * *", "cannot be '?'"),
    ("@fortnightly", "unknown cron macro"),
])
def test_invalid_cron_gives_one_clear_sentence(bad: str, words: str) -> None:
    with pytest.raises(CronError) as info:
        to_kfp_cron(bad)
    msg = str(info.value)
    assert words in msg and msg.count("\n") == 0


def test_next_fire_times_weekly_monday() -> None:
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)  # a Thursday
    got = next_fire_times("0 3 * * 1", 3, start)
    assert got == [datetime(2026, 1, d, 3, 0, tzinfo=UTC) for d in (5, 12, 19)]


def test_next_fire_times_seconds_field_is_first() -> None:
    start = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    # "30 0 3 * * *" = 03:00:30 daily (if seconds were read last it would be minute 30 / hour 0).
    got = next_fire_times("30 0 3 * * *", 2, start)
    assert got == [datetime(2026, 1, 1, 3, 0, 30, tzinfo=UTC), datetime(2026, 1, 2, 3, 0, 30, tzinfo=UTC)]


def test_next_fire_times_every_15_minutes_and_naive_start() -> None:
    got = next_fire_times("*/15 * * * *", 4, datetime(2026, 3, 1, 10, 7))
    assert got == [datetime(2026, 3, 1, 10, m, tzinfo=UTC) for m in (15, 30, 45)] + [datetime(2026, 3, 1, 11, 0, tzinfo=UTC)]


def test_next_fire_times_month_end_and_sunday_as_7() -> None:
    got = next_fire_times("0 0 31 * *", 2, datetime(2026, 1, 31, 1, 0, tzinfo=UTC))
    assert got == [datetime(2026, 3, 31, tzinfo=UTC), datetime(2026, 5, 31, tzinfo=UTC)]  # skips 30-day months
    assert to_kfp_cron("0 3 * * 7") == "0 0 3 * * 0"  # KFP (robfig/cron) accepts 0-6 only
    assert to_kfp_cron("0 3 * * 5-7") == "0 0 3 * * 5-6,0"
    assert next_fire_times("0 3 * * 7", 1, datetime(2026, 1, 1, tzinfo=UTC)) == [datetime(2026, 1, 4, 3, tzinfo=UTC)]
