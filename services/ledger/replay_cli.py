"""`quota replay [--check] [--from-kafka]`: the command around `services.ledger.replay`."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from services.ledger.replay import Progress, ReplayReport, no_progress, replay
from services.store import db, event_store

#: Show a progress bar from this many events on (when stderr is a terminal).
PROGRESS_THRESHOLD: Final = 50_000


@contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Progress]:
    """A rich progress bar on stderr for long runs; a no-op otherwise."""
    if not enabled or total < PROGRESS_THRESHOLD:
        yield no_progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("replaying", total=total)
    with bar:
        yield lambda n: bar.advance(task, n)


def replay_command(check: bool, from_kafka: bool) -> int:
    """`quota replay [--check] [--from-kafka]`: 0 when no difference, 1 otherwise.

    Prints the report as JSON on stdout (`head_hash` included). A rebuild that repaired
    differences still exits 1 (it reports what it repaired); the next run exits 0.
    """
    from services.settings import Settings, asyncpg_dsn

    settings = Settings()

    async def run() -> ReplayReport:
        conn = await db.connect(asyncpg_dsn(settings.database_url))
        try:
            total = (await event_store.read_head(conn)).position
            with progress_bar(total, sys.stderr.isatty()) as progress:
                return await replay(
                    conn,
                    check=check,
                    from_kafka=from_kafka,
                    kafka_bootstrap=settings.kafka_bootstrap,
                    topic=settings.topic,
                    progress=progress,
                    dsn=asyncpg_dsn(settings.database_url),
                )
        finally:
            await conn.close()

    report = asyncio.run(run())
    print(json.dumps(report.as_json(), indent=2))
    print(f"head hash {report.head_hash} at position {report.position}", file=sys.stderr)
    return 0 if report.ok else 1
