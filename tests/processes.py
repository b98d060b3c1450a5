"""Real `quota ledger` / `quota policy` processes for tests, on free loopback ports.

The processes themselves are `services.infra.processes` (the soak benchmark starts them too);
this adds the fixture that stops them after each test and prints their logs when it failed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.infra.postgres import run_on_server, with_database
from services.infra.processes import QUOTA, QuotaProcess, QuotaProcesses, quota_env
from services.infra.topics import ensure_topic
from services.settings import Settings
from tests.builders import head_position

__all__ = [
    "QUOTA",
    "QuotaProcess",
    "QuotaProcesses",
    "quota_env",
    "quota_processes",
    "start_policies",
]


async def start_policies(
    quota_processes: QuotaProcesses, pool: asyncpg.Pool, count: int, **overrides: Any
) -> list[QuotaProcess]:
    """`count` policy processes (`overrides`: their settings), ready at the current head."""
    policies = [quota_processes.start("policy", f"policy-{i}", **overrides) for i in range(count)]
    position = await head_position(pool)
    for policy in policies:
        await quota_processes.wait_ready(policy, position)
    return policies


@pytest.fixture
def quota_processes(
    db_settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[QuotaProcesses]:
    """Processes configured like the test's `settings` (broker and topic) when the test uses
    them, else like `db_settings` (PostgreSQL only: no topic is made for a test that runs only
    policies, or ledgers that never get as far as the broker)."""
    settings: Settings = (
        request.getfixturevalue("settings") if "settings" in request.fixturenames else db_settings
    )
    failed_before = request.session.testsfailed
    fleet = QuotaProcesses(settings, tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()
        if request.session.testsfailed > failed_before:
            fleet.print_logs()


@contextlib.asynccontextmanager
async def module_fleet(
    postgres_server_url: str,
    template_database: str,
    kafka_bootstrap: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    label: str,
    *,
    partitions: int,
    **overrides: Any,
) -> AsyncIterator[tuple[Settings, QuotaProcesses]]:
    """Settings on a database copied from the migrated template and a topic of their own,
    and the fleet of processes one test module runs on them. At the end every process must
    still run; their logs are printed when a test failed; the database is dropped."""
    suffix = uuid.uuid4().hex[:10]
    name = f"quota_{label}_{suffix}"
    await run_on_server(
        postgres_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'
    )
    settings = Settings(
        **{
            "database_url": with_database(postgres_server_url, name),
            "kafka_bootstrap": kafka_bootstrap,
            "topic": f"quota.events.{label}-{suffix}",
            "topic_partitions": partitions,
            "consumer_group": f"ledger-{suffix}",
            "batch_timeout_ms": 50,
            "kafka_session_timeout_ms": 1_500,
            # A busy 2-core machine must not turn a quiet ledger into 503 snapshot_stale.
            "max_staleness_seconds": 300.0,
            **overrides,
        }
    )
    await ensure_topic(kafka_bootstrap, settings.topic, partitions)
    fleet = QuotaProcesses(settings, tmp_path_factory.mktemp(label))
    failed_before = request.session.testsfailed
    try:
        yield settings, fleet
        fleet.check_alive()
    finally:
        fleet.close()
        if request.session.testsfailed > failed_before:
            fleet.print_logs()
        await run_on_server(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
