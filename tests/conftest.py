"""Shared fixtures: a migrated database per test (cloned from a template), a topic per test
that uses Kafka.

`db_settings` is for a test that needs only PostgreSQL (a policy, the stores, startup checks):
nothing starts a broker or asks one anything for it. `settings` is the same plus the broker and
a topic of the test's own, for a test that runs a ledger or produces events.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from services.infra.postgres import run_on_server, with_database
from services.infra.topics import ensure_topic
from services.migrate import upgrade
from services.settings import Settings
from services.store import db

pytest_plugins = ["tests.fixtures.infra", "tests.processes"]

ADMIN_TOKEN = "test-admin-token"
PARTITIONS = 4
#: `db_settings`' broker: nothing listens on port 1, so a database-only test that reaches for
#: Kafka after all is refused instead of finding whatever broker runs here.
NO_BROKER = "127.0.0.1:1"


@pytest.fixture(scope="session")
def template_database(postgres_server_url: str) -> Iterator[str]:
    """A database migrated once with Alembic (never `create_all`), cloned by every test."""
    name = f"quota_tmpl_{uuid.uuid4().hex[:10]}"
    asyncio.run(run_on_server(postgres_server_url, f'CREATE DATABASE "{name}"'))
    upgrade(with_database(postgres_server_url, name))
    yield name
    asyncio.run(
        run_on_server(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    )


@pytest.fixture
async def database_url(postgres_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"quota_test_{uuid.uuid4().hex[:10]}"
    await run_on_server(
        postgres_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'
    )
    yield with_database(postgres_server_url, name)
    await run_on_server(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database_url, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def topic(kafka_bootstrap: str) -> str:
    """A topic of this test's own, with several partitions."""
    name = f"quota.events.test-{uuid.uuid4().hex[:10]}"
    await ensure_topic(kafka_bootstrap, name, PARTITIONS)
    return name


@pytest.fixture
def db_settings(database_url: str) -> Settings:
    """Settings for a test that needs only PostgreSQL: no broker, no topic (see `NO_BROKER`)."""
    return Settings(
        database_url=database_url,
        kafka_bootstrap=NO_BROKER,
        topic_partitions=PARTITIONS,
        consumer_group=f"ledger-{uuid.uuid4().hex[:8]}",
        admin_token=ADMIN_TOKEN,
        # Most tests call the policy as an anonymous gateway; tests of the service token set
        # one (or turn this off).
        allow_anonymous_gateways=True,
        batch_timeout_ms=50,
        # Tansu holds a group join for half the session timeout; keep tests quick.
        kafka_session_timeout_ms=1_500,
        log_json=True,
    )


@pytest.fixture
def settings(db_settings: Settings, kafka_bootstrap: str, topic: str) -> Settings:
    """`db_settings` with the broker and this test's own topic: for a test that runs a ledger
    or produces events."""
    return db_settings.model_copy(update={"kafka_bootstrap": kafka_bootstrap, "topic": topic})
