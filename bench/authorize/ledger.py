"""The real ledger in the driver's process, and the freshness scenario.

The ledger runs as `services.ledger.app.create_app(settings, on_commit=...)` with its lifespan
(pool, producer, `LedgerConsumer`, heartbeat), exactly as `quota ledger` runs it; `on_commit`
stamps the monotonic clock whenever a batch commits. Its heartbeat keeps the policy from going
stale (`QUOTA_MAX_STALENESS_SECONDS`) while wrk runs, so the driver's event loop must stay free.

Time stamps are `time.monotonic_ns()`: CLOCK_MONOTONIC on Linux, one clock for every process
of the machine, so the server's "snapshot reached position N" compares with the driver's
"event produced".
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from bench.authorize.world import fresh_event
from bench.infra import Publisher
from bench.report import summarize
from services.contract.samples import structured
from services.ledger.app import create_app
from services.ledger.consumer import CommittedBatch
from services.settings import Settings


class CommitLog:
    """(position, monotonic ns) of every batch the ledger committed. The stamp is taken just
    after COMMIT returned, which makes "ledger commit -> snapshot" a little short, never long."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.times_ns: list[int] = []

    @property
    def position(self) -> int:
        """The ledger's head after its last commit (0 before the first)."""
        return self.positions[-1] if self.positions else 0

    def __call__(self, batch: CommittedBatch) -> None:
        self.times_ns.append(time.monotonic_ns())
        self.positions.append(batch.position)

    def committed_ns(self, position: int) -> int | None:
        index = bisect.bisect_left(self.positions, position)
        return self.times_ns[index] if index < len(self.positions) else None


@contextlib.asynccontextmanager
async def running_ledger(settings: Settings) -> AsyncIterator[CommitLog]:
    """The ledger app (on a fresh database) with its lifespan; the log of its commits."""
    commits = CommitLog()
    app = create_app(settings, on_commit=commits)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.ledger.consumer.started.wait(), 60)
        yield commits


async def wait_for_position(commits: CommitLog, position: int, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            while commits.position < position:
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise RuntimeError(
            f"the ledger did not reach position {position} within {timeout:.0f}s "
            f"(at {commits.position})"
        ) from None


async def measure_freshness(
    bootstrap: str, topic: str, commits: CommitLog, server: httpx.AsyncClient, count: int,
    head: int, warmup: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """Produce `count` recharges one at a time; for each, when the policy's snapshot had it.

    Each event is produced only after the previous one reached the snapshot, so the ledger
    position names it: (position before) + 1. `head` is the ledger head read from PostgreSQL:
    holds written by the policy move it without the ledger's consumer knowing.
    """
    #: (position, produced, acknowledged, reached the snapshot), monotonic ns.
    samples: list[tuple[int, int, int, int]] = []
    async with Publisher(bootstrap, topic, linger_ms=0) as publisher:
        position = max(commits.position, head)
        for index in range(warmup + count):
            event = fresh_event()
            produced = time.monotonic_ns()
            await publisher.send_one(event["subject"].encode(), structured(event))
            acked = time.monotonic_ns()
            position += 1
            answer = await server.get(
                "/_bench/reached", params={"position": position, "timeout": 30}, timeout=40
            )
            if answer.status_code != 200:
                raise RuntimeError(f"the snapshot did not reach position {position}: {answer.text}")
            if index >= warmup:
                samples.append((position, produced, acked, answer.json()["reached_ns"]))
    # The notification can reach the snapshot before `on_commit` runs: let it catch up.
    with contextlib.suppress(RuntimeError):
        await wait_for_position(commits, position, timeout=30)
    stamped = [(s, c) for s in samples if (c := commits.committed_ns(s[0])) is not None]
    fold = [(committed - s[1]) / 1e6 for s, committed in stamped]
    push = [(s[3] - committed) / 1e6 for s, committed in stamped]
    return {
        "events": len(samples),
        "commit_stamped": len(stamped),
        "total_ms": summarize([(s[3] - s[1]) / 1e6 for s in samples]),
        "components_ms": {
            "produce_ack": summarize([(s[2] - s[1]) / 1e6 for s in samples]),
            "produce_to_ledger_commit": summarize(fold) if fold else None,
            "ledger_commit_to_snapshot": summarize(push) if push else None,
        },
    }
