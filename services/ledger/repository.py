"""All of the ledger's SQL. Functions take a connection; the caller owns the transaction."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg
import orjson

from services.ledger.fold import (
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

CHANGES_CHANNEL: Final = "quota_changes"


class OffsetFenced(Exception):
    """Another consumer has claimed a partition since we did: our batch must not commit."""


#: Session settings of every connection the services open. The statements are prepared once
#: (asyncpg caches them) and take arrays of keys (`= ANY($1)`); PostgreSQL's generic plan for
#: them is made from the statistics of the moment, and a table that was empty then (a new
#: database, the reservations table) keeps a sequential scan long after it has grown: seen as
#: a 4 ms scan of the reservations per hold. A custom plan per execution costs tens of µs.
SERVER_SETTINGS: Final = {"plan_cache_mode": "force_custom_plan"}


async def init_connection(conn: asyncpg.Connection) -> None:
    """Codec setup for every pooled connection: jsonb as Python values, in the binary format
    (a version byte, then the JSON text) so that binary COPY can write it too."""
    await conn.set_type_codec(
        "jsonb",
        encoder=_jsonb_encode,
        decoder=_jsonb_decode,
        schema="pg_catalog",
        format="binary",
    )


def _jsonb_encode(value: Any) -> bytes:
    return b"\x01" + json.dumps(value).encode()


def _jsonb_decode(data: bytes) -> Any:
    return json.loads(data[1:])


async def connect(dsn: str) -> asyncpg.Connection:
    """One connection with the services' session settings and codecs."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS)
    await init_connection(conn)
    return conn


async def create_pool(dsn: str, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        server_settings=SERVER_SETTINGS,
    )
    assert pool is not None
    return pool


# --- head, event store ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    position: int
    hash: str
    duplicates: int


async def lock_head(conn: asyncpg.Connection) -> Head:
    row = await conn.fetchrow(
        "SELECT position, hash, duplicates FROM ledger_head WHERE id = 1 FOR UPDATE"
    )
    return Head(row["position"], row["hash"], row["duplicates"])


@dataclass(frozen=True, slots=True)
class NewHold:
    """One hold for `quota_hold()`: the reservation and its event, payload already hashed."""

    account_id: str
    request_id: str | None
    amount: int
    reservation_id: str
    expires_at: datetime
    event_id: str
    time: datetime
    payload: str
    digest: str


_HOLD: Final = """
SELECT idx, outcome, reservation_id, amount, request_id, expires_at, held_position, balance,
       held, state
FROM quota_hold($1::text[], $2::text[], $3::bigint[], $4::text[], $5::timestamptz[],
                $6::text[], $7::timestamptz[], $8::text[], $9::text[], $10, $11, $12, $13)
"""


async def hold(
    conn: asyncpg.Connection,
    holds: Sequence[NewHold],
    source: str,
    recorded_at: datetime,
    now: datetime,
) -> list[asyncpg.Record]:
    """Fold, chain and store a group of holds in ONE statement (`quota_hold()`, migrations
    0004 and 0005, under the head lock): one round trip, committed on its own when the
    connection is not in a transaction. One row per hold, in order: `outcome` is `held`,
    `repeated` (the request id's reservation within its TTL, whatever its `state`) or
    `insufficient` (check 13: `state` NULL)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _HOLD,
        [h.account_id for h in holds],
        [h.request_id for h in holds],
        [h.amount for h in holds],
        [h.reservation_id for h in holds],
        [h.expires_at for h in holds],
        [h.event_id for h in holds],
        [h.time for h in holds],
        [h.payload for h in holds],
        [h.digest for h in holds],
        source,
        recorded_at,
        now,
        CHANGES_CHANNEL,
    )
    return rows


async def read_head(conn: asyncpg.Connection) -> Head:
    row = await conn.fetchrow("SELECT position, hash, duplicates FROM ledger_head WHERE id = 1")
    return Head(row["position"], row["hash"], row["duplicates"])


async def write_head(conn: asyncpg.Connection, head: Head) -> None:
    await conn.execute(
        "UPDATE ledger_head SET position = $1, hash = $2, duplicates = $3 WHERE id = 1",
        head.position,
        head.hash,
        head.duplicates,
    )


async def stored_content_hashes(
    conn: asyncpg.Connection, event_ids: Sequence[str]
) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT event_id, content_hash FROM event_store WHERE event_id = ANY($1::text[])",
        list(event_ids),
    )
    return {row["event_id"]: row["content_hash"] for row in rows}


EVENT_COLUMNS: Final = (
    "position",
    "event_id",
    "type",
    "source",
    "subject",
    "time",
    "recorded_at",
    "balance_delta",
    "payload",
    "content_hash",
    "prev_hash",
    "hash",
    "topic",
    "partition",
    "kafka_offset",
)

EventTuple = tuple[
    int, str, str, str, str, datetime, datetime, int | None, str, str, str, str,
    str | None, int | None, int | None,
]  # fmt: skip


async def append_events(conn: asyncpg.Connection, records: Sequence[EventTuple]) -> None:
    if records:
        await conn.copy_records_to_table("event_store", records=records, columns=EVENT_COLUMNS)


_LOCAL_WRITE: Final = """
WITH appended AS (
    INSERT INTO event_store (position, event_id, type, source, subject, time, recorded_at,
                             balance_delta, payload, content_hash, prev_hash, hash)
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::timestamptz[], $7::timestamptz[], $8::bigint[], $9::text[],
                         $10::text[], $11::text[], $12::text[])
), account_rows AS (
    INSERT INTO accounts (account_id, balance, held, status, role, group_name, position)
    SELECT * FROM unnest($13::text[], $14::bigint[], $15::bigint[], $16::text[], $17::text[],
                         $18::text[], $19::bigint[])
    ON CONFLICT (account_id) DO UPDATE SET
        balance = EXCLUDED.balance, held = EXCLUDED.held, status = EXCLUDED.status,
        role = EXCLUDED.role, group_name = EXCLUDED.group_name, position = EXCLUDED.position
), reservation_rows AS (
    INSERT INTO reservations (reservation_id, account_id, amount, request_id, state,
                              expires_at, held_position, ended_position, settled_amount,
                              ended_by)
    SELECT * FROM unnest($20::text[], $21::text[], $22::bigint[], $23::text[], $24::text[],
                         $25::timestamptz[], $26::bigint[], $27::bigint[], $28::bigint[],
                         $29::text[])
    ON CONFLICT (reservation_id) DO UPDATE SET
        state = EXCLUDED.state, ended_position = EXCLUDED.ended_position,
        settled_amount = EXCLUDED.settled_amount, ended_by = EXCLUDED.ended_by
), head AS (
    UPDATE ledger_head SET position = $30, hash = $31 WHERE id = 1
)
SELECT pg_notify($32, $33) WHERE $33::text IS NOT NULL
"""


async def write_local(
    conn: asyncpg.Connection,
    records: Sequence[EventTuple],
    state: State,
    changes: Changes,
    head: Head,
    notify: Mapping[str, Any] | None,
) -> None:
    """Append events the service wrote itself, with the account and reservation rows they
    changed, the new head and the notification: ONE statement, so one round trip (a hold's
    transaction is otherwise a chain of round trips under the head lock). The caller holds the
    head lock; `changes` may name accounts and reservations only."""
    if changes.tokens or changes.catalog or changes.rate_limits:
        raise ValueError("a local write changes only accounts and reservations")
    accounts = [state.accounts[key] for key in sorted(changes.accounts)]
    holds = [state.reservations[key] for key in sorted(changes.reservations)]
    events = list(zip(*(record[:12] for record in records), strict=True)) or [[]] * 12
    await conn.execute(
        _LOCAL_WRITE,
        *events,
        [a.account_id for a in accounts],
        [a.balance for a in accounts],
        [a.held for a in accounts],
        [a.status for a in accounts],
        [a.role for a in accounts],
        [a.group for a in accounts],
        [a.position for a in accounts],
        [r.reservation_id for r in holds],
        [r.account_id for r in holds],
        [r.amount for r in holds],
        [r.request_id for r in holds],
        [r.state for r in holds],
        [r.expires_at for r in holds],
        [r.held_position for r in holds],
        [r.ended_position for r in holds],
        [r.settled_amount for r in holds],
        [r.ended_by for r in holds],
        head.position,
        head.hash,
        CHANGES_CHANNEL,
        orjson.dumps(notify).decode() if notify is not None else None,
    )


# --- quarantine ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quarantined:
    reason: str
    code: str
    event_id: str | None
    topic: str
    partition: int
    offset: int
    raw: bytes | None
    headers: list[list[str]]
    received_at: datetime


async def quarantine(conn: asyncpg.Connection, items: Sequence[Quarantined]) -> None:
    if not items:
        return
    await conn.executemany(
        """
        INSERT INTO rejected_events
            (reason, code, event_id, topic, partition, kafka_offset, raw, headers, received_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (topic, partition, kafka_offset) DO NOTHING
        """,
        [
            (
                q.reason,
                q.code,
                q.event_id,
                q.topic,
                q.partition,
                q.offset,
                q.raw,
                q.headers,
                q.received_at,
            )
            for q in items
        ],
    )


async def list_rejected(
    conn: asyncpg.Connection, limit: int, after_id: int = 0
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT id, reason, code, event_id, topic, partition, kafka_offset, raw, headers,
               received_at
        FROM rejected_events WHERE id > $1 ORDER BY id LIMIT $2
        """,
        after_id,
        limit,
    )
    return rows


# --- projections -----------------------------------------------------------------------------


@dataclass(slots=True)
class StateKeys:
    """Which projection rows a batch may touch."""

    accounts: set[str]
    tokens: set[str]
    token_keys: set[str]
    channels: set[int]
    rate_limits: set[tuple[str, str]]
    reservations: set[str] = field(default_factory=set)


async def load_state(conn: asyncpg.Connection, keys: StateKeys) -> State:
    """Load (and lock, for accounts) the rows a batch may touch."""
    state = State()
    if keys.accounts:
        for row in await conn.fetch(
            """
            SELECT account_id, balance, held, status, role, group_name, position
            FROM accounts WHERE account_id = ANY($1::text[]) ORDER BY account_id FOR UPDATE
            """,
            list(keys.accounts),
        ):
            state.accounts[row["account_id"]] = _account(row)
    if keys.tokens or keys.token_keys:
        for row in await conn.fetch(
            """
            SELECT * FROM tokens
            WHERE token_id = ANY($1::text[]) OR key_sha256 = ANY($2::text[])
            """,
            list(keys.tokens),
            list(keys.token_keys),
        ):
            token = _token(row)
            state.tokens[token.token_id] = token
            state.token_keys[token.key_sha256] = token.token_id
    if keys.channels:
        for row in await conn.fetch(
            "SELECT * FROM channels WHERE channel_id = ANY($1::bigint[])", list(keys.channels)
        ):
            channel = _channel(row)
            state.channels[channel.channel_id] = channel
    if keys.reservations:
        for reservation in await load_reservations(conn, sorted(keys.reservations)):
            state.reservations[reservation.reservation_id] = reservation
    return state


async def load_all(conn: asyncpg.Connection) -> State:
    """Every projection row, as the fold's state (verify and the policy snapshot use this)."""
    state = State()
    for row in await conn.fetch(
        "SELECT account_id, balance, held, status, role, group_name, position FROM accounts"
    ):
        state.accounts[row["account_id"]] = _account(row)
    for row in await conn.fetch("SELECT * FROM tokens"):
        token = _token(row)
        state.tokens[token.token_id] = token
        state.token_keys[token.key_sha256] = token.token_id
    catalog = await load_catalog(conn)
    state.channels, state.models, state.routes = catalog.channels, catalog.models, catalog.routes
    for row in await conn.fetch("SELECT * FROM rate_limits"):
        limit = _rate_limit(row)
        state.rate_limits[(limit.account_id, limit.model)] = limit
    for row in await conn.fetch("SELECT * FROM reservations"):
        reservation = _reservation(row)
        state.reservations[reservation.reservation_id] = reservation
    return state


async def get_account(conn: asyncpg.Connection, account_id: str) -> Account | None:
    row = await conn.fetchrow(
        """
        SELECT account_id, balance, held, status, role, group_name, position
        FROM accounts WHERE account_id = $1
        """,
        account_id,
    )
    return _account(row) if row is not None else None


async def write_changes(conn: asyncpg.Connection, state: State, changes: Changes) -> None:
    """Upsert every changed row of `state` (and delete removed rate limits)."""
    if changes.accounts:
        rows = [state.accounts[key] for key in sorted(changes.accounts)]
        await conn.execute(
            """
            INSERT INTO accounts (account_id, balance, held, status, role, group_name, position)
            SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
                                 $6::text[], $7::bigint[])
            ON CONFLICT (account_id) DO UPDATE SET
                balance = EXCLUDED.balance, held = EXCLUDED.held, status = EXCLUDED.status,
                role = EXCLUDED.role, group_name = EXCLUDED.group_name,
                position = EXCLUDED.position
            """,
            [a.account_id for a in rows],
            [a.balance for a in rows],
            [a.held for a in rows],
            [a.status for a in rows],
            [a.role for a in rows],
            [a.group for a in rows],
            [a.position for a in rows],
        )
    if changes.tokens:
        await conn.executemany(
            """
            INSERT INTO tokens (token_id, account_id, key_sha256, key_last6, expires_at,
                                allowed_cidrs, allowed_models, revoked, position)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT (token_id) DO UPDATE SET
                expires_at = EXCLUDED.expires_at, allowed_cidrs = EXCLUDED.allowed_cidrs,
                allowed_models = EXCLUDED.allowed_models, revoked = EXCLUDED.revoked,
                position = EXCLUDED.position
            """,
            [_token_tuple(state.tokens[key]) for key in sorted(changes.tokens)],
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
                INSERT INTO rate_limits (account_id, model, requests, window_seconds, position)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (account_id, model) DO UPDATE SET
                    requests = EXCLUDED.requests, window_seconds = EXCLUDED.window_seconds,
                    position = EXCLUDED.position
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
                                      settled_amount, ended_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            ON CONFLICT (reservation_id) DO UPDATE SET
                state = EXCLUDED.state, ended_position = EXCLUDED.ended_position,
                settled_amount = EXCLUDED.settled_amount, ended_by = EXCLUDED.ended_by
            """,
            [_reservation_tuple(state.reservations[key]) for key in sorted(changes.reservations)],
        )


#: Every projection table and its columns, in the order of `projection_rows`' tuples.
PROJECTION_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "accounts": ("account_id", "balance", "held", "status", "role", "group_name", "position"),
    "tokens": ("token_id", "account_id", "key_sha256", "key_last6", "expires_at",
               "allowed_cidrs", "allowed_models", "revoked", "position"),
    "channels": ("channel_id", "models", "groups", "enabled", "rate_limited_until", "position"),
    "models": ("model", "kind", "limits", "position"),
    "route_policies": ("route", "min_role", "position"),
    "rate_limits": ("account_id", "model", "requests", "window_seconds", "position"),
    "reservations": ("reservation_id", "account_id", "amount", "request_id", "state",
                     "expires_at", "held_position", "ended_position", "settled_amount",
                     "ended_by"),
}  # fmt: skip


def projection_rows(state: State) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every projection table that `state` holds, per table."""
    return {
        "accounts": [
            (a.account_id, a.balance, a.held, a.status, a.role, a.group, a.position)
            for a in state.accounts.values()
        ],
        "tokens": [_token_tuple(t) for t in state.tokens.values()],
        "channels": [_channel_tuple(c) for c in state.channels.values()],
        "models": [_model_tuple(m) for m in state.models.values()],
        "route_policies": [_route_tuple(r) for r in state.routes.values()],
        "rate_limits": [_rate_limit_tuple(r) for r in state.rate_limits.values()],
        "reservations": [_reservation_tuple(r) for r in state.reservations.values()],
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
    return (r.account_id, r.model, r.requests, r.window_seconds, r.position)


def _reservation_tuple(r: Reservation) -> tuple[Any, ...]:
    return (r.reservation_id, r.account_id, r.amount, r.request_id, r.state, r.expires_at,
            r.held_position, r.ended_position, r.settled_amount, r.ended_by)  # fmt: skip


def _reservation(row: Mapping[str, Any]) -> Reservation:
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
    )


async def load_reservations(
    conn: asyncpg.Connection, reservation_ids: Sequence[str]
) -> list[Reservation]:
    rows = await conn.fetch(
        "SELECT * FROM reservations WHERE reservation_id = ANY($1::text[])",
        list(reservation_ids),
    )
    return [_reservation(row) for row in rows]


async def get_reservation(conn: asyncpg.Connection, reservation_id: str) -> Reservation | None:
    found = await load_reservations(conn, [reservation_id])
    return found[0] if found else None


async def due_reservations(
    conn: asyncpg.Connection, now: datetime, limit: int
) -> list[Reservation]:
    """Held reservations whose TTL has passed (`expires_at <= now`), oldest first."""
    rows = await conn.fetch(
        """
        SELECT * FROM reservations
        WHERE state = 'held' AND expires_at <= $1 ORDER BY expires_at LIMIT $2
        """,
        now,
        limit,
    )
    return [_reservation(row) for row in rows]


async def notify_changes(conn: asyncpg.Connection, payload: Mapping[str, Any]) -> None:
    """Tell listeners (the policy service) what a batch changed; delivered at commit."""
    await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, orjson.dumps(payload).decode())


def _account(row: Mapping[str, Any]) -> Account:
    return Account(
        account_id=row["account_id"],
        balance=row["balance"],
        held=row["held"],
        status=row["status"],
        role=row["role"],
        group=row["group_name"],
        position=row["position"],
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


# --- consumer offsets ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    next_offset: int | None
    epoch: int


async def claim_partitions(
    conn: asyncpg.Connection, group_id: str, topic: str, partitions: Iterable[int], owner: str
) -> dict[int, Claim]:
    """Take ownership of partitions: bump each one's epoch, which fences the previous owner."""
    claims: dict[int, Claim] = {}
    for partition in sorted(partitions):
        row = await conn.fetchrow(
            """
            INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, epoch, owner,
                                          updated_at)
            VALUES ($1, $2, $3, -1, 1, $4, now())
            ON CONFLICT (group_id, topic, partition) DO UPDATE SET
                epoch = consumer_offsets.epoch + 1, owner = EXCLUDED.owner, updated_at = now()
            RETURNING next_offset, epoch
            """,
            group_id,
            topic,
            partition,
            owner,
        )
        next_offset = row["next_offset"]
        claims[partition] = Claim(next_offset if next_offset >= 0 else None, row["epoch"])
    return claims


async def commit_offsets(
    conn: asyncpg.Connection,
    group_id: str,
    topic: str,
    offsets: Mapping[int, tuple[int, int]],
) -> None:
    """Compare-and-set each partition's next offset on our epoch; raise if we were fenced."""
    for partition, (next_offset, epoch) in sorted(offsets.items()):
        status = await conn.execute(
            """
            UPDATE consumer_offsets SET next_offset = $4, updated_at = now()
            WHERE group_id = $1 AND topic = $2 AND partition = $3 AND epoch = $5
            """,
            group_id,
            topic,
            partition,
            next_offset,
            epoch,
        )
        if status != "UPDATE 1":
            raise OffsetFenced(f"partition {partition} of {topic} was claimed by another consumer")


async def stored_offsets(conn: asyncpg.Connection, group_id: str, topic: str) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
        group_id,
        topic,
    )
    return {row["partition"]: row["next_offset"] for row in rows}


# --- partial reads (the policy snapshot reloads only what a batch changed) -------------------


async def load_accounts(conn: asyncpg.Connection, account_ids: Sequence[str]) -> list[Account]:
    rows = await conn.fetch(
        """
        SELECT account_id, balance, held, status, role, group_name, position
        FROM accounts WHERE account_id = ANY($1::text[])
        """,
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
        row["account_id"], row["model"], row["requests"], row["window_seconds"], row["position"]
    )


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
