"""`GET /accounts/{id}/budgets`: an account's budgets, each with its current period (CONTRACT
section 9).

An `APIRouter`; the ledger application includes it. The route needs the admin bearer token. It
only reads the `budgets` and `budget_spend` projections (and the account's row), in one
read-only repeatable-read transaction, so every figure comes from the same snapshot:

* the current period is the one holding the ledger's clock, in the budget's time
  zone (`services.store.periods`): `period_start` and `resets_at` (its end); both null for a
  `total` budget, which never resets;
* `spent` is the `budget_spend` row of that period (0 without one): the usage whose event time
  falls in it;
* `held` is the active holds the budget covers; `remaining = max(amount - spent - held, 0)`,
  what a hold may still take (checks 13a and 13b refuse one past it).

Budgets come in the order the checks consider them: account budgets before token budgets, each
by `budget_id`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, RootModel

from services.contract.cloudevent import format_time
from services.errors import ApiError
from services.ledger.api_models import NOT_FOUND, admin_read
from services.ledger.deps import Admin, LedgerDep
from services.store import budget_store, projections
from services.store.model import ACCOUNT_SCOPE, Budget
from services.store.periods import period_end, period_start

router = APIRouter(tags=["accounts"])


class BudgetInfo(BaseModel):
    budget_id: str
    scope: str = Field(description="`account` or `token`")
    token_id: str | None = Field(description="The token of a token budget; null otherwise")
    model: str | None = Field(description="The one model it counts; null: every model")
    amount: int
    period: str = Field(description="`day`, `week`, `month` or `total`")
    timezone: str = Field(description="The IANA zone its periods start in")
    period_start: str | None = Field(description="Start of the current period; null for total")
    resets_at: str | None = Field(description="End of the current period; null for total")
    spent: int = Field(description="Usage counted in the current period")
    held: int = Field(description="The active holds it covers")
    remaining: int = Field(description="max(amount - spent - held, 0)")
    position: int = Field(description="The ledger position of the event that last set it")


class AccountBudgets(RootModel[list[BudgetInfo]]):
    """The account's budgets: a JSON array, account budgets first, then token budgets."""


def budget_info(budget: Budget, start: datetime, spent: int, now: datetime) -> dict[str, Any]:
    """One budget as the route answers it: its period holding `now` starts at `start` (UTC)
    and has `spent` counted in it."""
    ends = period_end(budget.period, budget.timezone, now)
    return {
        "budget_id": budget.budget_id,
        "scope": budget.scope,
        "token_id": budget.token_id,
        "model": budget.model,
        "amount": budget.amount,
        "period": budget.period,
        "timezone": budget.timezone,
        "period_start": None if budget.period == "total" else format_time(start),
        "resets_at": format_time(ends) if ends is not None else None,
        "spent": spent,
        "held": budget.held,
        "remaining": max(budget.amount - spent - budget.held, 0),
        "position": budget.position,
    }


@router.get(
    "/accounts/{account_id}/budgets",
    dependencies=[Admin],
    summary="An account's budgets with their current period",
    response_model=None,
    responses=admin_read(AccountBudgets, NOT_FOUND),
)
async def account_budgets(account_id: str, ledger: LedgerDep) -> list[dict[str, Any]]:
    """Every budget of the account (account budgets first, then token budgets, by id), with the
    period holding the ledger's clock: `period_start`, `resets_at` (null for `total`), `spent`
    in it, `held` and `remaining`, as a JSON array. 404 for an account the ledger has never
    seen; an account without budgets has an empty array."""
    now = datetime.now(UTC)
    async with (
        ledger.pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        account = await projections.get_account(conn, account_id)
        if account is None:
            raise ApiError(404, "unknown_account", f"unknown account {account_id}")
        budgets = await budget_store.load_budgets(conn, [account_id])
        budgets.sort(key=lambda b: (b.scope != ACCOUNT_SCOPE, b.budget_id))
        starts = [period_start(b.period, b.timezone, now) for b in budgets]
        keys = [(b.budget_id, start) for b, start in zip(budgets, starts, strict=True)]
        spend = await budget_store.load_spend(conn, keys) if keys else {}
    return [
        budget_info(b, start, spend.get((b.budget_id, start), 0), now)
        for b, start in zip(budgets, starts, strict=True)
    ]
