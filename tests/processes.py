"""Real `quota ledger` / `quota policy` processes for tests, on free loopback ports.

The processes themselves are `services.infra.processes` (the soak benchmark starts them too);
this adds the fixture that stops them after each test and prints their logs when it failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.infra.processes import QUOTA, QuotaProcess, QuotaProcesses, quota_env
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
