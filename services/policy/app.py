"""The policy service's application: `create_app` and its lifespan, which waits for
PostgreSQL, builds the `Policy` (snapshot store, limiter, reservations) and supervises its
loops. The HTTP edge is `services.policy.http`, the orchestration `services.policy.service`,
the decision `services.policy.decision`.

Start it with `quota policy --host --port` (QUOTA_DATABASE_URL, QUOTA_SERVICE_TOKEN,
QUOTA_REDIS_URL, QUOTA_MAX_STALENESS_SECONDS, QUOTA_FAIL_OPEN). `GET /readyz` answers 200 with
`{"ready": true, "position": N}` once the snapshot is loaded; N is the ledger position the
snapshot has seen, which tests and operators can wait on.

Gateways authenticate with `X-Quota-Service-Token` (compared in constant time): every route
but `/healthz`, `/readyz` and `/metrics` refuses a missing or wrong one with 401
`service_token_invalid` when QUOTA_SERVICE_TOKEN is set, and `quota policy` does not start
without it unless QUOTA_ALLOW_ANONYMOUS_GATEWAYS=true (`Settings.check_secrets`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services import http_metrics
from services.policy import metrics as policy_metrics
from services.policy.http import PolicyApp, register
from services.policy.ratelimit import build_rate_limiter
from services.policy.reservations import Reservations
from services.policy.service import Policy
from services.policy.snapshot_store import SnapshotStore
from services.reject_nul import RejectNul
from services.settings import Settings, asyncpg_dsn
from services.store import db
from services.supervise import (
    cancel_and_wait,
    describe_database,
    exit_process,
    probe_database,
    supervise_task,
    wait_until_up,
)


def create_app(
    settings: Settings, *, on_fatal: Callable[[BaseException], None] = exit_process
) -> FastAPI:
    """The policy application; its lifespan waits for PostgreSQL, loads the snapshot and keeps
    it fresh. Its loops (snapshot listener, holds, expiry) retry what they can survive;
    `on_fatal` is called if one ends otherwise (by default the process exits non-zero)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dsn = asyncpg_dsn(settings.database_url)
        await wait_until_up(
            describe_database(dsn), lambda: probe_database(dsn), settings.startup_timeout_seconds
        )
        async with contextlib.AsyncExitStack() as stack:
            store = SnapshotStore(dsn)
            policy_metrics.watch(store, settings.max_staleness_seconds)
            limiter = build_rate_limiter(settings.redis_url)
            stack.push_async_callback(limiter.close)
            pool = await db.create_pool(dsn, max_size=6)
            stack.push_async_callback(pool.close)
            reservations = Reservations(pool, settings.reservation_ttl_seconds)
            app.state.policy = Policy(settings, store, limiter, reservations)
            for name, loop in (("snapshot", store.run()), ("reservations", reservations.run())):
                task = asyncio.create_task(loop, name=name)
                stack.push_async_callback(cancel_and_wait, task)
                supervise_task(task, on_fatal)
            yield

    app = PolicyApp(
        title="quota policy",
        version="0.1.0",
        lifespan=lifespan,
        description="Answers whether a gateway request may go ahead.",
    )
    register(app)
    app.add_middleware(RejectNul)
    http_metrics.install(app, "policy")  # outermost (`PolicyApp` times /authorize itself)
    return app
