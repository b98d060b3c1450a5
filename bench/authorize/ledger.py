"""The real ledger (`create_app` with its lifespan, as `quota ledger` runs it) in the driver's
process, its commits stamped through `on_commit`, and the freshness scenario. Its heartbeat
keeps the policy fresh while wrk runs, so the driver's event loop must stay free. Stamps are
`time.monotonic_ns()`: on Linux one clock for every process, so the server's stamps compare.
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
    """(position, monotonic ns) of every batch the ledger committed, stamped just after COMMIT
    returned ("ledger commit -> snapshot" is a little short, never long)."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.times_ns: list[int] = []

    @property
    def position(self) -> int:
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
    deadline = time.monotonic() + timeout
    while commits.position < position:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ledger did not reach position {position} within "
                               f"{timeout:.0f}s (at {commits.position})")  # fmt: skip
        await asyncio.sleep(0.02)


async def measure_freshness(
    bootstrap: str, topic: str, commits: CommitLog, server: httpx.AsyncClient, count: int,
    head: int, warmup: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """Produce `count` recharges one at a time (each after the previous one reached the
    snapshot, so it is at position + 1 from `head`, the head in PostgreSQL: the policy's holds
    move it too); for each, when the policy's snapshot had it."""
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
