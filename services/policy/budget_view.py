"""Budgets as a decision sees them: the figures an allowed answer lists, and checks 13a-13b
from the snapshot.

The budgets covering a request (an account, one of its tokens, a model) and their figures do
not change between two snapshots that leave budgets alone, except when a period ends (the
spend of the new period starts from what was counted in it). So a snapshot keeps, per covering
key, a `Coverage`: the budgets, what room each has left, and their rendered figures, valid
from the latest period start to the earliest period end among them. A decision then weighs
its budgets with one lookup and a comparison, and its answer reuses the rendered figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from services.contract.cloudevent import format_time
from services.store.budget_rules import budget_spent
from services.store.model import Budget
from services.store.periods import TOTAL_START, bounds

#: A snapshot's coverages: (account_id, token_id, model) -> Coverage. Dropped whole with the
#: snapshot's budgets (see `Snapshot.updated`); bounded in case of many keys.
CoverageCache = dict[tuple[str, str, str | None], "Coverage"]
MAX_COVERAGES: Final = 100_000


@dataclass(frozen=True, slots=True)
class BudgetFigure:
    """A budget that covered an allowed decision, as the answer shows it (`json`, rendered
    once); `timezone` is not shown but says when a denial by it resets."""

    budget_id: str
    scope: str
    period: str
    timezone: str
    amount: int
    spent: int
    held: int
    resets_at: str | None
    json: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rendered = {
            "budget_id": self.budget_id,
            "scope": self.scope,
            "period": self.period,
            "amount": self.amount,
            "spent": self.spent,
            "held": self.held,
            "remaining": self.remaining,
            "resets_at": self.resets_at,
        }
        object.__setattr__(self, "json", rendered)

    @property
    def remaining(self) -> int:
        return max(self.amount - self.spent - self.held, 0)


#: A period's end as RFC 3339 text, by the instant: every decision in a period shows it.
_END_TEXT: dict[datetime, str] = {}


def end_text(ends: datetime | None) -> str | None:
    """`ends` as the text a budget figure or denial shows (None: a `total` never resets)."""
    if ends is None:
        return None
    text = _END_TEXT.get(ends)
    if text is None:
        if len(_END_TEXT) > 1024:
            _END_TEXT.clear()
        text = _END_TEXT[ends] = format_time(ends)
    return text


def resets_at(period: str, timezone: str, now: datetime) -> str | None:
    """When the `period` in `timezone` holding `now` ends, as text (None for `total`)."""
    return end_text(bounds(period, timezone, now)[1])


@dataclass(frozen=True, slots=True)
class Coverage:
    """The budgets covering one (account, token, model), fixed while `start <= now < end`:
    their room left (amount - spent - held) and their figures, in check order."""

    start: datetime
    end: datetime | None
    room: tuple[int, ...]
    least_room: int
    figures: tuple[BudgetFigure, ...]

    def holds(self, now: datetime) -> bool:
        return self.start <= now and (self.end is None or now < self.end)

    def refusal(self, cost: int | None) -> BudgetFigure | None:
        """The first budget without room for `cost` (none given: with no room left), or None
        (checks 13a-13b from the snapshot)."""
        if cost is None:
            if self.least_room > 0:
                return None
            return next(f for f, room in zip(self.figures, self.room, strict=True) if room <= 0)
        if cost <= self.least_room:
            return None
        return next(f for f, room in zip(self.figures, self.room, strict=True) if cost > room)


def build_coverage(budgets: list[Budget], spend: Any, now: datetime) -> Coverage:
    """The coverage of `budgets` (a request's covering budgets, in check order) at `now`;
    `spend` is the snapshot's (budget_id, period start) -> spent."""
    start, end = TOTAL_START, None
    figures = []
    for budget in budgets:
        period_start, period_end = bounds(budget.period, budget.timezone, now)
        start = max(start, period_start)
        if period_end is not None and (end is None or period_end < end):
            end = period_end
        spent = budget_spent(spend, budget, now)
        figures.append(
            BudgetFigure(
                budget.budget_id, budget.scope, budget.period, budget.timezone, budget.amount,
                spent, budget.held, end_text(period_end),
            )
        )  # fmt: skip
    room = tuple(f.amount - f.spent - f.held for f in figures)
    return Coverage(start, end, room, min(room, default=0), tuple(figures))
