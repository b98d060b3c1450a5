"""quota_hold(): each budget's figures rendered once per statement, not once per hold

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

0007's hold function answered every hold with the figures of the budgets covering it, each
built with `json_build_array(...)` per hold and budget. All but `held` are the same for every
hold of a statement, so they are now rendered once, when the budgets are read (`b_prefix`:
`[budget_id, scope, period, timezone, amount, spent` as JSON text), and a hold's figure is that
text with its `held` appended. The answer is the same JSON.

The body is 0007's with the edits below, each asserted to apply as often as written; the
signature is 0007's, so the function is replaced in place (0007's restored on downgrade).
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (0007's text, what it becomes, how many times it occurs there).
EDITS: tuple[tuple[str, str, int], ...] = (
    ("CREATE FUNCTION quota_hold(", "CREATE OR REPLACE FUNCTION quota_hold(", 1),
    ("    b_changed boolean[];\n", "    b_changed boolean[];\n    b_prefix text[];\n", 1),
    (
        "array_agg(coalesce(s.spent, 0) ORDER BY b.o), array_agg(false ORDER BY b.o)\n",
        "array_agg(coalesce(s.spent, 0) ORDER BY b.o), array_agg(false ORDER BY b.o),\n"
        "           array_agg(left(json_build_array(b.budget_id, b.scope, b.period, b.timezone,\n"
        "                                           b.amount, coalesce(s.spent, 0))::text, -1)\n"
        "                     ORDER BY b.o)\n",
        1,
    ),
    ("         b_spent, b_changed\n", "         b_spent, b_changed, b_prefix\n", 1),
    (
        "                v_figures := coalesce(v_figures || ',', '[') || json_build_array(\n"
        "                    b_ids[e], b_scope[e], b_period[e], b_zone[e], b_amount[e],"
        " b_spent[e],\n"
        "                    b_held[e])::text;\n",
        "                v_figures := coalesce(v_figures || ',', '[') || b_prefix[e] || ', '\n"
        "                             || b_held[e] || ']';\n",
        1,
    ),
)


def _revision(filename: str, name: str) -> ModuleType:
    """A migration's module, loaded from its file (Alembic loads it under its own name)."""
    path = Path(__file__).with_name(filename)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def previous_function() -> str:
    """0007's `CREATE FUNCTION quota_hold` text."""
    text: str = _revision("0007_budgets_and_concurrency.py", "quota_migration_0007").HOLD_FUNCTION
    return text


def hold_function(previous: str) -> str:
    """0007's function with EDITS applied, each found exactly as often as it says."""
    text = previous
    for old, new, times in EDITS:
        count = text.count(old)
        if count != times:
            raise RuntimeError(f"0007's quota_hold() has {count} copies of {old!r}, not {times}")
        text = text.replace(old, new)
    return text


def upgrade() -> None:
    op.execute(hold_function(previous_function()))


def downgrade() -> None:
    op.execute(previous_function().replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
