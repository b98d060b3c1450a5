"""quota_hold(): a group of holds folded, chained and stored in one statement

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25

The policy service holds quota with one call of this function per group of concurrent
requests: one round trip, committed on its own. It takes the ledger head lock (the lock every
ledger batch takes), then for each hold in order:

* a request id that already has a held, unexpired reservation of the account gets that
  reservation back (`repeated`);
* otherwise the hold is refused (`insufficient`) unless the account exists and its available
  quota (balance - held) is positive and covers the amount: the same rule as the Python fold's
  `_hold`, which verify and replay re-run over the stored history;
* otherwise the next position is chained (the same hash as `services.store.chain`), the
  `quota.reservation.held` event is appended with the payload and content hash the caller
  computed, the account's `held` and the reservation row are written (`held`).

It moves the head and sends the `quota_changes` notification the ledger sends: the changed
accounts as rows when that fits, their ids when not, or a full reload.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HOLD_FUNCTION = r"""
CREATE FUNCTION quota_hold(
    p_accounts text[], p_requests text[], p_amounts bigint[], p_reservations text[],
    p_expires timestamptz[], p_event_ids text[], p_times timestamptz[], p_payloads text[],
    p_digests text[], p_source text, p_recorded timestamptz, p_now timestamptz,
    p_channel text
) RETURNS TABLE (
    idx integer, outcome text, reservation_id text, amount bigint, request_id text,
    expires_at timestamptz, held_position bigint, balance bigint, held bigint
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n integer := coalesce(array_length(p_accounts, 1), 0);
    v_head ledger_head%ROWTYPE;
    v_position bigint;
    v_hash text;
    -- the batch's accounts, locked, in account_id order: balance, held, last position
    a_ids text[];
    a_balance bigint[];
    a_held bigint[];
    a_position bigint[];
    -- held, unexpired reservations of the batch's request ids: stored before the batch, then
    -- those this batch holds
    f_accounts text[];
    f_requests text[];
    f_ids text[];
    f_amounts bigint[];
    f_expires timestamptz[];
    f_positions bigint[];
    -- one entry per hold: what it became
    o_outcome text[] := '{}';
    o_id text[] := '{}';
    o_amount bigint[] := '{}';
    o_expires timestamptz[] := '{}';
    o_position bigint[] := '{}';
    o_balance bigint[] := '{}';
    o_held bigint[] := '{}';
    -- the holds that are stored
    s_index integer[] := '{}';
    s_position bigint[] := '{}';
    s_prev text[] := '{}';
    s_hash text[] := '{}';
    k integer;
    j integer;
    v_available bigint;
    v_changed text[];
    v_rows json;
    v_payload text;
BEGIN
    SELECT * INTO v_head FROM ledger_head WHERE id = 1 FOR UPDATE;
    v_position := v_head.position;
    v_hash := v_head.hash;
    SELECT array_agg(a.account_id ORDER BY a.account_id),
           array_agg(a.balance ORDER BY a.account_id),
           array_agg(a.held ORDER BY a.account_id),
           array_agg(a.position ORDER BY a.account_id)
    INTO a_ids, a_balance, a_held, a_position
    FROM (SELECT * FROM accounts WHERE account_id = ANY(p_accounts)
          ORDER BY account_id FOR UPDATE) a;
    IF EXISTS (SELECT 1 FROM unnest(p_requests) r WHERE r IS NOT NULL) THEN
        SELECT array_agg(r.account_id), array_agg(r.request_id), array_agg(r.reservation_id),
               array_agg(r.amount), array_agg(r.expires_at), array_agg(r.held_position)
        INTO f_accounts, f_requests, f_ids, f_amounts, f_expires, f_positions
        FROM (SELECT DISTINCT ON (r.account_id, r.request_id) r.*
              FROM reservations r
              JOIN unnest(p_accounts, p_requests) q(account_id, request_id)
                ON r.account_id = q.account_id AND r.request_id = q.request_id
              WHERE r.state = 'held' AND r.expires_at > p_now
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
                CONTINUE;
            END IF;
        END IF;
        v_available := a_balance[k] - a_held[k];
        IF k IS NULL OR v_available <= 0 OR p_amounts[i] > v_available THEN
            o_outcome := o_outcome || 'insufficient'::text;
            o_id := o_id || NULL::text;
            o_amount := o_amount || p_amounts[i];
            o_expires := o_expires || NULL::timestamptz;
            o_position := o_position || NULL::bigint;
            o_balance := o_balance || a_balance[k];
            o_held := o_held || a_held[k];
            CONTINUE;
        END IF;
        v_position := v_position + 1;
        s_index := s_index || i;
        s_position := s_position || v_position;
        s_prev := s_prev || v_hash;
        v_hash := encode(sha256(convert_to(
            v_hash || ':' || v_position::text || ':' || p_digests[i], 'UTF8')), 'hex');
        s_hash := s_hash || v_hash;
        a_held[k] := a_held[k] + p_amounts[i];
        a_position[k] := v_position;
        IF p_requests[i] IS NOT NULL THEN  -- a later hold of this batch may repeat it
            f_accounts := f_accounts || p_accounts[i];
            f_requests := f_requests || p_requests[i];
            f_ids := f_ids || p_reservations[i];
            f_amounts := f_amounts || p_amounts[i];
            f_expires := f_expires || p_expires[i];
            f_positions := f_positions || v_position;
        END IF;
        o_outcome := o_outcome || 'held'::text;
        o_id := o_id || p_reservations[i];
        o_amount := o_amount || p_amounts[i];
        o_expires := o_expires || p_expires[i];
        o_position := o_position || v_position;
        o_balance := o_balance || a_balance[k];
        o_held := o_held || a_held[k];
    END LOOP;
    IF v_position > v_head.position THEN
        INSERT INTO event_store (position, event_id, type, source, subject, time, recorded_at,
                                 balance_delta, payload, content_hash, prev_hash, hash)
        SELECT s.position, p_event_ids[s.i], 'quota.reservation.held', p_source,
               p_accounts[s.i], p_times[s.i], p_recorded, NULL, p_payloads[s.i],
               p_digests[s.i], s.prev, s.hash
        FROM unnest(s_index, s_position, s_prev, s_hash) s(i, position, prev, hash);
        INSERT INTO reservations (reservation_id, account_id, amount, request_id, state,
                                  expires_at, held_position)
        SELECT p_reservations[s.i], p_accounts[s.i], p_amounts[s.i], p_requests[s.i], 'held',
               p_expires[s.i], s.position
        FROM unnest(s_index, s_position) s(i, position);
        SELECT array_agg(DISTINCT p_accounts[s.i] ORDER BY p_accounts[s.i])
        INTO v_changed FROM unnest(s_index) s(i);
        UPDATE accounts a SET held = u.held, position = u.position
        FROM unnest(a_ids, a_held, a_position) u(account_id, held, position)
        WHERE a.account_id = u.account_id AND u.account_id = ANY(v_changed);
        UPDATE ledger_head SET position = v_position, hash = v_hash WHERE id = 1;
        IF cardinality(v_changed) <= 32 THEN
            SELECT json_agg(json_build_array(a.account_id, a.balance, a.held, a.status, a.role,
                                             a.group_name, a.position) ORDER BY a.account_id)
            INTO v_rows FROM accounts a WHERE a.account_id = ANY(v_changed);
            v_payload := json_build_object(
                'position', v_position, 'accounts', '[]'::json, 'account_rows', v_rows,
                'tokens', '[]'::json, 'rate_limits', '[]'::json, 'catalog', false)::text;
        END IF;
        IF v_payload IS NULL OR octet_length(v_payload) > 7000 THEN
            v_payload := json_build_object(
                'position', v_position, 'accounts', to_json(v_changed),
                'tokens', '[]'::json, 'rate_limits', '[]'::json, 'catalog', false)::text;
        END IF;
        IF cardinality(v_changed) > 100 OR octet_length(v_payload) > 7000 THEN
            v_payload := json_build_object('position', v_position, 'all', true)::text;
        END IF;
        PERFORM pg_notify(p_channel, v_payload);
    END IF;
    RETURN QUERY
        SELECT o.i::integer, o.outcome, o.id, o.amount, p_requests[o.i], o.expires,
               o.position, o.balance, o.held
        FROM unnest(o_outcome, o_id, o_amount, o_expires, o_position, o_balance, o_held)
             WITH ORDINALITY o(outcome, id, amount, expires, position, balance, held, i)
        ORDER BY o.i;
END
$$
"""


def upgrade() -> None:
    op.execute(HOLD_FUNCTION)


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION IF EXISTS quota_hold(text[], text[], bigint[], text[], timestamptz[],"
        " text[], timestamptz[], text[], text[], text, timestamptz, timestamptz, text)"
    )
