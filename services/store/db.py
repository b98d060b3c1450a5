"""Connections to the one database both services share: session settings, codecs, the
pool, and the `quota_changes` notification channel.
"""

from __future__ import annotations

import json
from typing import Any, Final

import asyncpg

from services.store.notify import Notification

CHANGES_CHANNEL: Final = "quota_changes"


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


async def notify_changes(conn: asyncpg.Connection, notification: Notification) -> None:
    """Tell listeners (the policy service) what a commit changed; delivered at commit."""
    await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, notification.encode())
