"""The projections' SQL: loading the state a fold needs (some keys, or all of it), writing
the rows a fold changed, and copying a whole state in (replay). Column lists are defined
here once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from services.contract.events import AccountUsageRecorded
from services.store import budget_store
from services.store.model import (
    Account,
    Changes,
    Channel,
    ModelSpec,
    RateLimit,
    Reservation,
    RoutePolicy,
    State,
    Token,
)

#: Every projection table's columns, in the order rows are written and read (replay's COPY,
#: the fold's rows, the SELECTs below).
PROJECTION_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "accounts": ("account_id", "balance", "held", "status", "role", "group_name", "position",
                 "max_concurrent", "holds"),
    "tokens": ("token_id", "account_id", "key_sha256", "key_last6", "expires_at",
               "allowed_cidrs", "allowed_models", "revoked", "position", "max_concurrent",
               "previous_key_sha256", "previous_valid_until", "holds"),
    "channels": ("channel_id", "models", "groups", "enabled", "rate_limited_until", "position"),
    "models": ("model", "kind", "limits", "position"),
    "route_policies": ("route", "min_role", "position"),
    "rate_limits": ("account_id", "model", "requests", "window_seconds", "position", "units"),
    "reservations": ("reservation_id", "account_id", "amount", "request_id", "state",
                     "expires_at", "held_position", "ended_position", "settled_amount",
                     "ended_by", "token_id", "model"),
    "budgets": ("budget_id", "account_id", "scope", "token_id", "model", "amount", "period",
                "timezone", "held", "position"),
    "budget_spend": ("budget_id", "period_start", "spent"),
}  # fmt: skip

#: The account columns, as SELECTs list them.
ACCOUNT_COLUMNS: Final = ", ".join(PROJECTION_COLUMNS["accounts"])
_SELECT_ACCOUNTS: Final = f"SELECT {ACCOUNT_COLUMNS} FROM accounts"  # noqa: S608 (constants)


@dataclass(slots=True)
class StateKeys:
    """Which projection rows a batch may touch."""

    accounts: set[str]
    tokens: set[str]
    token_keys: set[str]
    channels: set[int]
    rate_limits: set[tuple[str, str]]
    reservations: set[str] = field(default_factory=set)
    #: Each usage: its account, its data, and its time (the budget periods it counts in).
    usage: list[tuple[str, AccountUsageRecorded, datetime]] = field(default_factory=list)
    #: account_id -> from when its budgets set in the batch count usage (the earliest period
    #: one of them could start in: 32 days before it, or the beginning for a `total`).
    budget_sets: dict[str, datetime] = field(default_factory=dict)


async def load_state(conn: asyncpg.Connection, keys: StateKeys) -> State:
    """Load (and lock, for accounts) the rows a batch may touch."""
    state = State(track_usage=bool(keys.budget_sets))
    if keys.accounts:
        for row in await conn.fetch(
            _SELECT_ACCOUNTS + " WHERE account_id = ANY($1::text[]) ORDER BY account_id FOR UPDATE",
            list(keys.accounts),
        ):
            state.accounts[row["account_id"]] = _account(row)
    if keys.reservations:
        for reservation in await load_reservations(conn, sorted(keys.reservations)):
            state.put_reservation(reservation)
            if reservation.token_id is not None:  # a hold's end counts down its token's holds
                keys.tokens.add(reservation.token_id)
    if keys.tokens or keys.token_keys:
        for row in await conn.fetch(
            """
            SELECT * FROM tokens
            WHERE token_id = ANY($1::text[]) OR key_sha256 = ANY($2::text[])
               OR previous_key_sha256 = ANY($2::text[])
            """,
            list(keys.tokens),
            list(keys.token_keys),
        ):
            state.put_token(_token(row))
    if keys.channels:
        for row in await conn.fetch(
            "SELECT * FROM channels WHERE channel_id = ANY($1::bigint[])", list(keys.channels)
        ):
            channel = _channel(row)
            state.channels[channel.channel_id] = channel
    if keys.accounts:
        await budget_store.load_for_batch(conn, state, keys)
    return state


async def load_all(
    conn: asyncpg.Connection, *, reservations: bool = True, spend_since: datetime | None = None
) -> State:
    """Every projection row, as the fold's state (verify and replay use this). Without
    `reservations` (the policy snapshot, which decides without them) the reservations, every
    hold ever made, are left out: they grow with the history, the rest with the accounts.
    With `spend_since`, only budget spend rows of periods starting then or later (and
    `total`s)."""
    state = State()
    for row in await conn.fetch(_SELECT_ACCOUNTS):
        state.accounts[row["account_id"]] = _account(row)
    for row in await conn.fetch("SELECT * FROM tokens"):
        state.put_token(_token(row))
    catalog = await load_catalog(conn)
    state.channels, state.models, state.routes = catalog.channels, catalog.models, catalog.routes
    for row in await conn.fetch("SELECT * FROM rate_limits"):
        limit = _rate_limit(row)
        state.rate_limits[(limit.account_id, limit.model)] = limit
    if reservations:
        for row in await conn.fetch("SELECT * FROM reservations"):
            state.put_reservation(reservation_from_row(row))
    await budget_store.load_all(conn, state, spend_since)
    return state


async def get_account(conn: asyncpg.Connection, account_id: str) -> Account | None:
    row = await conn.fetchrow(
        _SELECT_ACCOUNTS + " WHERE account_id = $1",
        account_id,
    )
    return _account(row) if row is not None else None


async def write_changes(conn: asyncpg.Connection, state: State, changes: Changes) -> None:
    """Upsert every changed row of `state` (and delete removed rate limits)."""
    if changes.accounts:
        rows = [state.accounts[key] for key in sorted(changes.accounts)]
        await conn.execute(
            """
            INSERT INTO accounts (account_id, balance, held, status, role, group_name, position,
                                  max_concurrent, holds)
            SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
                                 $6::text[], $7::bigint[], $8::integer[], $9::integer[])
            ON CONFLICT (account_id) DO UPDATE SET
                balance = EXCLUDED.balance, held = EXCLUDED.held, status = EXCLUDED.status,
                role = EXCLUDED.role, group_name = EXCLUDED.group_name,
                position = EXCLUDED.position, max_concurrent = EXCLUDED.max_concurrent,
                holds = EXCLUDED.holds
            """,
            [a.account_id for a in rows],
            [a.balance for a in rows],
            [a.held for a in rows],
            [a.status for a in rows],
            [a.role for a in rows],
            [a.group for a in rows],
            [a.position for a in rows],
            [a.max_concurrent for a in rows],
            [a.holds for a in rows],
        )
    if changes.tokens or changes.token_holds:
        await conn.executemany(
            """
            INSERT INTO tokens (token_id, account_id, key_sha256, key_last6, expires_at,
                                allowed_cidrs, allowed_models, revoked, position, max_concurrent,
                                previous_key_sha256, previous_valid_until, holds)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
            ON CONFLICT (token_id) DO UPDATE SET
                key_sha256 = EXCLUDED.key_sha256, key_last6 = EXCLUDED.key_last6,
                expires_at = EXCLUDED.expires_at, allowed_cidrs = EXCLUDED.allowed_cidrs,
                allowed_models = EXCLUDED.allowed_models, revoked = EXCLUDED.revoked,
                position = EXCLUDED.position, max_concurrent = EXCLUDED.max_concurrent,
                previous_key_sha256 = EXCLUDED.previous_key_sha256,
                previous_valid_until = EXCLUDED.previous_valid_until, holds = EXCLUDED.holds
            """,
            [
                _token_tuple(state.tokens[key])
                for key in sorted(changes.tokens | changes.token_holds)
            ],
        )
    if changes.channels:
        await conn.executemany(
            """
            INSERT INTO channels (channel_id, models, groups, enabled, rate_limited_until,
                                  position)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (channel_id) DO UPDATE SET
                models = EXCLUDED.models, groups = EXCLUDED.groups, enabled = EXCLUDED.enabled,
                rate_limited_until = EXCLUDED.rate_limited_until, position = EXCLUDED.position
            """,
            [_channel_tuple(state.channels[key]) for key in sorted(changes.channels)],
        )
    if changes.models:
        await conn.executemany(
            """
            INSERT INTO models (model, kind, limits, position) VALUES ($1, $2, $3, $4)
            ON CONFLICT (model) DO UPDATE SET
                kind = EXCLUDED.kind, limits = EXCLUDED.limits, position = EXCLUDED.position
            """,
            [_model_tuple(state.models[key]) for key in sorted(changes.models)],
        )
    if changes.routes:
        await conn.executemany(
            """
            INSERT INTO route_policies (route, min_role, position) VALUES ($1, $2, $3)
            ON CONFLICT (route) DO UPDATE SET
                min_role = EXCLUDED.min_role, position = EXCLUDED.position
            """,
            [_route_tuple(state.routes[key]) for key in sorted(changes.routes)],
        )
    if changes.rate_limits:
        present = [
            state.rate_limits[k] for k in sorted(changes.rate_limits) if k in state.rate_limits
        ]
        removed = [k for k in sorted(changes.rate_limits) if k not in state.rate_limits]
        if present:
            await conn.executemany(
                """
                INSERT INTO rate_limits (account_id, model, requests, window_seconds, position,
                                         units)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (account_id, model) DO UPDATE SET
                    requests = EXCLUDED.requests, window_seconds = EXCLUDED.window_seconds,
                    position = EXCLUDED.position, units = EXCLUDED.units
                """,
                [_rate_limit_tuple(r) for r in present],
            )
        if removed:
            await conn.executemany(
                "DELETE FROM rate_limits WHERE account_id = $1 AND model = $2", removed
            )
    if changes.reservations:
        await conn.executemany(
            """
            INSERT INTO reservations (reservation_id, account_id, amount, request_id, state,
                                      expires_at, held_position, ended_position,
                                      settled_amount, ended_by, token_id, model)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
            ON CONFLICT (reservation_id) DO UPDATE SET
                state = EXCLUDED.state, ended_position = EXCLUDED.ended_position,
                settled_amount = EXCLUDED.settled_amount, ended_by = EXCLUDED.ended_by
            """,
            [_reservation_tuple(state.reservations[key]) for key in sorted(changes.reservations)],
        )
    await budget_store.write_changes(conn, state, changes)


#: Every projection table and its columns, in the order of `projection_rows`' tuples.


def projection_rows(state: State) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every projection table that `state` holds, per table."""
    return {
        "accounts": [
            (
                a.account_id,
                a.balance,
                a.held,
                a.status,
                a.role,
                a.group,
                a.position,
                a.max_concurrent,
                a.holds,
            )
            for a in state.accounts.values()
        ],
        "tokens": [_token_tuple(t) for t in state.tokens.values()],
        "channels": [_channel_tuple(c) for c in state.channels.values()],
        "models": [_model_tuple(m) for m in state.models.values()],
        "route_policies": [_route_tuple(r) for r in state.routes.values()],
        "rate_limits": [_rate_limit_tuple(r) for r in state.rate_limits.values()],
        "reservations": [_reservation_tuple(r) for r in state.reservations.values()],
        **budget_store.projection_rows(state),
    }


async def copy_projections(conn: asyncpg.Connection, state: State) -> None:
    """COPY every row of `state` into the projection tables, which the caller has emptied."""
    for table, rows in projection_rows(state).items():
        if rows:
            await conn.copy_records_to_table(table, records=rows, columns=PROJECTION_COLUMNS[table])


def _channel_tuple(c: Channel) -> tuple[Any, ...]:
    return (c.channel_id, list(c.models), list(c.groups), c.enabled, c.rate_limited_until,
            c.position)  # fmt: skip


def _model_tuple(m: ModelSpec) -> tuple[Any, ...]:
    return (m.model, m.kind, m.limits, m.position)


def _route_tuple(r: RoutePolicy) -> tuple[Any, ...]:
    return (r.route, r.min_role, r.position)


def _rate_limit_tuple(r: RateLimit) -> tuple[Any, ...]:
    return (r.account_id, r.model, r.requests, r.window_seconds, r.position, r.units)


def _reservation_tuple(r: Reservation) -> tuple[Any, ...]:
    return (r.reservation_id, r.account_id, r.amount, r.request_id, r.state, r.expires_at,
            r.held_position, r.ended_position, r.settled_amount, r.ended_by, r.token_id,
            r.model)  # fmt: skip


def reservation_from_row(row: Mapping[str, Any]) -> Reservation:
    return Reservation(
        reservation_id=row["reservation_id"],
        account_id=row["account_id"],
        amount=row["amount"],
        request_id=row["request_id"],
        state=row["state"],
        expires_at=row["expires_at"],
        held_position=row["held_position"],
        ended_position=row["ended_position"],
        settled_amount=row["settled_amount"],
        ended_by=row["ended_by"],
        token_id=row["token_id"],
        model=row["model"],
    )


async def load_reservations(
    conn: asyncpg.Connection, reservation_ids: Sequence[str]
) -> list[Reservation]:
    rows = await conn.fetch(
        "SELECT * FROM reservations WHERE reservation_id = ANY($1::text[])",
        list(reservation_ids),
    )
    return [reservation_from_row(row) for row in rows]


def _account(row: Mapping[str, Any]) -> Account:
    return Account(
        account_id=row["account_id"],
        balance=row["balance"],
        held=row["held"],
        status=row["status"],
        role=row["role"],
        group=row["group_name"],
        position=row["position"],
        max_concurrent=row["max_concurrent"],
        holds=row["holds"],
    )


def _token(row: Mapping[str, Any]) -> Token:
    return Token(
        token_id=row["token_id"],
        account_id=row["account_id"],
        key_sha256=row["key_sha256"],
        key_last6=row["key_last6"],
        expires_at=row["expires_at"],
        allowed_cidrs=tuple(row["allowed_cidrs"]),
        allowed_models=tuple(row["allowed_models"]),
        revoked=row["revoked"],
        position=row["position"],
        max_concurrent=row["max_concurrent"],
        previous_key_sha256=row["previous_key_sha256"],
        previous_valid_until=row["previous_valid_until"],
        holds=row["holds"],
    )


def _token_tuple(t: Token) -> tuple[Any, ...]:
    return (
        t.token_id,
        t.account_id,
        t.key_sha256,
        t.key_last6,
        t.expires_at,
        list(t.allowed_cidrs),
        list(t.allowed_models),
        t.revoked,
        t.position,
        t.max_concurrent,
        t.previous_key_sha256,
        t.previous_valid_until,
        t.holds,
    )


def _channel(row: Mapping[str, Any]) -> Channel:
    return Channel(
        channel_id=row["channel_id"],
        models=tuple(row["models"]),
        groups=tuple(row["groups"]),
        enabled=row["enabled"],
        rate_limited_until=row["rate_limited_until"],
        position=row["position"],
    )


async def load_accounts(conn: asyncpg.Connection, account_ids: Sequence[str]) -> list[Account]:
    rows = await conn.fetch(
        _SELECT_ACCOUNTS + " WHERE account_id = ANY($1::text[])",
        list(account_ids),
    )
    return [_account(row) for row in rows]


async def load_tokens(conn: asyncpg.Connection, token_ids: Sequence[str]) -> list[Token]:
    rows = await conn.fetch(
        "SELECT * FROM tokens WHERE token_id = ANY($1::text[])", list(token_ids)
    )
    return [_token(row) for row in rows]


async def load_rate_limits(conn: asyncpg.Connection, account_ids: Sequence[str]) -> list[RateLimit]:
    rows = await conn.fetch(
        "SELECT * FROM rate_limits WHERE account_id = ANY($1::text[])", list(account_ids)
    )
    return [_rate_limit(row) for row in rows]


def _rate_limit(row: Mapping[str, Any]) -> RateLimit:
    return RateLimit(
        row["account_id"], row["model"], row["requests"], row["window_seconds"], row["position"],
        row["units"],
    )  # fmt: skip


async def load_catalog(conn: asyncpg.Connection) -> State:
    """Channels, models and route policies (small tables, reloaded whole)."""
    state = State()
    for row in await conn.fetch("SELECT * FROM channels"):
        channel = _channel(row)
        state.channels[channel.channel_id] = channel
    for row in await conn.fetch("SELECT * FROM models"):
        state.models[row["model"]] = ModelSpec(
            row["model"], row["kind"], row["limits"], row["position"]
        )
    for row in await conn.fetch("SELECT * FROM route_policies"):
        state.routes[row["route"]] = RoutePolicy(row["route"], row["min_role"], row["position"])
    return state


async def accounts_starting_with(
    conn: asyncpg.Connection, prefix: str, limit: int
) -> list[Account]:
    """Up to `limit` accounts whose id starts with `prefix`, by id."""
    rows = await conn.fetch(
        _SELECT_ACCOUNTS + " WHERE starts_with(account_id, $1) ORDER BY account_id LIMIT $2",
        prefix,
        limit,
    )
    return [_account(row) for row in rows]
