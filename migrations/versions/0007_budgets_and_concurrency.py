"""budgets, concurrency caps, units limits, key rotation; quota_hold() decides them all

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

New projections: `budgets` (with `held`, the active holds each covers) and `budget_spend` (the
usage counted toward a budget per period). Accounts get `max_concurrent` and `holds` (active
holds); tokens `max_concurrent`, `holds` and the previous key of a rotation; rate limits `units`;
reservations the `token_id` and `model` they hold for.

`quota_period_start(period, zone, at)` is `services.store.periods.period_start` in SQL.

`quota_hold()` is written here whole (0004-0006 built it by edits). For each hold, in order,
under the head lock and the accounts' row locks:

* a request id with a reservation of the account whose TTL is still ahead gets it back
  (`repeated`);
* check 13: `insufficient` unless the account's available quota covers the amount;
* check 13a: `budget_exceeded` when an account budget covering the hold's token and model has
  spent (this period) + held + amount > amount allowed; 13b the same for a token budget,
  `token_budget_exceeded`;
* check 13c: `concurrency_limited` when the account's or the token's `max_concurrent` active
  holds are reached;
* otherwise the hold is chained and stored (`held`), and the account's `held` and `holds`, its
  token's `holds` and every covering budget's `held` grow by it.

Its notification carries the changed accounts' rows and the covering budgets' new `held`
(`budget_held`: [account_id, budget_id, held]), so policy replicas read nothing back.

This is the rule of `services.store.budget_rules.hold_refusal`, which verify and replay run over the
stored history; tests/store/test_parity.py holds the two together. Each row returned carries
`budget_id` (the budget that refused) and `budgets`, the figures of the budgets that covered a
held hold (or of the one that refused), as JSON text: [[budget_id, scope, period, timezone,
amount, spent, held], ...].
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PERIOD_FUNCTION = r"""
CREATE FUNCTION quota_period_start(p_period text, p_zone text, p_at timestamptz)
RETURNS timestamptz LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_unit text := CASE p_period WHEN 'week' THEN 'week' WHEN 'month' THEN 'month'
                                 ELSE 'day' END;
    v_local timestamp;
    v_start timestamptz;
    v_earlier timestamptz;
    v_before timestamptz;
BEGIN
    IF p_period = 'total' THEN
        RETURN '1970-01-01 00:00:00+00'::timestamptz;
    END IF;
    v_local := date_trunc(v_unit, p_at AT TIME ZONE p_zone);
    -- AT TIME ZONE reads a skipped local time with the offset before the change (what we
    -- want) but a repeated one at its later occurrence: take the earlier one when there is one.
    v_start := v_local AT TIME ZONE p_zone;
    v_before := v_start - interval '3 hours';
    v_earlier := (v_local - ((v_before AT TIME ZONE p_zone) - (v_before AT TIME ZONE 'UTC')))
                 AT TIME ZONE 'UTC';
    IF v_earlier < v_start AND v_earlier AT TIME ZONE p_zone = v_local THEN
        v_start := v_earlier;
    END IF;
    RETURN v_start;
END
$$
"""

HOLD_FUNCTION = r"""
CREATE FUNCTION quota_hold(
    p_accounts text[], p_requests text[], p_amounts bigint[], p_reservations text[],
    p_expires timestamptz[], p_event_ids text[], p_times timestamptz[], p_payloads text[],
    p_digests text[], p_source text, p_recorded timestamptz, p_now timestamptz,
    p_channel text, p_max_rows integer, p_max_bytes integer, p_max_keys integer,
    p_tokens text[], p_models text[]
) RETURNS TABLE (
    idx integer, outcome text, reservation_id text, amount bigint, request_id text,
    expires_at timestamptz, held_position bigint, balance bigint, held bigint,
    state text, budget_id text, budgets text
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := coalesce(array_length(p_accounts, 1), 0);
    v_head ledger_head%ROWTYPE;
    v_position bigint;
    v_hash text;
    -- the batch's accounts, locked, in account_id order
    a_ids text[];
    a_balance bigint[];
    a_held bigint[];
    a_position bigint[];
    a_max integer[];
    a_holds integer[];
    -- each account's budgets are b_*[a_first[k] .. a_last[k]]
    a_first integer[];
    a_last integer[];
    -- the batch's accounts' budgets: account budgets before token budgets, by id
    b_ids text[] := '{}';
    b_account text[];
    b_scope text[];
    b_token text[];
    b_model text[];
    b_amount bigint[];
    b_period text[];
    b_zone text[];
    b_held bigint[];
    b_spent bigint[];
    b_changed boolean[];
    -- the batch's tokens: their caps and active holds
    t_ids text[] := '{}';
    t_max integer[];
    t_active integer[];
    t_changed boolean[];
    -- request ids' reservations within their TTL: stored ones, then this batch's
    f_accounts text[];
    f_requests text[];
    f_ids text[];
    f_amounts bigint[];
    f_expires timestamptz[];
    f_positions bigint[];
    f_states text[];
    -- one entry per hold: what it became
    o_outcome text[] := '{}';
    o_id text[] := '{}';
    o_amount bigint[] := '{}';
    o_expires timestamptz[] := '{}';
    o_position bigint[] := '{}';
    o_balance bigint[] := '{}';
    o_held bigint[] := '{}';
    o_state text[] := '{}';
    o_budget text[] := '{}';
    o_budgets text[] := '{}';
    -- the holds that are stored
    s_index integer[] := '{}';
    s_position bigint[] := '{}';
    s_prev text[] := '{}';
    s_hash text[] := '{}';
    k integer;
    j integer;
    t integer;
    e integer;
    v_available bigint;
    v_refusal text;
    v_refused text;
    v_covering integer[];
    v_figures text;
    v_changed text[];
    v_budget_held json;
    v_budget_count integer;
    v_rows json;
    v_payload text;
BEGIN
    SELECT * INTO v_head FROM ledger_head WHERE id = 1 FOR UPDATE;
    v_position := v_head.position;
    v_hash := v_head.hash;
    SELECT array_agg(a.account_id ORDER BY a.account_id),
           array_agg(a.balance ORDER BY a.account_id),
           array_agg(a.held ORDER BY a.account_id),
           array_agg(a.position ORDER BY a.account_id),
           array_agg(a.max_concurrent ORDER BY a.account_id),
           array_agg(a.holds ORDER BY a.account_id)
    INTO a_ids, a_balance, a_held, a_position, a_max, a_holds
    FROM (SELECT * FROM accounts WHERE account_id = ANY(p_accounts)
          ORDER BY account_id FOR UPDATE) a;
    -- the batch's accounts' budgets, with the spend of their current period (its start
    -- computed once per period and zone, not once per budget)
    WITH b AS MATERIALIZED (
        SELECT bb.*, row_number() OVER (ORDER BY bb.account_id, bb.scope, bb.budget_id) o
        FROM budgets bb WHERE bb.account_id = ANY(p_accounts)
    ), ps AS MATERIALIZED (
        SELECT z.period, z.timezone, quota_period_start(z.period, z.timezone, p_now) AS start
        FROM (SELECT DISTINCT period, timezone FROM b) z
    )
    SELECT coalesce(array_agg(b.budget_id ORDER BY b.o), '{}'),
           array_agg(b.account_id ORDER BY b.o), array_agg(b.scope ORDER BY b.o),
           array_agg(b.token_id ORDER BY b.o), array_agg(b.model ORDER BY b.o),
           array_agg(b.amount ORDER BY b.o), array_agg(b.period ORDER BY b.o),
           array_agg(b.timezone ORDER BY b.o), array_agg(b.held ORDER BY b.o),
           array_agg(coalesce(s.spent, 0) ORDER BY b.o), array_agg(false ORDER BY b.o)
    INTO b_ids, b_account, b_scope, b_token, b_model, b_amount, b_period, b_zone, b_held,
         b_spent, b_changed
    FROM b JOIN ps ON ps.period = b.period AND ps.timezone = b.timezone
    LEFT JOIN budget_spend s ON s.budget_id = b.budget_id AND s.period_start = ps.start;
    a_first := array_fill(NULL::integer, ARRAY[coalesce(cardinality(a_ids), 0)]);
    a_last := a_first;
    FOR e IN 1 .. cardinality(b_ids) LOOP
        k := array_position(a_ids, b_account[e]);
        IF k IS NOT NULL THEN
            a_first[k] := coalesce(a_first[k], e);
            a_last[k] := e;
        END IF;
    END LOOP;
    SELECT coalesce(array_agg(tk.token_id), '{}'), array_agg(tk.max_concurrent),
           array_agg(tk.holds), array_agg(false)
    INTO t_ids, t_max, t_active, t_changed
    FROM tokens tk WHERE tk.token_id = ANY(p_tokens);
    IF EXISTS (SELECT 1 FROM unnest(p_requests) r WHERE r IS NOT NULL) THEN
        SELECT array_agg(r.account_id), array_agg(r.request_id), array_agg(r.reservation_id),
               array_agg(r.amount), array_agg(r.expires_at), array_agg(r.held_position),
               array_agg(r.state)
        INTO f_accounts, f_requests, f_ids, f_amounts, f_expires, f_positions, f_states
        FROM (SELECT DISTINCT ON (r.account_id, r.request_id) r.*
              FROM reservations r
              JOIN unnest(p_accounts, p_requests) q(account_id, request_id)
                ON r.account_id = q.account_id AND r.request_id = q.request_id
              WHERE r.expires_at > p_now
              ORDER BY r.account_id, r.request_id, r.held_position DESC) r;
    END IF;
    FOR i IN 1 .. n LOOP
        k := array_position(a_ids, p_accounts[i]);
        j := NULL;
        IF p_requests[i] IS NOT NULL THEN
            FOR e IN 1 .. coalesce(array_length(f_ids, 1), 0) LOOP
                IF f_accounts[e] = p_accounts[i] AND f_requests[e] = p_requests[i] THEN
                    j := e;
                    EXIT;
                END IF;
            END LOOP;
            IF j IS NOT NULL THEN
                o_outcome := o_outcome || 'repeated'::text;
                o_id := o_id || f_ids[j];
                o_amount := o_amount || f_amounts[j];
                o_expires := o_expires || f_expires[j];
                o_position := o_position || f_positions[j];
                o_balance := o_balance || a_balance[k];
                o_held := o_held || a_held[k];
                o_state := o_state || f_states[j];
                o_budget := o_budget || NULL::text;
                o_budgets := o_budgets || NULL::text;
                CONTINUE;
            END IF;
        END IF;
        v_refusal := NULL;
        v_refused := NULL;
        v_covering := '{}';
        v_available := a_balance[k] - a_held[k];
        IF k IS NULL OR v_available <= 0 OR p_amounts[i] > v_available THEN
            v_refusal := 'insufficient';
        END IF;
        -- the budgets that cover this hold (account budgets come first in b_*)
        FOR e IN coalesce(a_first[k], 1) .. coalesce(a_last[k], 0) LOOP
            IF (b_token[e] IS NULL OR b_token[e] = p_tokens[i])
               AND (b_model[e] IS NULL OR b_model[e] = p_models[i]) THEN
                IF v_refused IS NULL THEN
                    v_covering := v_covering || e;
                END IF;
                IF v_refusal IS NULL
                   AND b_spent[e] + b_held[e] + p_amounts[i] > b_amount[e] THEN
                    v_refusal := CASE b_scope[e] WHEN 'token' THEN 'token_budget_exceeded'
                                                 ELSE 'budget_exceeded' END;
                    v_refused := b_ids[e];
                    v_covering := ARRAY[e];
                END IF;
            END IF;
        END LOOP;
        t := array_position(t_ids, p_tokens[i]);
        IF v_refusal IS NULL AND (
               (a_max[k] IS NOT NULL AND a_holds[k] >= a_max[k])
               OR (t IS NOT NULL AND t_max[t] IS NOT NULL AND t_active[t] >= t_max[t])) THEN
            v_refusal := 'concurrency_limited';
        END IF;
        IF v_refusal IS NULL THEN
            v_position := v_position + 1;
            s_index := s_index || i;
            s_position := s_position || v_position;
            s_prev := s_prev || v_hash;
            v_hash := encode(sha256(convert_to(
                v_hash || ':' || v_position::text || ':' || p_digests[i], 'UTF8')), 'hex');
            s_hash := s_hash || v_hash;
            a_held[k] := a_held[k] + p_amounts[i];
            a_holds[k] := a_holds[k] + 1;
            a_position[k] := v_position;
            IF t IS NOT NULL THEN
                t_active[t] := t_active[t] + 1;
                t_changed[t] := true;
            END IF;
            FOREACH e IN ARRAY v_covering LOOP
                b_held[e] := b_held[e] + p_amounts[i];
                b_changed[e] := true;
            END LOOP;
            IF p_requests[i] IS NOT NULL THEN  -- a later hold of this batch may repeat it
                f_accounts := f_accounts || p_accounts[i];
                f_requests := f_requests || p_requests[i];
                f_ids := f_ids || p_reservations[i];
                f_amounts := f_amounts || p_amounts[i];
                f_expires := f_expires || p_expires[i];
                f_positions := f_positions || v_position;
                f_states := f_states || 'held'::text;
            END IF;
        END IF;
        v_figures := NULL;
        IF cardinality(v_covering) > 0 AND v_refusal IS DISTINCT FROM 'insufficient' THEN
            -- [[budget_id, scope, period, timezone, amount, spent, held], ...] as JSON text
            FOREACH e IN ARRAY v_covering LOOP
                v_figures := coalesce(v_figures || ',', '[') || json_build_array(
                    b_ids[e], b_scope[e], b_period[e], b_zone[e], b_amount[e], b_spent[e],
                    b_held[e])::text;
            END LOOP;
            v_figures := v_figures || ']';
        END IF;
        o_outcome := o_outcome || coalesce(v_refusal, 'held');
        o_id := o_id || CASE WHEN v_refusal IS NULL THEN p_reservations[i] END;
        o_amount := o_amount || p_amounts[i];
        o_expires := o_expires || CASE WHEN v_refusal IS NULL THEN p_expires[i] END;
        o_position := o_position || CASE WHEN v_refusal IS NULL THEN v_position END;
        o_balance := o_balance || a_balance[k];
        o_held := o_held || a_held[k];
        o_state := o_state || CASE WHEN v_refusal IS NULL THEN 'held' END;
        o_budget := o_budget || v_refused;
        o_budgets := o_budgets || v_figures;
    END LOOP;
    IF v_position > v_head.position THEN
        INSERT INTO event_store (position, event_id, type, source, subject, time, recorded_at,
                                 balance_delta, payload, content_hash, prev_hash, hash)
        SELECT s.position, p_event_ids[s.i], 'quota.reservation.held', p_source,
               p_accounts[s.i], p_times[s.i], p_recorded, NULL, p_payloads[s.i],
               p_digests[s.i], s.prev, s.hash
        FROM unnest(s_index, s_position, s_prev, s_hash) s(i, position, prev, hash);
        INSERT INTO reservations (reservation_id, account_id, amount, request_id, state,
                                  expires_at, held_position, token_id, model)
        SELECT p_reservations[s.i], p_accounts[s.i], p_amounts[s.i], p_requests[s.i], 'held',
               p_expires[s.i], s.position, p_tokens[s.i], p_models[s.i]
        FROM unnest(s_index, s_position) s(i, position);
        SELECT array_agg(DISTINCT p_accounts[s.i] ORDER BY p_accounts[s.i])
        INTO v_changed FROM unnest(s_index) s(i);
        UPDATE accounts a SET held = u.held, holds = u.holds, position = u.position
        FROM unnest(a_ids, a_held, a_holds, a_position) u(account_id, held, holds, position)
        WHERE a.account_id = u.account_id AND u.account_id = ANY(v_changed);
        UPDATE budgets b SET held = u.held
        FROM unnest(b_ids, b_held, b_changed) u(budget_id, held, changed)
        WHERE b.budget_id = u.budget_id AND u.changed;
        UPDATE tokens tk SET holds = u.holds
        FROM unnest(t_ids, t_active, t_changed) u(token_id, holds, changed)
        WHERE tk.token_id = u.token_id AND u.changed;
        -- the budgets' new `held`, as [account_id, budget_id, held]: policies need no read
        SELECT json_agg(json_build_array(u.account_id, u.budget_id, u.held))
        INTO v_budget_held
        FROM unnest(b_account, b_ids, b_held, b_changed) u(account_id, budget_id, held, changed)
        WHERE u.changed;
        v_budget_count := coalesce(json_array_length(v_budget_held), 0);
        UPDATE ledger_head SET position = v_position, hash = v_hash WHERE id = 1;
        IF cardinality(v_changed) <= p_max_rows THEN
            SELECT json_agg(json_build_array(a.account_id, a.balance, a.held, a.status, a.role,
                                             a.group_name, a.position, a.max_concurrent,
                                             a.holds) ORDER BY a.account_id)
            INTO v_rows FROM accounts a WHERE a.account_id = ANY(v_changed);
            v_payload := json_build_object(
                'position', v_position, 'account_rows', v_rows,
                'budget_held', coalesce(v_budget_held, '[]'::json))::text;
        END IF;
        IF v_payload IS NULL OR octet_length(v_payload) > p_max_bytes THEN
            v_payload := json_build_object(
                'position', v_position, 'accounts', to_json(v_changed),
                'budget_held', coalesce(v_budget_held, '[]'::json))::text;
        END IF;
        IF cardinality(v_changed) + v_budget_count > p_max_keys
           OR octet_length(v_payload) > p_max_bytes THEN
            v_payload := json_build_object('position', v_position, 'all', true)::text;
        END IF;
        PERFORM pg_notify(p_channel, v_payload);
    END IF;
    RETURN QUERY
        SELECT o.i::integer, o.outcome, o.id, o.amount, p_requests[o.i], o.expires,
               o.position, o.balance, o.held, o.state, o.budget, o.budgets
        FROM unnest(o_outcome, o_id, o_amount, o_expires, o_position, o_balance, o_held,
                    o_state, o_budget, o_budgets)
             WITH ORDINALITY o(outcome, id, amount, expires, position, balance, held,
                               state, budget, budgets, i)
        ORDER BY o.i;
END
$$
"""

DROP_0006 = (
    "DROP FUNCTION IF EXISTS quota_hold(text[], text[], bigint[], text[], timestamptz[],"
    " text[], timestamptz[], text[], text[], text, timestamptz, timestamptz, text,"
    " integer, integer, integer)"
)
DROP_0007 = DROP_0006[:-1] + ", text[], text[])"


def upgrade() -> None:
    op.add_column("accounts", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.add_column(
        "accounts", sa.Column("holds", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column("tokens", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.add_column(
        "tokens", sa.Column("holds", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column("tokens", sa.Column("previous_key_sha256", sa.Text(), nullable=True))
    op.add_column(
        "tokens", sa.Column("previous_valid_until", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("rate_limits", sa.Column("units", sa.BigInteger(), nullable=True))
    op.add_column("reservations", sa.Column("token_id", sa.Text(), nullable=True))
    op.add_column("reservations", sa.Column("model", sa.Text(), nullable=True))
    # an account's active holds, counted by the holds before this migration
    op.execute(
        "UPDATE accounts a SET holds = c.n FROM (SELECT account_id, count(*) n FROM reservations"
        " WHERE state = 'held' GROUP BY account_id) c WHERE a.account_id = c.account_id"
    )
    op.create_index(
        "ix_reservations_active_account",
        "reservations",
        ["account_id"],
        unique=False,
        postgresql_where=sa.text("state = 'held'"),
    )
    op.create_table(
        "budgets",
        sa.Column("budget_id", sa.Text(), nullable=False),
        sa.Column("account_id", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("token_id", sa.Text(), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("timezone", sa.Text(), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("budget_id", name=op.f("pk_budgets")),
    )
    op.create_index(op.f("ix_budgets_account_id"), "budgets", ["account_id"], unique=False)
    op.create_table(
        "budget_spend",
        sa.Column("budget_id", sa.Text(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("budget_id", "period_start", name=op.f("pk_budget_spend")),
    )
    op.execute(PERIOD_FUNCTION)
    op.execute(DROP_0006)
    op.execute(HOLD_FUNCTION)


def downgrade() -> None:
    import importlib.util
    from pathlib import Path

    op.execute(DROP_0007)
    path = Path(__file__).with_name("0006_hold_notify_limits.py")
    spec = importlib.util.spec_from_file_location("quota_migration_0006", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    op.execute(module.hold_function(module.previous_function()))
    op.execute("DROP FUNCTION IF EXISTS quota_period_start(text, text, timestamptz)")
    op.drop_table("budget_spend")
    op.drop_index(op.f("ix_budgets_account_id"), table_name="budgets")
    op.drop_table("budgets")
    op.drop_index("ix_reservations_active_account", table_name="reservations")
    for table, column in (
        ("reservations", "model"), ("reservations", "token_id"), ("rate_limits", "units"),
        ("tokens", "previous_valid_until"), ("tokens", "previous_key_sha256"),
        ("tokens", "holds"), ("tokens", "max_concurrent"), ("accounts", "holds"),
        ("accounts", "max_concurrent"),
    ):  # fmt: skip
        op.drop_column(table, column)
