"""Verify the ledger: the hash chain over the event store, and the projections against a re-fold.

`verify` reads everything in one REPEATABLE READ, read-only transaction, so the chain, the
re-fold and the projections are compared at a single snapshot. It walks the event store in
keyset pages, checking each stored row (positions gap-free, hash links, content hashes, the
columns against the payload), and folds the decoded payloads into a fresh `State` as it goes.
At the end every projection row is compared with the re-folded state, in both directions, and
the ledger head with the last event. Each finding is one difference: what, which row, what was
expected and what was found.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Final

import asyncpg

from services.contract.cloudevent import Rejection, decode_http_object
from services.contract.events import Event
from services.store import db, event_store, projections
from services.store.chain import ChainWalk
from services.store.fold import fold
from services.store.model import State

#: Rows read (and folded) per page of the event store.
PAGE_SIZE: Final = 5000

#: Projection field name -> the `what` prefix's column name, where the two differ.
_COLUMN_NAMES: Final = {"group": "group_name"}


@dataclass(slots=True)
class VerifyReport:
    ok: bool
    events_checked: int
    head_hash: str
    differences: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events_checked": self.events_checked,
            "head_hash": self.head_hash,
            "differences": self.differences,
        }


def _difference(what: str, row: str, expected: Any, found: Any) -> dict[str, Any]:
    return {"what": what, "row": row, "expected": _jsonable(expected), "found": _jsonable(found)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return value


def decode_payload(payload: str) -> Event:
    """The event stored as `payload` (the canonical JSON of its content)."""
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        raise Rejection("not_cloudevent", "payload is not a JSON object")
    obj["specversion"] = "1.0"
    obj.setdefault("datacontenttype", "application/json")
    if obj.get("time") is None:
        obj.pop("time", None)
    return decode_http_object(obj)


@dataclass(slots=True)
class _Pending:
    position: int
    event: Event
    balance_delta: int | None


@dataclass(slots=True)
class _Walk:
    """State carried across pages of the event store."""

    state: State = field(default_factory=State)
    differences: list[dict[str, Any]] = field(default_factory=list)
    chain: ChainWalk = field(default_factory=ChainWalk)

    def add(self, what: str, row: str, expected: Any, found: Any) -> None:
        self.differences.append(_difference(what, row, expected, found))


def _check_row(walk: _Walk, row: Mapping[str, Any]) -> _Pending | None:
    """Check one stored row's chain links and columns; return its decoded event, if any."""
    position: int = row["position"]
    where = f"position {position}"
    payload: str = row["payload"]
    broken = walk.chain.step(position, payload, row["content_hash"], row["prev_hash"], row["hash"])
    for column, expected, found in broken:
        walk.add(f"event_store.{column}", where, expected, found)
    try:
        event = decode_payload(payload)
    except (Rejection, ValueError) as exc:
        walk.add("event_store.payload", where, "a decodable event", str(exc))
        return None
    for column, value in (
        ("event_id", event.id),
        ("type", event.type),
        ("source", event.source),
        ("subject", event.subject),
    ):
        if row[column] != value:
            walk.add(f"event_store.{column}", where, value, row[column])
    if event.time is not None and row["time"] != event.time:
        walk.add("event_store.time", where, event.time, row["time"])
    if event.time is None:  # it was folded with the time the ledger received it (stored)
        event = replace(event, time=row["time"])
    return _Pending(position, event, row["balance_delta"])


def _refold(walk: _Walk, pending: Sequence[_Pending]) -> None:
    """Fold a page of events into the walk's state, checking positions and balance deltas."""
    if not pending:
        return
    result = fold(walk.state, (p.event for p in pending), pending[0].position)
    by_event = {id(p.event): p for p in pending}
    clean = not result.rejected and all(
        by_event[id(a.event)].position == a.position for a in result.applied
    )
    if clean:
        walk.state = result.state
        for applied in result.applied:
            _check_delta(walk, by_event[id(applied.event)], applied.balance_delta)
        return
    # Something did not line up: fold this page one event at a time, at its stored position,
    # so one bad event is reported once and the positions after it stay aligned.
    for item in pending:
        single = fold(walk.state, [item.event], item.position)
        if single.rejected:
            where = f"position {item.position}"
            walk.add("refold.rejected", where, "applied", single.rejected[0].reason)
            continue
        walk.state = single.state
        _check_delta(walk, item, single.applied[0].balance_delta)


def _check_delta(walk: _Walk, item: _Pending, expected: int | None) -> None:
    if item.balance_delta != expected:
        walk.add("event_store.balance_delta", f"position {item.position}", expected,
                 item.balance_delta)  # fmt: skip


def _row_dict(row: Any) -> dict[str, Any]:
    return {_COLUMN_NAMES.get(f.name, f.name): _jsonable(getattr(row, f.name)) for f in fields(row)}


def _compare_table(
    differences: list[dict[str, Any]],
    table: str,
    expected: Mapping[Any, Any],
    found: Mapping[Any, Any],
    name: Callable[[Any], str],
) -> None:
    for key in sorted(expected.keys() | found.keys(), key=lambda k: name(k)):
        want, have = expected.get(key), found.get(key)
        if want == have:  # the common case, decided without building the rows' dicts
            continue
        if have is None:
            differences.append(_difference(f"{table}.missing", name(key), _row_dict(want), None))
            continue
        if want is None:
            differences.append(_difference(f"{table}.extra", name(key), None, _row_dict(have)))
            continue
        wanted, had = _row_dict(want), _row_dict(have)
        for column, value in wanted.items():
            if had[column] != value:
                differences.append(_difference(f"{table}.{column}", name(key), value, had[column]))


def compare_states(expected: State, found: State) -> list[dict[str, Any]]:
    """Every difference between a re-folded state and the stored projections."""
    differences: list[dict[str, Any]] = []
    _compare_table(differences, "accounts", expected.accounts, found.accounts, str)
    _compare_table(differences, "tokens", expected.tokens, found.tokens, str)
    _compare_table(differences, "channels", expected.channels, found.channels, str)
    _compare_table(differences, "models", expected.models, found.models, str)
    _compare_table(differences, "route_policies", expected.routes, found.routes, str)
    _compare_table(
        differences,
        "rate_limits",
        expected.rate_limits,
        found.rate_limits,
        lambda key: f"{key[0]}/{key[1]}",
    )
    _compare_table(differences, "reservations", expected.reservations, found.reservations, str)
    _compare_table(differences, "budgets", expected.budgets, found.budgets, str)
    spend_key = _spend_name
    for key in sorted(expected.budget_spend.keys() | found.budget_spend.keys(), key=spend_key):
        want, have = expected.budget_spend.get(key), found.budget_spend.get(key)
        if want != have:
            differences.append(_difference("budget_spend.spent", spend_key(key), want, have))
    return differences


def _spend_name(key: tuple[str, datetime]) -> str:
    return f"{key[0]}/{key[1].isoformat()}"


async def refold_history(
    conn: asyncpg.Connection,
    page_size: int = PAGE_SIZE,
    on_page: Callable[[int], None] | None = None,
) -> _Walk:
    """Check the chain and re-fold every stored event, in the caller's transaction.

    The one reference re-fold, shared by `verify` and replay's pure path; `on_page` is told
    how many rows each page held (for progress bars).
    """
    walk = _Walk()
    while True:
        rows = await event_store.events_after(conn, walk.chain.last_position, page_size)
        if not rows:
            break
        pending = [p for p in (_check_row(walk, row) for row in rows) if p is not None]
        _refold(walk, pending)
        if on_page is not None:
            on_page(len(rows))
    return walk


async def verify(conn: asyncpg.Connection, page_size: int = PAGE_SIZE) -> VerifyReport:
    """Check the hash chain and re-fold the whole history against the projections."""
    await db.init_connection(conn)  # jsonb as Python values, whoever opened `conn`
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        walk = await refold_history(conn, page_size)
        stored = await projections.load_all(conn)
        head = await event_store.read_head(conn)
    walk.differences.extend(compare_states(walk.state, stored))
    if head.position != walk.chain.last_position:
        walk.add("ledger_head.position", "ledger_head", walk.chain.last_position, head.position)
    if head.hash != walk.chain.last_hash:
        walk.add("ledger_head.hash", "ledger_head", walk.chain.last_hash, head.hash)
    return VerifyReport(
        ok=not walk.differences,
        events_checked=walk.chain.checked,
        head_hash=walk.chain.last_hash,
        differences=walk.differences,
    )
