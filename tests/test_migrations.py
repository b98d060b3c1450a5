"""Alembic makes the schema; the SQLModel tables describe the same schema."""

from __future__ import annotations

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from services.settings import sqlalchemy_url
from services.store.tables import metadata


async def test_migrations_match_the_table_models(database_url: str) -> None:
    engine = create_async_engine(sqlalchemy_url(database_url))

    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection)
        return list(compare_metadata(context, metadata))

    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    await engine.dispose()
    assert differences == []


async def test_event_store_is_append_only(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            """
            INSERT INTO event_store (position, event_id, type, source, subject, time, recorded_at,
                                     payload, content_hash, prev_hash, hash)
            VALUES (1, 'e', 't', 's', 'a', now(), now(), '{}', 'c', 'p', 'h')
            """
        )
        for statement in ("UPDATE event_store SET type = 'x'", "DELETE FROM event_store",
                          "TRUNCATE event_store"):  # fmt: skip
            try:
                await conn.execute(statement)
            except asyncpg.RaiseError as exc:
                assert "append-only" in str(exc)
            else:
                raise AssertionError(f"{statement} was allowed")
