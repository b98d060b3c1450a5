"""The benchmark's server, configured like `quota policy` (`QUOTA_*` variables): ONE uvicorn
worker serving `/raw` (a bare ASGI ceiling), `/baseline` (FastAPI + PostgreSQL per request),
`/_bench/reached` (the freshness scenario) and, for every other path, the real policy app.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import asyncpg
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from services.logs import configure_logging
from services.policy.app import create_app
from services.policy.inputs import extract_key
from services.policy.snapshot_store import SnapshotStore
from services.settings import Settings, asyncpg_dsn

#: The ceiling's answer: constant, about the size and shape of an allowed decision.
RAW_BODY: Final = json.dumps(
    {"allowed": True, "account_id": "acct_bench_allowed", "token_id": "tok_bench_allowed",
     "role": "user", "group": "default", "balance": 10**15, "available": 10**15,
     "channels": [1, 2], "reservation": None, "position": 20_000},
    separators=(",", ":"),
).encode()  # fmt: skip
RAW_HEADERS: Final = [(b"content-type", b"application/json"),
                      (b"content-length", str(len(RAW_BODY)).encode())]  # fmt: skip
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


def helpers(dispatcher: Dispatcher) -> FastAPI:
    """The baseline endpoint and the freshness long poll; its lifespan runs the policy's."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        policy, size = dispatcher.policy, dispatcher.pool_size
        async with (  # and a plain asyncpg pool, as such a service would have
            policy.router.lifespan_context(policy),
            asyncpg.create_pool(asyncpg_dsn(dispatcher.settings.database_url), min_size=size,
                                max_size=size) as pool,
        ):  # fmt: skip
            dispatcher.pools.append(pool)
            yield
            dispatcher.pools.remove(pool)

    app = FastAPI(title="bench.authorize helpers", openapi_url=None, lifespan=lifespan)

    @app.post("/baseline")
    async def baseline(request: Request) -> JSONResponse:
        """What a service without the snapshot does: one PostgreSQL round trip per request."""
        body = json.loads(await request.body())
        key = extract_key(body.get("authorization"))
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        row = await dispatcher.pools[0].fetchrow(BASELINE_SQL, digest)
        if row is None or row["revoked"]:
            return JSONResponse({"allowed": False, "reason": "token_invalid"}, status_code=401)
        available = row["balance"] - row["held"]
        allowed = row["status"] == "active" and available > 0
        return JSONResponse(
            {"allowed": allowed, "account_id": row["account_id"], "token_id": row["token_id"],
             "role": row["role"], "group": row["group_name"], "balance": row["balance"],
             "available": available},
            status_code=200 if allowed else 403,
        )  # fmt: skip

    @app.get("/_bench/reached")
    async def reached(position: int, timeout: float = 10.0) -> JSONResponse:
        """Long poll: when (monotonic ns, one clock for every process on Linux) the snapshot
        reached `position`. The driver asks as soon as the broker acknowledged the event, so
        the answer waits for the ledger's commit (had it come first, this time would be late)."""
        store: SnapshotStore = dispatcher.policy.state.policy.store
        try:
            async with asyncio.timeout(timeout):
                await store.wait_for_position(position)
        except TimeoutError:
            return JSONResponse({"reached_ns": None, "at": store.position}, status_code=504)
        return JSONResponse({"reached_ns": time.monotonic_ns()})

    return app


class Dispatcher:
    """`/raw` to the bare callable, `/baseline`, `/_bench/` and the lifespan to the helpers,
    the rest to the policy app."""

    def __init__(self, settings: Settings, pool_size: int) -> None:
        self.settings = settings
        self.pool_size = pool_size
        self.policy = create_app(settings)
        self.pools: list[asyncpg.Pool] = []
        self.helpers = helpers(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if path == "/raw":
            await raw_endpoint(scope, receive, send)
        elif scope["type"] == "lifespan" or path == "/baseline" or path.startswith("/_bench/"):
            await self.helpers(scope, receive, send)
        else:
            await self.policy(scope, receive, send)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.authorize.server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool-size", type=int, default=10, help="baseline asyncpg pool size")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    app: Any = Dispatcher(settings, args.pool_size)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None,
                access_log=settings.access_log, lifespan="on")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
