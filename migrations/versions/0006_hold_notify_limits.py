"""quota_hold(): the notification's limits come from the caller, not from literals

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01

The hold function builds the same `quota_changes` notification as the Python append path
(`services.store.notify`): up to NOTIFY_MAX_ROWS changed accounts as rows while the payload
stays under NOTIFY_MAX_BYTES, past NOTIFY_MAX_KEYS a full reload. 0004 wrote those limits as
literals (32, 7000, 100); now they are three more parameters, which
`services.store.reservation_store.hold` passes from that one Python definition.

The body is 0005's with the edits below, each asserted to apply as often as written; the
signature changes, so the function is dropped and created again (0005's restored on
downgrade).
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DROP_HOLD_FUNCTION = (
    "DROP FUNCTION IF EXISTS quota_hold(text[], text[], bigint[], text[], timestamptz[],"
    " text[], timestamptz[], text[], text[], text, timestamptz, timestamptz, text"
    "{extra})"
)

#: (0005's text, what it becomes, how many times it occurs there).
EDITS: tuple[tuple[str, str, int], ...] = (
    (
        "    p_channel text\n) RETURNS TABLE (",
        "    p_channel text, p_max_rows integer, p_max_bytes integer, p_max_keys integer\n"
        ") RETURNS TABLE (",
        1,
    ),
    ("IF cardinality(v_changed) <= 32 THEN", "IF cardinality(v_changed) <= p_max_rows THEN", 1),
    ("octet_length(v_payload) > 7000", "octet_length(v_payload) > p_max_bytes", 2),
    ("IF cardinality(v_changed) > 100 OR", "IF cardinality(v_changed) > p_max_keys OR", 1),
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
    """0005's `CREATE FUNCTION quota_hold` text."""
    r0004 = _revision("0004_hold_function.py", "quota_migration_0004")
    r0005 = _revision("0005_hold_repeats_within_ttl.py", "quota_migration_0005")
    text: str = r0005.hold_function(r0004.HOLD_FUNCTION)
    return text


def hold_function(previous: str) -> str:
    """0005's function with EDITS applied, each found exactly as often as it says."""
    text = previous
    for old, new, times in EDITS:
        count = text.count(old)
        if count != times:
            raise RuntimeError(f"0005's quota_hold() has {count} copies of {old!r}, not {times}")
        text = text.replace(old, new)
    return text


def upgrade() -> None:
    op.execute(DROP_HOLD_FUNCTION.format(extra=""))
    op.execute(hold_function(previous_function()))


def downgrade() -> None:
    op.execute(DROP_HOLD_FUNCTION.format(extra=", integer, integer, integer"))
    op.execute(previous_function())
