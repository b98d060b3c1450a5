"""The budgets' SQL: the budget rows and their spend per period, loading what a batch's fold
needs (and the usage history a budget set mid-period counts from), writing what it changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from services.store.budget_rules import spender
from services.store.model import Budget, Changes, State
from services.store.periods import TOTAL_START, bucket, period_start

if TYPE_CHECKING:
    from services.store.projections import StateKeys

_BUDGET_COLUMNS = (
    "budget_id, account_id, scope, token_id, model, amount, period, timezone, held, position"
)


def budget_from_row(row: Mapping[str, Any]) -> Budget:
    return Budget(
        budget_id=row["budget_id"],
        account_id=row["account_id"],
        scope=row["scope"],
        token_id=row["token_id"],
        model=row["model"],
        amount=row["amount"],
        period=row["period"],
        timezone=row["timezone"],
        held=row["held"],
        position=row["position"],
    )


def _budget_tuple(b: Budget) -> tuple[Any, ...]:
    return (b.budget_id, b.account_id, b.scope, b.token_id, b.model, b.amount, b.period,
            b.timezone, b.held, b.position)  # fmt: skip


def projection_rows(state: State) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "budgets": [_budget_tuple(b) for b in state.budgets.values()],
        "budget_spend": [(key[0], key[1], spent) for key, spent in state.budget_spend.items()],
    }


async def load_budgets(conn: asyncpg.Connection, account_ids: list[str]) -> list[Budget]:
    rows = await conn.fetch(
        f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE account_id = ANY($1::text[])",  # noqa: S608
        account_ids,
    )
    return [budget_from_row(row) for row in rows]


async def load_spend(
    conn: asyncpg.Connection, keys: list[tuple[str, datetime]]
) -> dict[tuple[str, datetime], int]:
    rows = await conn.fetch(
        """
        SELECT s.budget_id, s.period_start, s.spent
        FROM budget_spend s
        JOIN unnest($1::text[], $2::timestamptz[]) k(budget_id, period_start)
          ON s.budget_id = k.budget_id AND s.period_start = k.period_start
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(row["budget_id"], row["period_start"]): row["spent"] for row in rows}


async def load_for_batch(conn: asyncpg.Connection, state: State, keys: StateKeys) -> None:
    """The batch's accounts' budgets, the spend rows its usage adds to, and, for an account
    whose budgets a batch sets, what the fold recounts: its spend rows and usage from the
    period the set falls in, and its active holds."""
    budgets = await load_budgets(conn, sorted(keys.accounts))
    for budget in budgets:
        state.put_budget(budget)
    spend_keys: set[tuple[str, datetime]] = set()
    for account_id, data, when in keys.usage:
        token_id, model = spender(state, account_id, data)
        for budget in state.account_budgets(account_id):
            if budget.covers(token_id, model):
                spend_keys.add(
                    (budget.budget_id, period_start(budget.period, budget.timezone, when))
                )
    if spend_keys:
        state.budget_spend.update(await load_spend(conn, sorted(spend_keys)))
    if not keys.budget_sets:
        return
    accounts = sorted(keys.budget_sets)
    for row in await conn.fetch(
        """
        SELECT s.budget_id, s.period_start, s.spent FROM budget_spend s
        JOIN budgets b ON b.budget_id = s.budget_id
        WHERE b.account_id = ANY($1::text[])
        """,
        accounts,
    ):
        state.budget_spend[(row["budget_id"], row["period_start"])] = row["spent"]
    for row in await conn.fetch(
        """
        SELECT e.subject, coalesce(d->>'token_id', r.token_id) AS token_id,
               coalesce(d->>'model', r.model) AS model, -e.balance_delta AS amount, e.time
        FROM unnest($1::text[], $2::timestamptz[]) q(account_id, since)
        JOIN event_store e ON e.subject = q.account_id AND e.time >= q.since
        CROSS JOIN LATERAL (SELECT e.payload::jsonb -> 'data') x(d)
        LEFT JOIN reservations r
               ON r.reservation_id = d->>'reservation_id' AND r.account_id = e.subject
        WHERE e.type = 'quota.account.usage_recorded' AND e.balance_delta < 0
        """,
        accounts,
        [keys.budget_sets[a] for a in accounts],
    ):
        key = (row["subject"], row["token_id"], row["model"], bucket(row["time"]))
        state.usage[key] = state.usage.get(key, 0) + row["amount"]
    from services.store.projections import reservation_from_row

    for row in await conn.fetch(
        "SELECT * FROM reservations WHERE account_id = ANY($1::text[]) AND state = 'held'",
        accounts,
    ):
        state.put_reservation(reservation_from_row(row))


async def load_all(
    conn: asyncpg.Connection, state: State, spend_since: datetime | None = None
) -> None:
    """Every budget, and its spend rows (with `spend_since`: only the periods that start then
    or later, and `total`s; a decision needs only the current period's)."""
    for row in await conn.fetch(f"SELECT {_BUDGET_COLUMNS} FROM budgets"):  # noqa: S608
        state.put_budget(budget_from_row(row))
    state.budget_spend.update(await _spend_rows(conn, None, spend_since))


async def _spend_rows(
    conn: asyncpg.Connection, budget_ids: list[str] | None, since: datetime | None
) -> dict[tuple[str, datetime], int]:
    rows = await conn.fetch(
        """
        SELECT budget_id, period_start, spent FROM budget_spend
        WHERE ($1::text[] IS NULL OR budget_id = ANY($1::text[]))
          AND ($2::timestamptz IS NULL OR period_start >= $2 OR period_start = $3)
        """,
        budget_ids,
        since,
        TOTAL_START,
    )
    return {(row["budget_id"], row["period_start"]): row["spent"] for row in rows}


async def load_account_budgets(
    conn: asyncpg.Connection, account_ids: list[str], spend_since: datetime
) -> tuple[list[Budget], dict[tuple[str, datetime], int]]:
    """The accounts' budgets and their spend rows from `spend_since` on (and `total`s)."""
    budgets = await load_budgets(conn, account_ids)
    spend = await _spend_rows(conn, [b.budget_id for b in budgets], spend_since)
    return budgets, spend


async def write_changes(conn: asyncpg.Connection, state: State, changes: Changes) -> None:
    """Upsert the changed budgets and spend rows; delete the removed ones."""
    if changes.budgets:
        present = [state.budgets[k] for k in sorted(changes.budgets) if k in state.budgets]
        removed = [k for k in sorted(changes.budgets) if k not in state.budgets]
        if present:
            await conn.executemany(
                f"""
                INSERT INTO budgets ({_BUDGET_COLUMNS})
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                ON CONFLICT (budget_id) DO UPDATE SET
                    account_id = EXCLUDED.account_id, scope = EXCLUDED.scope,
                    token_id = EXCLUDED.token_id, model = EXCLUDED.model,
                    amount = EXCLUDED.amount, period = EXCLUDED.period,
                    timezone = EXCLUDED.timezone, held = EXCLUDED.held,
                    position = EXCLUDED.position
                """,  # noqa: S608 (constants)
                [_budget_tuple(b) for b in present],
            )
        if removed:
            await conn.execute("DELETE FROM budgets WHERE budget_id = ANY($1::text[])", removed)
    if changes.budget_spend:
        keys = sorted(changes.budget_spend)
        present_keys = [k for k in keys if k in state.budget_spend]
        removed_keys = [k for k in keys if k not in state.budget_spend]
        if removed_keys:
            await conn.executemany(
                "DELETE FROM budget_spend WHERE budget_id = $1 AND period_start = $2",
                removed_keys,
            )
        if present_keys:
            await conn.execute(
                """
                INSERT INTO budget_spend (budget_id, period_start, spent)
                SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[])
                ON CONFLICT (budget_id, period_start) DO UPDATE SET spent = EXCLUDED.spent
                """,
                [k[0] for k in present_keys],
                [k[1] for k in present_keys],
                [state.budget_spend[k] for k in present_keys],
            )
