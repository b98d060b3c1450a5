"""Supervision shared by both services: backoff, the failures worth retrying, a loop's health,
and waiting for PostgreSQL and the broker at startup.

Every loop that talks to PostgreSQL, Kafka or Redis retries what it can survive with capped
exponential backoff, says in a `LoopHealth` (read by `/readyz`) and in metrics that it is not
making progress, and lets anything else end the process with a clear log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

import asyncpg
import structlog
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge
from pydantic import BaseModel

log = structlog.get_logger("quota.supervise")

#: What a lost, refusing or restarting PostgreSQL raises (asyncpg's InternalClientError: a
#: connection terminated in the middle of a COPY, seen in the soak benchmark's outage).
DATABASE_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
#: Everything a supervised loop retries; anything else is a bug or a fault it cannot survive.
TRANSIENT_ERRORS: Final = (*DATABASE_ERRORS, KafkaError)

LOOP_FAILURES = Counter(
    "quota_loop_failures_total",
    "Failures of a supervised loop (retried with backoff)",
    ["loop", "stage"],
)
LOOP_HEALTHY = Gauge(
    "quota_loop_healthy", "1 while a supervised loop makes progress, 0 while it retries", ["loop"]
)


class Readiness(BaseModel):
    """`GET /readyz` of both services: 200 when ready, 503 with the reason when not."""

    ready: bool
    position: int
    reason: str | None = None


class Backoff:
    """Capped exponential backoff with jitter: 0.1 s, 0.2 s, 0.4 s ... up to `cap`."""

    def __init__(self, initial: float = 0.1, cap: float = 5.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.initial

    async def sleep(self) -> None:
        await asyncio.sleep(self.next())


@dataclass(slots=True)
class LoopHealth:
    """Whether a supervised loop makes progress: the reason it does not, and when it last did."""

    name: str
    reason: str | None = "starting"
    failures: int = 0
    last_ok: float = field(default_factory=time.monotonic)
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        LOOP_HEALTHY.labels(loop=self.name).set(0)

    @property
    def ok(self) -> bool:
        return self.reason is None

    def succeeded(self) -> None:
        if self.reason is not None:
            if self.failures:
                log.info("loop recovered", loop=self.name, after_failures=self.failures)
            self.reason = None
            self.failures = 0
            self.backoff.reset()
            LOOP_HEALTHY.labels(loop=self.name).set(1)
        self.last_ok = time.monotonic()

    def failed(self, stage: str, exc: BaseException) -> float:
        """Record a failure; returns the delay to wait before the next try."""
        self.failures += 1
        self.reason = f"{stage}: {type(exc).__name__}: {exc}"[:500]
        LOOP_FAILURES.labels(loop=self.name, stage=stage).inc()
        LOOP_HEALTHY.labels(loop=self.name).set(0)
        delay = self.backoff.next()
        if self.failures & (self.failures - 1):
            return delay  # logged at the 1st, 2nd, 4th, 8th ... failure in a row
        log.warning(
            "loop failed; retrying",
            loop=self.name,
            stage=stage,
            error=f"{type(exc).__name__}: {exc}",
            attempt=self.failures,
            retry_in=round(delay, 2),
        )
        return delay

    def seconds_since_ok(self) -> float:
        return time.monotonic() - self.last_ok


def describe_database(dsn: str) -> str:
    """`PostgreSQL at host:port/db`, without credentials, for log lines."""
    parts = urlsplit(dsn)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"PostgreSQL at {host}:{port}{parts.path or '/'}"


async def wait_until_up(what: str, probe: Callable[[], Awaitable[object]], timeout: float) -> None:
    """Call `probe` until it succeeds, saying what is awaited; SystemExit after `timeout` s."""
    deadline = time.monotonic() + timeout
    backoff = Backoff(initial=0.2, cap=2.0)
    attempt = 0
    while True:
        attempt += 1
        try:
            await asyncio.wait_for(probe(), timeout=max(0.5, deadline - time.monotonic()))
            if attempt > 1:
                log.info("dependency is up", waited_for=what, attempts=attempt)
            return
        except Exception as exc:  # any failure means "not up yet"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.critical(
                    "dependency did not come up; exiting",
                    waited_for=what,
                    timeout_seconds=timeout,
                    error=f"{type(exc).__name__}: {exc}",
                )
                raise SystemExit(
                    f"gave up waiting for {what} after {timeout:.0f}s "
                    f"(QUOTA_STARTUP_TIMEOUT_SECONDS): {type(exc).__name__}: {exc}"
                ) from exc
            log.warning(
                "waiting for a dependency",
                waiting_for=what,
                error=f"{type(exc).__name__}: {exc}",
                seconds_left=round(remaining, 1),
            )
            await asyncio.sleep(min(backoff.next(), remaining))


async def probe_database(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.fetchval("SELECT 1 FROM ledger_head")
    finally:
        await conn.close()


def exit_process(exc: BaseException) -> None:
    """A fault a service cannot survive: say why and end the process, non-zero, so an
    orchestrator restarts it (nothing is lost: offsets and holds live in PostgreSQL)."""
    log.critical("cannot go on; exiting", error=f"{type(exc).__name__}: {exc}")
    logging.shutdown()
    os._exit(70)


def supervise_task(task: asyncio.Task[None], on_fatal: Callable[[BaseException], None]) -> None:
    """Call `on_fatal` if `task` (a loop that retries what it can survive) ever ends with an
    exception: it never dies silently."""

    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("background loop died", loop=task.get_name(), error=repr(exc))
            on_fatal(exc)

    task.add_done_callback(done)


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
