"""Budget periods: where the period holding an instant starts and ends, in the budget's zone.

A `day` starts at local midnight, a `week` on Monday 00:00, a `month` on the 1st 00:00; a
`total` never resets (it has one period, starting at `TOTAL_START`). These are pure functions of
(period, zone, instant); the hold function's SQL (`quota_period_start`, migration 0007) does the
same arithmetic with PostgreSQL's `date_trunc`, and tests/store/test_parity.py holds the two
together around DST changes.

A local midnight that a DST change skips is read with the offset before the change (the
period starts at the change); one it repeats, at its first occurrence. So every instant lies in
exactly one period of each kind, and periods follow each other without gap or overlap.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import UTC, datetime, timedelta
from typing import Final

PERIODS: Final = ("day", "week", "month", "total")
TOTAL_START: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: Usage is counted in buckets this long (every zone's offset today is a multiple of it).
BUCKET_SECONDS: Final = 900


@functools.lru_cache(maxsize=512)
def zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def _local_start(period: str, local: datetime) -> datetime:
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if period == "day":
        return midnight
    if period == "week":
        return midnight - timedelta(days=midnight.weekday())
    if period == "month":
        return midnight.replace(day=1)
    raise ValueError(f"unknown period {period!r}")


def _next_local_start(period: str, start: datetime) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def _to_utc(local: datetime, tz: zoneinfo.ZoneInfo) -> datetime:
    """A naive local time (a period's first local instant) as an instant: a repeated one at
    its first occurrence, a skipped one with the offset before the change (both `fold=0`), so
    a period starts at its first instant and periods never overlap."""
    return local.replace(tzinfo=tz, fold=0).astimezone(UTC)


#: (period, zone) -> the bounds of the period last asked for: decisions ask for the current
#: one again and again, and it stays current until its end.
_RECENT: dict[tuple[str, str], tuple[datetime, datetime]] = {}


def bounds(period: str, timezone: str, instant: datetime) -> tuple[datetime, datetime | None]:
    """The start (UTC) of the `period` in `timezone` that holds `instant`, and its end (when
    the budget resets; None for `total`)."""
    if period == "total":
        return TOTAL_START, None
    recent = _RECENT.get((period, timezone))
    if recent is not None and recent[0] <= instant < recent[1]:
        return recent
    tz = zone(timezone)
    start = _to_utc(_local_start(period, instant.astimezone(tz)), tz)
    end = _to_utc(_next_local_start(period, _local_start(period, start.astimezone(tz))), tz)
    _RECENT[(period, timezone)] = (start, end)
    return start, end


def period_start(period: str, timezone: str, instant: datetime) -> datetime:
    """The start (UTC) of the `period` in `timezone` that holds `instant`."""
    return bounds(period, timezone, instant)[0]


def period_end(period: str, timezone: str, instant: datetime) -> datetime | None:
    """When the period holding `instant` ends and the budget resets (None for `total`)."""
    return bounds(period, timezone, instant)[1]


def bucket(instant: datetime) -> datetime:
    """The usage bucket holding `instant`: its start, on a BUCKET_SECONDS boundary (UTC)."""
    seconds = int(instant.timestamp())
    return datetime.fromtimestamp(seconds - seconds % BUCKET_SECONDS, UTC)
