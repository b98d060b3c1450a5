"""Budget periods: properties of the pure period function around DST changes, and its parity
with the hold function's SQL (`quota_period_start`, migration 0007)."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta

import asyncpg
from hypothesis import given, settings
from hypothesis import strategies as st

from services.store.periods import TOTAL_START, bucket, period_end, period_start

#: Zones with DST (some changing at midnight, some by 30 minutes), and without.
ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/Santiago",  # DST starts at local midnight: 00:00 is skipped
    "America/Havana",  # DST ends at 01:00 back to 00:00: midnight repeats
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "Asia/Kolkata",  # +05:30, no DST
    "Pacific/Chatham",  # +12:45 / +13:45
    "America/St_Johns",  # -03:30 / -02:30
)
PERIODS = ("day", "week", "month")

instants = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2032, 12, 31), timezones=st.just(UTC)
)


def _local(instant: datetime, zone: str) -> datetime:
    return instant.astimezone(zoneinfo.ZoneInfo(zone))


@settings(max_examples=600, deadline=None)
@given(instant=instants, zone=st.sampled_from(ZONES), period=st.sampled_from(PERIODS))
def test_an_instant_lies_in_its_period_which_starts_where_the_local_calendar_says(
    instant: datetime, zone: str, period: str
) -> None:
    start = period_start(period, zone, instant)
    end = period_end(period, zone, instant)
    assert end is not None
    assert start <= instant < end
    # The next period starts where this one ends, and the period is the same from any instant.
    assert period_start(period, zone, end) == end
    assert period_start(period, zone, start) == start
    assert period_start(period, zone, end - timedelta(microseconds=1)) == start
    local = _local(start, zone)
    # The first instant of its local day: local midnight, or just after a skipped midnight.
    just_before = _local(start - timedelta(microseconds=1), zone)
    assert just_before.date() < local.date() or (
        just_before.date() == local.date() and local.hour == 0
    )
    assert local.hour <= 1
    if period == "week":
        assert local.weekday() == 0
    if period == "month":
        assert local.day == 1
    hours = (end - start) / timedelta(hours=1)
    expected = {"day": (1, 1), "week": (7, 7), "month": (28, 31)}[period]
    assert expected[0] * 24 - 2 <= hours <= expected[1] * 24 + 2


def test_a_day_across_a_spring_forward_is_23_hours_and_a_fall_back_25() -> None:
    spring = datetime(2026, 3, 29, 12, tzinfo=UTC)  # Europe/Berlin skips 02:00-03:00
    assert period_start("day", "Europe/Berlin", spring) == datetime(2026, 3, 28, 23, tzinfo=UTC)
    assert period_end("day", "Europe/Berlin", spring) == datetime(2026, 3, 29, 22, tzinfo=UTC)
    fall = datetime(2026, 10, 25, 12, tzinfo=UTC)  # repeats 02:00-03:00
    assert period_start("day", "Europe/Berlin", fall) == datetime(2026, 10, 24, 22, tzinfo=UTC)
    assert period_end("day", "Europe/Berlin", fall) == datetime(2026, 10, 25, 23, tzinfo=UTC)


def test_a_repeated_midnight_starts_the_day_at_its_first_occurrence() -> None:
    # Havana falls back from 01:00 (-04:00) to 00:00 (-05:00) on 2026-11-01: 00:00-01:00 local
    # happens twice, and the day starts at the first 00:00 (04:00 UTC) for every instant of it.
    for instant in (datetime(2026, 11, 1, 4, 0, 7, tzinfo=UTC),
                    datetime(2026, 11, 1, 5, 30, tzinfo=UTC)):  # fmt: skip
        assert period_start("day", "America/Havana", instant) == datetime(
            2026, 11, 1, 4, tzinfo=UTC
        )
    assert period_end("day", "America/Havana", datetime(2026, 10, 31, 12, tzinfo=UTC)) == (
        datetime(2026, 11, 1, 4, tzinfo=UTC)
    )
    # Santiago skips 00:00-01:00 on 2026-09-06: the day starts at the change.
    assert period_start("day", "America/Santiago", datetime(2026, 9, 6, 12, tzinfo=UTC)) == (
        datetime(2026, 9, 6, 4, tzinfo=UTC)
    )


def test_weeks_start_on_monday_and_months_on_the_first_in_the_budgets_zone() -> None:
    # Sunday 2026-11-29 23:30 in New York is already Monday 04:30 UTC.
    instant = datetime(2026, 11, 30, 4, 30, tzinfo=UTC)
    assert period_start("week", "America/New_York", instant) == datetime(
        2026, 11, 23, 5, tzinfo=UTC
    )
    assert period_start("week", "UTC", instant) == datetime(2026, 11, 30, tzinfo=UTC)
    assert period_start("month", "America/New_York", instant) == datetime(
        2026, 11, 1, 4, tzinfo=UTC
    )
    # New York's November starts in daylight time (-04:00) and ends in standard (-05:00).
    assert period_end("month", "America/New_York", instant) == datetime(2026, 12, 1, 5, tzinfo=UTC)
    assert period_start("total", "Asia/Tokyo", instant) == TOTAL_START
    assert period_end("total", "Asia/Tokyo", instant) is None


def test_usage_buckets_are_quarter_hours() -> None:
    assert bucket(datetime(2026, 12, 1, 10, 44, 59, 999, tzinfo=UTC)) == datetime(
        2026, 12, 1, 10, 30, tzinfo=UTC
    )


def _transitions(zone: str, year: int) -> list[datetime]:
    """The instants (UTC) at which `zone` changes its offset in `year`, found hour by hour."""
    tz = zoneinfo.ZoneInfo(zone)
    found = []
    at = datetime(year, 1, 1, tzinfo=UTC)
    offset = at.astimezone(tz).utcoffset()
    while at.year == year:
        nxt = at + timedelta(hours=1)
        if nxt.astimezone(tz).utcoffset() != offset:
            found.append(nxt)
            offset = nxt.astimezone(tz).utcoffset()
        at = nxt
    return found


async def test_the_sql_period_function_agrees_around_every_dst_change(
    pool: asyncpg.Pool,
) -> None:
    cases: list[tuple[str, str, datetime]] = []
    for zone in ZONES:
        for change in [*_transitions(zone, 2026), datetime(2026, 6, 15, tzinfo=UTC)]:
            for minutes in range(-26 * 60, 26 * 60 + 1, 15):
                for period in ("day", "week", "month", "total"):
                    cases.append((period, zone, change + timedelta(minutes=minutes, seconds=7)))
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT quota_period_start(p, z, t) AS start"
            " FROM unnest($1::text[], $2::text[], $3::timestamptz[]) WITH ORDINALITY c(p, z, t, i)"
            " ORDER BY i",
            [c[0] for c in cases],
            [c[1] for c in cases],
            [c[2] for c in cases],
        )
    mismatches = [
        (case, row["start"])
        for case, row in zip(cases, rows, strict=True)
        if period_start(*case) != row["start"]
    ]
    assert len(cases) > 15_000
    assert mismatches == []
