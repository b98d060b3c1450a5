"""The `quota_changes` notification: what a commit changed, small enough for NOTIFY.

Every writer sends one at commit (the ledger's batches, the policies' holds and expiries, the
heartbeat), and every policy's snapshot store reads them. The payload is typed here once
(`Notification`), with the account row's fields (`ACCOUNT_ROW_FIELDS`) and the limits that
keep it under PostgreSQL's 8000 bytes; the hold function (migration 0007) builds the same
payload in SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import orjson

from services.store.model import Account, Changes, State

#: NOTIFY payloads are limited to 8000 bytes; past this many keys we say "reload everything".
NOTIFY_MAX_KEYS: Final = 100
#: Up to this many changed accounts are sent as rows, while the payload stays this small.
NOTIFY_MAX_ROWS: Final = 32
NOTIFY_MAX_BYTES: Final = 7_000


#: The fields of an account row in a notification, in order; the hold function's SQL builds
#: the same array (`json_build_array(account_id, balance, held, status, role, group_name,
#: position, max_concurrent, holds)`), which tests/store/test_parity.py holds to this list.
ACCOUNT_ROW_FIELDS: Final = (
    "account_id", "balance", "held", "status", "role", "group", "position", "max_concurrent",
    "holds",
)  # fmt: skip


def account_row(account: Account) -> list[Any]:
    return [getattr(account, name) for name in ACCOUNT_ROW_FIELDS]


def account_from_row(row: Sequence[Any]) -> Account:
    return Account(**dict(zip(ACCOUNT_ROW_FIELDS, row, strict=True)))


@dataclass(frozen=True, slots=True)
class Notification:
    """One `quota_changes` payload. `all` asks listeners for a full reload; `accounts`,
    `tokens`, `rate_limits` and `catalog` name what to read back; `account_rows` carry a few
    changed accounts whole. `ledger` marks a batch the ledger committed and `heartbeat` its
    heartbeat, with `cycle_age`, the seconds since its consumer loop last made progress: only
    these prove a live ledger to the policies."""

    position: int
    all: bool = False
    accounts: tuple[str, ...] = ()
    account_rows: tuple[Account, ...] = ()
    tokens: tuple[str, ...] = ()
    rate_limits: tuple[tuple[str, str], ...] = ()
    #: Accounts whose budgets (or their spend or held) changed: to read back.
    budgets: tuple[str, ...] = ()
    #: Budgets whose `held` alone changed (a hold's commit), as (account_id, budget_id, held).
    budget_held: tuple[tuple[str, str, int], ...] = ()
    catalog: bool = False
    ledger: bool = False
    heartbeat: bool = False
    cycle_age: float | None = None

    @property
    def from_live_ledger(self) -> bool:
        return self.ledger or self.heartbeat

    def encode(self) -> str:
        """The JSON text sent with NOTIFY (fields at their defaults left out)."""
        payload: dict[str, Any] = {"position": self.position}
        if self.all:
            payload["all"] = True
        if self.accounts:
            payload["accounts"] = list(self.accounts)
        if self.account_rows:
            payload["account_rows"] = [account_row(a) for a in self.account_rows]
        if self.tokens:
            payload["tokens"] = list(self.tokens)
        if self.rate_limits:
            payload["rate_limits"] = [list(key) for key in self.rate_limits]
        if self.budgets:
            payload["budgets"] = list(self.budgets)
        if self.budget_held:
            payload["budget_held"] = [list(row) for row in self.budget_held]
        if self.catalog:
            payload["catalog"] = True
        if self.ledger:
            payload["ledger"] = True
        if self.heartbeat:
            payload["heartbeat"] = True
        if self.cycle_age is not None:
            payload["cycle_age"] = self.cycle_age
        return orjson.dumps(payload).decode()

    @classmethod
    def decode(cls, text: str) -> Notification:
        """Parse a payload; ValueError when it is not one."""
        try:
            raw = orjson.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            age = raw.get("cycle_age")
            return cls(
                position=int(raw.get("position", 0)),
                all=bool(raw.get("all")),
                accounts=tuple(str(a) for a in raw.get("accounts") or ()),
                account_rows=tuple(account_from_row(r) for r in raw.get("account_rows") or ()),
                tokens=tuple(str(t) for t in raw.get("tokens") or ()),
                rate_limits=tuple((str(k[0]), str(k[1])) for k in raw.get("rate_limits") or ()),
                budgets=tuple(str(a) for a in raw.get("budgets") or ()),
                budget_held=tuple(
                    (str(r[0]), str(r[1]), int(r[2])) for r in raw.get("budget_held") or ()
                ),
                catalog=bool(raw.get("catalog")),
                ledger=bool(raw.get("ledger")),
                heartbeat=bool(raw.get("heartbeat")),
                cycle_age=float(age) if isinstance(age, int | float) else None,
            )
        except (orjson.JSONDecodeError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"malformed notification: {exc}") from exc


def notify_payload(position: int, changes: Changes, state: State | None = None) -> Notification:
    """What changed, small enough for NOTIFY: past NOTIFY_MAX_KEYS keys, a full reload.

    With `state`, up to NOTIFY_MAX_ROWS changed accounts travel as whole rows, so listeners
    need not read them back: a hold's commit reaches every policy replica without a query."""
    keys = (len(changes.accounts) + len(changes.tokens) + len(changes.rate_limits)
            + len(changes.budget_accounts))  # fmt: skip
    if keys > NOTIFY_MAX_KEYS:
        return Notification(position, all=True)
    names = Notification(
        position,
        accounts=tuple(sorted(changes.accounts)),
        tokens=tuple(sorted(changes.tokens)),
        rate_limits=tuple(sorted(changes.rate_limits)),
        budgets=tuple(sorted(changes.budget_accounts)),
        catalog=changes.catalog,
    )
    if state is not None and 0 < len(changes.accounts) <= NOTIFY_MAX_ROWS:
        rows = tuple(state.accounts[key] for key in names.accounts)
        with_rows = replace(names, accounts=(), account_rows=rows)
        if len(with_rows.encode()) <= NOTIFY_MAX_BYTES:
            return with_rows
    return names
