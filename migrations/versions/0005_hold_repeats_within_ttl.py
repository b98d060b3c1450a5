"""quota_hold(): a request id gets its reservation back for the whole TTL, ended or not

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26

Migration 0004's function gave a request id its reservation back only while that reservation
was still held: a gateway retrying after its hold was settled or released took a second hold
under the same request id. Now, for each hold in order:

* a request id with a reservation of the account whose `expires_at` is still ahead, in any
  state (held, settled, released), gets that reservation back (`repeated`), with its `state`;
* otherwise check 13, under the head lock: refused (`insufficient`) unless the account exists
  and its available quota (balance - held) is positive and covers the amount;
* otherwise the hold is chained and stored as before (`held`).

The policy leaves check 13 of a hold with a request id to this function, so a retry is answered
with its own hold, on any replica, even when what is left could not cover a second one. The
function returns one more column, `state`: the reservation's state (`held` for a new hold, the
stored one for a repeat, NULL when refused). Only once a reservation's TTL has passed is its
request id free for a new hold.

The body is 0004's with the edits below, each asserted to apply exactly once; the return type
changes, so the function is dropped and created again (and 0004's restored on downgrade).
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DROP_HOLD_FUNCTION = (
    "DROP FUNCTION IF EXISTS quota_hold(text[], text[], bigint[], text[], timestamptz[],"
    " text[], timestamptz[], text[], text[], text, timestamptz, timestamptz, text)"
)

#: (0004's text, what it becomes): each must occur exactly once in 0004's function.
EDITS: tuple[tuple[str, str], ...] = (
    # the reservation's state, as one more result column
    (
        "expires_at timestamptz, held_position bigint, balance bigint, held bigint\n)",
        "expires_at timestamptz, held_position bigint, balance bigint, held bigint,\n"
        "    state text\n)",
    ),
    (
        "    f_positions bigint[];\n",
        "    f_positions bigint[];\n    f_states text[];\n",
    ),
    (
        "    o_held bigint[] := '{}';\n",
        "    o_held bigint[] := '{}';\n    o_state text[] := '{}';\n",
    ),
    # the request ids' reservations within their TTL, whatever their state
    (
        "array_agg(r.expires_at), array_agg(r.held_position)\n"
        "        INTO f_accounts, f_requests, f_ids, f_amounts, f_expires, f_positions\n",
        "array_agg(r.expires_at), array_agg(r.held_position),\n"
        "               array_agg(r.state)\n"
        "        INTO f_accounts, f_requests, f_ids, f_amounts, f_expires, f_positions,\n"
        "             f_states\n",
    ),
    (
        "WHERE r.state = 'held' AND r.expires_at > p_now",
        "WHERE r.expires_at > p_now",
    ),
    # each outcome's state: the repeat's own, none when refused, held when held
    (
        "o_position := o_position || f_positions[j];\n",
        "o_position := o_position || f_positions[j];\n"
        "                o_state := o_state || f_states[j];\n",
    ),
    (
        "o_position := o_position || NULL::bigint;\n",
        "o_position := o_position || NULL::bigint;\n"
        "            o_state := o_state || NULL::text;\n",
    ),
    (
        "f_positions := f_positions || v_position;\n",
        "f_positions := f_positions || v_position;\n"
        "            f_states := f_states || 'held'::text;\n",
    ),
    (
        "o_position := o_position || v_position;\n",
        "o_position := o_position || v_position;\n        o_state := o_state || 'held'::text;\n",
    ),
    (
        "o.position, o.balance, o.held\n"
        "        FROM unnest(o_outcome, o_id, o_amount, o_expires, o_position, o_balance, o_held)\n"
        "             WITH ORDINALITY o(outcome, id, amount, expires, position, balance, held, i)",
        "o.position, o.balance, o.held, o.state\n"
        "        FROM unnest(o_outcome, o_id, o_amount, o_expires, o_position, o_balance, o_held,\n"
        "                    o_state)\n"
        "             WITH ORDINALITY o(outcome, id, amount, expires, position, balance, held,\n"
        "                               state, i)",
    ),
)


def _revision_0004() -> ModuleType:
    """Migration 0004's module, loaded from its file (Alembic loads it under its own name)."""
    path = Path(__file__).with_name("0004_hold_function.py")
    spec = importlib.util.spec_from_file_location("quota_migration_0004", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hold_function(previous: str) -> str:
    """0004's `CREATE FUNCTION quota_hold` text with EDITS applied, each exactly once."""
    text = previous
    for old, new in EDITS:
        count = text.count(old)
        if count != 1:
            raise RuntimeError(f"0004's quota_hold() has {count} copies of {old!r}, not one")
        text = text.replace(old, new)
    return text


def upgrade() -> None:
    op.execute(DROP_HOLD_FUNCTION)
    op.execute(hold_function(_revision_0004().HOLD_FUNCTION))


def downgrade() -> None:
    op.execute(DROP_HOLD_FUNCTION)
    op.execute(_revision_0004().HOLD_FUNCTION)
