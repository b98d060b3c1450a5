"""The benchmark's server: ONE uvicorn worker serving the policy app and its yardsticks.

    python -m bench.authorize.server --host 127.0.0.1 --port 8123

Configuration is the policy's own (`QUOTA_*` environment variables, read by `Settings`) and it
is started the way `quota policy` starts it: `configure_logging`, then uvicorn with
`log_config=None` and, as `quota policy` by default (Settings.access_log, QUOTA_ACCESS_LOG),
WITHOUT uvicorn's access log; `--access-log` turns it on (through structlog, as `quota policy`
does with QUOTA_ACCESS_LOG=true). One ASGI callable dispatches by path:

* `/raw`: a bare ASGI callable (no FastAPI, no Starlette) that reads the body and returns a
  constant JSON: the ceiling of this server, loop and HTTP parser;
* `/baseline`: a plain FastAPI endpoint that asks PostgreSQL per request (asyncpg pool,
  one `SELECT` joining the token by key hash to its account) and returns JSON;
* `/_bench/...`: helpers for the driver (freshness timestamps, server facts, cProfile);
* everything else: the real policy app from `services.policy.app.create_app`, its lifespan
  (snapshot load, LISTEN/NOTIFY, rate limiter) run by this dispatcher's lifespan.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import cProfile
import functools
import gc
import hashlib
import importlib.util
import json
import os
import platform
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import asyncpg
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from services.logs import configure_logging
from services.policy.app import create_app
from services.policy.decision import Snapshot, extract_key
from services.policy.snapshot_store import SnapshotStore
from services.settings import Settings, asyncpg_dsn

RAW_PATH: Final = "/raw"
BASELINE_PATH: Final = "/baseline"
BENCH_PREFIX: Final = "/_bench/"

#: The ceiling's answer: constant, about the size and shape of an allowed decision.
RAW_BODY: Final = json.dumps(
    {
        "allowed": True,
        "account_id": "acct_bench_allowed",
        "token_id": "tok_bench_allowed",
        "role": "user",
        "group": "default",
        "balance": 10**15,
        "available": 10**15,
        "channels": [1, 2],
        "reservation": None,
        "position": 20_000,
    },
    separators=(",", ":"),
).encode()
RAW_HEADERS: Final = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(RAW_BODY)).encode()),
]

BASELINE_SQL: Final = """
SELECT t.token_id, t.revoked, a.account_id, a.balance, a.held, a.status, a.role, a.group_name
FROM tokens t JOIN accounts a ON a.account_id = t.account_id
WHERE t.key_sha256 = $1
"""


async def raw_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """The ceiling: read the request body, answer a constant JSON. No framework at all."""
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        more = bool(message.get("more_body", False))
    await send({"type": "http.response.start", "status": 200, "headers": RAW_HEADERS})
    await send({"type": "http.response.body", "body": RAW_BODY})


class PositionLog:
    """When (monotonic ns, comparable across processes on Linux) each snapshot position
    was first published, recorded by a task waiting on `SnapshotStore.wait_for_position`."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.times_ns: list[int] = []
        self.changed = asyncio.Condition()

    @property
    def latest(self) -> int:
        return self.positions[-1] if self.positions else -1

    def reached_ns(self, position: int) -> int | None:
        index = bisect.bisect_left(self.positions, position)
        return self.times_ns[index] if index < len(self.positions) else None

    async def watch(self, store: SnapshotStore) -> None:
        await store.loaded.wait()
        seen = -1
        while True:
            await store.wait_for_position(seen + 1)
            now = time.monotonic_ns()
            position = store.position
            if position > seen:
                self.positions.append(position)
                self.times_ns.append(now)
                seen = position
                async with self.changed:
                    self.changed.notify_all()


class Pauses:
    """Counts and durations of things that stop the event loop: garbage collections (by
    generation, via `gc.callbacks`) and snapshot rebuilds (`Snapshot.from_state`, wrapped)."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, float]] = {}
        self._gc_started = 0

    def add(self, name: str, seconds: float) -> None:
        entry = self.totals.setdefault(name, {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
        entry["count"] += 1
        entry["total_ms"] += seconds * 1000
        entry["max_ms"] = max(entry["max_ms"], seconds * 1000)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter_ns()
        elif self._gc_started:
            self.add(
                f"gc.gen{info['generation']}", (time.perf_counter_ns() - self._gc_started) / 1e9
            )

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)
        original = Snapshot.from_state.__func__  # type: ignore[attr-defined]

        @functools.wraps(original)
        def timed(cls: type[Snapshot], *args: Any, **kwargs: Any) -> Snapshot:
            started = time.perf_counter()
            try:
                result: Snapshot = original(cls, *args, **kwargs)
                return result
            finally:
                self.add("snapshot.from_state", time.perf_counter() - started)

        Snapshot.from_state = classmethod(timed)  # type: ignore[method-assign,assignment]


class BenchState:
    def __init__(self, pool_size: int, profile_out: Path | None, access_log: bool) -> None:
        self.pool_size = pool_size
        self.profile_out = profile_out
        self.access_log = access_log
        self.pool: asyncpg.Pool | None = None
        self.positions = PositionLog()
        self.profiler: cProfile.Profile | None = None
        self.pauses = Pauses()


def bench_app(state: BenchState) -> FastAPI:
    """The baseline endpoint and the driver's helpers (no lifespan: the dispatcher runs it)."""
    app = FastAPI(title="bench.authorize helpers", openapi_url=None)

    @app.post(BASELINE_PATH)
    async def baseline(request: Request) -> JSONResponse:
        """What a service without the snapshot does: one PostgreSQL round trip per request."""
        body = json.loads(await request.body())
        key = extract_key(body.get("authorization"))
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        assert state.pool is not None
        row = await state.pool.fetchrow(BASELINE_SQL, digest)
        if row is None or row["revoked"]:
            return JSONResponse({"allowed": False, "reason": "token_invalid"}, status_code=401)
        available = row["balance"] - row["held"]
        allowed = row["status"] == "active" and available > 0
        return JSONResponse(
            {
                "allowed": allowed,
                "account_id": row["account_id"],
                "token_id": row["token_id"],
                "role": row["role"],
                "group": row["group_name"],
                "balance": row["balance"],
                "available": available,
            },
            status_code=200 if allowed else 403,
        )

    @app.get(BENCH_PREFIX + "reached")
    async def reached(position: int, timeout: float = 10.0) -> JSONResponse:
        """Long poll: when the snapshot first reached `position` (monotonic ns)."""
        log = state.positions
        try:
            async with asyncio.timeout(timeout), log.changed:
                await log.changed.wait_for(lambda: log.latest >= position)
        except TimeoutError:
            return JSONResponse(
                {"position": position, "reached_ns": None, "latest": log.latest}, status_code=504
            )
        return JSONResponse(
            {"position": position, "reached_ns": log.reached_ns(position), "latest": log.latest}
        )

    @app.get(BENCH_PREFIX + "info")
    async def info() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
        return {
            "pid": os.getpid(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "uvicorn": uvicorn.__version__,
            "loop": f"{type(loop).__module__}.{type(loop).__name__}",
            "http": http,
            "access_log": state.access_log,
            "baseline_pool_size": state.pool_size,
        }

    @app.get(BENCH_PREFIX + "pauses")
    async def pauses() -> dict[str, dict[str, float]]:
        """Cumulative GC and snapshot-rebuild pauses since start (the driver diffs them)."""
        return {name: dict(entry) for name, entry in state.pauses.totals.items()}

    @app.post(BENCH_PREFIX + "profile/start")
    async def profile_start() -> JSONResponse:
        if state.profile_out is None:
            return JSONResponse({"error": "started without --profile-out"}, status_code=409)
        state.profiler = cProfile.Profile()
        state.profiler.enable()
        return JSONResponse({"profiling": True})

    @app.post(BENCH_PREFIX + "profile/stop")
    async def profile_stop() -> JSONResponse:
        profiler, state.profiler = state.profiler, None
        if profiler is None or state.profile_out is None:
            return JSONResponse({"error": "not profiling"}, status_code=409)
        profiler.disable()
        profiler.dump_stats(str(state.profile_out))
        return JSONResponse({"written": str(state.profile_out)})

    return app


class Dispatcher:
    """The ASGI app uvicorn serves: `/raw` to the bare callable, `/baseline` and `/_bench/`
    to the helpers, the rest to the policy app; one lifespan for all of it."""

    def __init__(self, settings: Settings, state: BenchState) -> None:
        self.settings = settings
        self.state = state
        self.policy = create_app(settings)
        self.helpers = bench_app(state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path == RAW_PATH:
                await raw_endpoint(scope, receive, send)
            elif path == BASELINE_PATH or path.startswith(BENCH_PREFIX):
                await self.helpers(scope, receive, send)
            else:
                await self.policy(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.policy(scope, receive, send)

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        async with self.policy.router.lifespan_context(self.policy):
            store: SnapshotStore = self.policy.state.policy.store
            dsn = asyncpg_dsn(self.settings.database_url)
            size = self.state.pool_size
            # A plain asyncpg pool, as such a service would have (not the services' settings).
            pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
            assert pool is not None
            self.state.pool = pool
            watcher = asyncio.create_task(self.state.positions.watch(store))
            try:
                yield
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await self.state.pool.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(self._running())
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        assert message["type"] == "lifespan.shutdown"
        try:
            await stack.aclose()
        except Exception as exc:
            await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.shutdown.complete"})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.authorize.server",
        description="One uvicorn worker: the policy app plus /raw, /baseline and /_bench/.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool-size", type=int, default=10, help="baseline asyncpg pool size")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="turn uvicorn's access log on (`quota policy` runs without it by default)",
    )
    parser.add_argument(
        "--profile-out", type=Path, default=None, help="enable /_bench/profile/*; pstats path"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    state = BenchState(args.pool_size, args.profile_out, access_log=args.access_log)
    state.pauses.install()
    config = uvicorn.Config(
        Dispatcher(settings, state),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=args.access_log,
        lifespan="on",
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
