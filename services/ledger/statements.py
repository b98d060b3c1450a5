"""Account statements and point-in-time balances, read from the event store.

Everything here is a read of `event_store` (subject = account, in ledger order, which the
`(subject, position)` index serves) plus pure formatting; the HTTP routes (`audit_api`) and the
`quota statement` command (`statement_cli`) share it.

Semantics, in one place:

* Every event of the account is an entry, whatever its type: `amount` is the signed amount it
  moved the balance (`balance_delta`), 0 for events that do not touch it (opened, suspended,
  token and reservation events, ...). `balance` is the account's running balance after the
  entry, in ledger (position) order. So a statement shows every change of the account's caps
  as an entry of its own type, moving nothing: `quota.budget.set` and `quota.budget.removed`
  (its budgets, whose subject is the account), `quota.account.limits_set` (`max_concurrent`)
  and `quota.account.rate_limit_set`; the money figures are the same as without them.
* A bound is an integer position or an RFC 3339 time with an offset. `since` is inclusive,
  `until` exclusive. A time bound is resolved in ledger order against the account's events:
  the window starts (since) or stops (until) at the account's first event whose `time` is at or
  after the given time. When event times follow ledger order this is exactly
  `since <= time < until`; when they do not, the window stays a contiguous run of positions so
  that running balances, opening and closing balances always join up.
* `opening_balance` is the balance after every account event before the page's first position
  (the window start, or the cursor); `closing_balance` the balance after the page's last entry
  (equal to `opening_balance` on an empty page).
* Pages are by position: `next` is the position of the first entry not returned (as an opaque
  string), or None when the window is exhausted.
* `balance as_of` a point is the balance after the account's last event at or before it: for a
  position P, the events at positions <= P; for a time T, the events before the account's first
  event whose time is after T (with in-order times: the events with time <= T). `position` is
  that last event's position, or None (with balance 0) when there is none.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg

from services.contract.cloudevent import format_time
from services.ledger import statement_store

DEFAULT_LIMIT: Final = 500
MAX_LIMIT: Final = 5000
CSV_COLUMNS: Final = ("position", "time", "type", "amount", "balance", "event_id", "source")

_POSITION = re.compile(r"^[0-9]{1,18}$")
_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


class BadPoint(ValueError):
    """A bound, `as_of` or cursor that is neither a position nor an RFC 3339 time."""


@dataclass(frozen=True, slots=True)
class Point:
    """A point in an account's history: a ledger position or a time (exactly one is set)."""

    position: int | None = None
    time: datetime | None = None

    def as_json(self) -> int | str:
        if self.position is not None:
            return self.position
        assert self.time is not None
        return format_time(self.time)


def parse_point(text: str, name: str) -> Point:
    """`123` is a position; `2026-11-24T12:00:00Z` (any RFC 3339 offset) is a time."""
    value = text.strip()
    if _POSITION.match(value):
        return Point(position=int(value))
    if _RFC3339.match(value):
        try:
            moment = datetime.fromisoformat(value.upper())
            # PostgreSQL compares in UTC: 9999-12-31T23:59:59-01:00 has no UTC time in Python.
            moment.astimezone(UTC)
        except (ValueError, OverflowError) as exc:
            raise BadPoint(f"{name}: not a valid time: {text!r} ({exc})") from None
        return Point(time=moment)
    raise BadPoint(
        f"{name} must be a non-negative integer position or an RFC 3339 time with an offset "
        f"(e.g. 2026-11-24T12:00:00Z), got {text!r}"
    )


def parse_cursor(text: str) -> int:
    """A `next` cursor as handed out by `read_statement`."""
    value = text.strip()
    if not _POSITION.match(value) or int(value) < 1:
        raise BadPoint(f"cursor must be a `next` value of a previous page, got {text!r}")
    return int(value)


def format_cursor(position: int | None) -> str | None:
    return None if position is None else str(position)


@dataclass(frozen=True, slots=True)
class Entry:
    position: int
    time: datetime
    type: str
    amount: int
    balance: int
    event_id: str
    source: str

    def as_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "time": format_time(self.time),
            "type": self.type,
            "amount": self.amount,
            "balance": self.balance,
            "event_id": self.event_id,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class Statement:
    account_id: str
    opening_balance: int
    closing_balance: int
    entries: list[Entry]
    next: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "opening_balance": self.opening_balance,
            "closing_balance": self.closing_balance,
            "entries": [entry.as_json() for entry in self.entries],
            "next": format_cursor(self.next),
        }


@dataclass(frozen=True, slots=True)
class BalanceAsOf:
    account_id: str
    as_of: Point
    balance: int
    position: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "as_of": self.as_of.as_json(),
            "balance": self.balance,
            "position": self.position,
        }


# --- reading --------------------------------------------------------------------------------


async def _start(conn: asyncpg.Connection, account_id: str, since: Point | None) -> int | None:
    """The first position in the window (inclusive); None when no event can be in it."""
    if since is None:
        return 0
    if since.position is not None:
        return since.position
    assert since.time is not None
    return await statement_store.first_at_or_after(conn, account_id, since.time)


async def _stop(conn: asyncpg.Connection, account_id: str, until: Point | None) -> int | None:
    """The first position past the window (exclusive); None for an open end."""
    if until is None:
        return None
    if until.position is not None:
        return until.position
    assert until.time is not None
    return await statement_store.first_at_or_after(conn, account_id, until.time)


async def read_statement(
    conn: asyncpg.Connection,
    account_id: str,
    *,
    since: Point | None = None,
    until: Point | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: int | None = None,
) -> Statement | None:
    """One page of the account's statement; None for an unknown account.

    Runs in one read-only repeatable-read transaction so the opening balance and the entries
    come from the same snapshot.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if not await statement_store.account_exists(conn, account_id):
            return None
        start = await _start(conn, account_id, since)
        stop = await _stop(conn, account_id, until)
        if start is None:
            # No event at or after `since`: an empty window at the end of the history.
            balance = await statement_store.balance_before(conn, account_id, None)
            return Statement(account_id, balance, balance, [], None)
        if cursor is not None:
            start = max(start, cursor)
        opening = await statement_store.balance_before(conn, account_id, start)
        rows = await statement_store.entries(conn, account_id, opening, start, stop, limit + 1)
    entries = [_entry(row) for row in rows[:limit]]
    following = rows[limit]["position"] if len(rows) > limit else None
    closing = entries[-1].balance if entries else opening
    return Statement(account_id, opening, closing, entries, following)


async def balance_as_of(
    conn: asyncpg.Connection, account_id: str, as_of: Point
) -> BalanceAsOf | None:
    """The balance after the account's last event at or before `as_of`; None if unknown."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if not await statement_store.account_exists(conn, account_id):
            return None
        if as_of.position is not None:
            stop: int | None = as_of.position + 1
        else:
            assert as_of.time is not None
            stop = await statement_store.first_after(conn, account_id, as_of.time)
        balance, position = await statement_store.balance_until(conn, account_id, stop)
    return BalanceAsOf(account_id, as_of, balance, position)


def _entry(row: asyncpg.Record) -> Entry:
    return Entry(
        position=row["position"],
        time=row["time"],
        type=row["type"],
        amount=row["amount"],
        balance=row["balance"],
        event_id=row["event_id"],
        source=row["source"],
    )


# --- formatting -----------------------------------------------------------------------------


def csv_rows(entries: Iterable[Entry], *, header: bool = True) -> str:
    """Entries as RFC 4180 CSV (CRLF line ends), with the `CSV_COLUMNS` header row first."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    for entry in entries:
        values = entry.as_json()
        writer.writerow([values[column] for column in CSV_COLUMNS])
    return out.getvalue()


def parse_csv(text: str) -> list[dict[str, Any]]:
    """Read `csv_rows` output back into entry dicts (integers as ints), for tests and tools."""
    reader = csv.DictReader(io.StringIO(text))
    return [_typed(row) for row in reader]


def _typed(row: dict[str, str]) -> dict[str, Any]:
    typed: dict[str, Any] = dict(row)
    for column in ("position", "amount", "balance"):
        typed[column] = int(row[column])
    return typed
