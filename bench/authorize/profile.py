"""Where an allowed POST /authorize spends its time, in process: no HTTP, no infrastructure.

    .venv/bin/python -m bench.authorize.profile              # 20,000 requests
    .venv/bin/python -m bench.authorize.profile --requests 50000 --accounts 100000

The policy app from `create_app` gets a `Snapshot` built in memory from the same world the
benchmark produces through Kafka (catalog, filler accounts with tokens, the bench accounts),
and is driven by direct ASGI calls (a scope, a `receive` that hands over the body, a `send`
that collects), so the numbers are the application's own, without an HTTP parser or client.
It measures

* µs per request of: the bare ASGI ceiling, an empty FastAPI POST endpoint (the framework
  floor), /authorize allowed and denied, and /authorize allowed through httpx.ASGITransport
  (as a test client would see it);
* a cProfile of N allowed requests, the functions' own time summed by area, and the top rows;
* the steps of the handler one by one (timeit): validation, the decision, the response...;
* the access-log line `quota policy` writes per request when QUOTA_ACCESS_LOG=true (off by
  default; uvicorn through structlog);
* `Snapshot.from_state` at several world sizes: the policy rebuilds the whole snapshot on
  every publish, i.e. on every ledger notification and every heartbeat (1 s).

Writes WORKDIR/authorize-profile.json and WORKDIR/authorize-profile.pstats.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import hmac
import io
import logging
import os
import pstats
import sys
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bench.authorize import report
from bench.authorize.server import raw_endpoint
from bench.authorize.world import (
    ALLOWED_ACCOUNT,
    ALLOWED_BALANCE,
    ALLOWED_KEY,
    FILLER_BALANCE,
    MODEL,
    POOR_ACCOUNT,
    POOR_KEY,
    authorize_body,
    encode,
    filler_account,
    filler_key,
)
from services.ledger.fold import Account, Channel, ModelSpec, RoutePolicy, State, Token
from services.logs import configure_logging
from services.policy import app as policy_module
from services.policy.app import Policy, create_app
from services.policy.decision import AuthorizeRequest, Snapshot, decide
from services.policy.ratelimit import InProcessRateLimiter
from services.policy.reservations import Reservations
from services.policy.snapshot_store import SnapshotStore
from services.settings import Settings

SERVICE_TOKEN = "bench-service-token-0123456789"

#: Areas for the self-time summary: the first matching path fragment names the area.
AREAS: tuple[tuple[str, str], ...] = (
    ("services/policy/decision.py", "policy: decide() and helpers"),
    ("services/policy/app.py", "policy: endpoint, _gate, authorize_request"),
    ("services/policy/ratelimit.py", "policy: rate limiter"),
    ("/fastapi/", "fastapi (routing, dependencies, params)"),
    ("/starlette/", "starlette (middleware, request, response)"),
    ("/pydantic", "pydantic (validation)"),
    ("/prometheus_client/", "prometheus_client (counter)"),
    ("/json/", "json (stdlib)"),
    ("/asyncio/", "asyncio"),
    ("/anyio/", "anyio"),
    ("/typing.py", "typing"),
    ("/enum.py", "enum"),
    ("bench/authorize/", "bench driver (ASGI calls)"),
)


# --- the world, in memory ----------------------------------------------------------------------


def world_state(accounts: int) -> State:
    """The benchmark's world as the ledger folds it (see bench.authorize.world)."""
    state = State()
    state.models[MODEL] = ModelSpec(MODEL, "chat", {}, 1)
    for channel in (1, 2):
        state.channels[channel] = Channel(channel, (MODEL,), ("default",), True, None, 2)
    state.routes["/v1/admin/*"] = RoutePolicy("/v1/admin/*", "admin", 4)
    position = 5

    def add(account: str, balance: int, token_id: str, key: str) -> None:
        nonlocal position
        digest = hashlib.sha256(key.encode()).hexdigest()
        state.accounts[account] = Account(account, balance=balance, position=position)
        state.tokens[token_id] = Token(
            token_id, account, digest, key[-6:], None, (), (), False, position + 1
        )
        state.token_keys[digest] = token_id
        position += 2

    for index in range(accounts):
        add(filler_account(index), FILLER_BALANCE, f"tok-{index:07d}", filler_key(index))
    add(ALLOWED_ACCOUNT, ALLOWED_BALANCE, "tok_bench_allowed", ALLOWED_KEY)
    add(POOR_ACCOUNT, 0, "tok_bench_poor", POOR_KEY)
    return state


def policy_app(state: State) -> FastAPI:
    """`create_app` with its lifespan's work done by hand: snapshot in, limiter in process.

    The real lifespan needs PostgreSQL (a pool for `Reservations`, the `SnapshotStore`'s
    LISTEN), which this in-process profile does without; so `Policy(settings, store, limiter,
    reservations)` is built as the lifespan builds it (as of this writing). If `Policy`
    changes, this is the place to follow it."""
    settings = Settings(
        database_url="postgresql://unused@127.0.0.1:1/unused",
        service_token=SERVICE_TOKEN,
        # Nothing heartbeats here: keep the (real) staleness check from ever tripping.
        max_staleness_seconds=1e9,
    )
    app = create_app(settings)
    store = SnapshotStore(settings.database_url)
    store.snapshot = Snapshot.from_state(state, 2 * len(state.accounts) + 5)
    # Check-only requests (no estimated_cost) never hold, so the reservations need no pool.
    reservations = Reservations(None, settings.reservation_ttl_seconds)
    app.state.policy = Policy(settings, store, InProcessRateLimiter(), reservations)
    return app


def floor_app() -> FastAPI:
    """The framework floor: an empty FastAPI POST endpoint answering a constant dict."""
    app = FastAPI()

    @app.post("/authorize")
    async def authorize() -> JSONResponse:
        return JSONResponse({"allowed": True})

    return app


# --- what-if variants (suggestions, measured; services/ is not changed) ----------------------


def variant_no_header_param(policy: Policy) -> FastAPI:
    """The same handler, reading X-Quota-Service-Token from `request.headers` instead of a
    `Header()` parameter (no FastAPI dependency solving for it), registered as the only route."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.policy = policy

    @app.post("/authorize")
    async def authorize(request: Request) -> Response:
        policy: Policy = request.app.state.policy
        gate = policy_module._gate(policy, request.headers.get("x-quota-service-token"))
        if isinstance(gate, JSONResponse):
            return gate
        body = await request.body()
        if len(body) > policy.settings.max_request_bytes:
            return policy_module._error(
                413, "request_too_large", "Request body too large.", gate.position,
                "invalid_request_error",
            )  # fmt: skip
        try:
            parsed = AuthorizeRequest.model_validate_json(body)
        except ValidationError as exc:
            return policy_module._invalid(exc, gate.position)
        decision = await policy_module.authorize_request(policy, parsed, gate)
        return JSONResponse(decision.body, status_code=decision.status, headers=decision.headers)

    return app


def variant_bare_asgi(policy: Policy) -> ASGIApp:
    """/authorize as a bare ASGI callable around the same functions (`_gate`, validation,
    `authorize_request`, `JSONResponse`): what dispatching it ahead of FastAPI would cost."""
    token_header = b"x-quota-service-token"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        token: str | None = None
        for name, value in scope["headers"]:
            if name == token_header:
                token = value.decode("latin-1")
        gate = policy_module._gate(policy, token)
        if isinstance(gate, JSONResponse):
            await gate(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        response: JSONResponse
        if len(body) > policy.settings.max_request_bytes:
            response = policy_module._error(
                413, "request_too_large", "Request body too large.", gate.position,
                "invalid_request_error",
            )  # fmt: skip
        else:
            try:
                parsed = AuthorizeRequest.model_validate_json(body)
            except ValidationError as exc:
                response = policy_module._invalid(exc, gate.position)
            else:
                decision = await policy_module.authorize_request(policy, parsed, gate)
                response = JSONResponse(
                    decision.body, status_code=decision.status, headers=decision.headers
                )
        await response(scope, receive, send)

    return app


# --- direct ASGI -------------------------------------------------------------------------------


class Caller:
    """Calls an ASGI app as uvicorn would, minus the socket and the HTTP parser."""

    def __init__(self, app: ASGIApp, path: str, body: bytes) -> None:
        self.app = app
        self.body = body
        self.status = 0
        self.last_body = b""
        headers = [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"x-quota-service-token", SERVICE_TOKEN.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
            "scheme": "http",
            "method": "POST",
            "root_path": "",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
            "state": {},
        }

    async def receive(self) -> Message:
        return {"type": "http.request", "body": self.body, "more_body": False}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.last_body = message.get("body", b"")

    async def once(self) -> int:
        await self.app(dict(self.scope), self.receive, self.send)
        return self.status

    async def many(self, count: int) -> None:
        app, scope, receive, send = self.app, self.scope, self.receive, self.send
        for _ in range(count):
            await app(dict(scope), receive, send)


async def _best_us(run: Callable[[int], Awaitable[None]], count: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        await run(count)
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


async def _interleaved(callers: dict[str, Caller], count: int, rounds: int = 7) -> dict[str, float]:
    """µs per request of each caller: `rounds` rounds of `count` calls each, the callers taking
    turns within a round, best round kept (other load on the machine only ever adds time)."""
    best = dict.fromkeys(callers, float("inf"))
    for _ in range(rounds):
        for name, caller in callers.items():
            started = time.perf_counter()
            await caller.many(count)
            best[name] = min(best[name], (time.perf_counter() - started) / count * 1e6)
    return best


def calls_per_request(caller: Caller, count: int = 1000) -> float:
    """Python function calls per request (cProfile's count), a load-independent cost measure."""
    profiler = cProfile.Profile()

    async def run() -> None:
        profiler.enable()
        await caller.many(count)
        profiler.disable()

    asyncio.run(run())
    total: int = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
    return total / count


async def _httpx_us(app: ASGIApp, body: bytes, count: int) -> float:
    transport = httpx.ASGITransport(app=app)
    headers = {"content-type": "application/json", "x-quota-service-token": SERVICE_TOKEN}
    async with httpx.AsyncClient(transport=transport, base_url="http://policy") as client:

        async def run(n: int) -> None:
            for _ in range(n):
                await client.post("/authorize", content=body, headers=headers)

        return await _best_us(run, count, repeat=2)


# --- profile -----------------------------------------------------------------------------------


def _area(filename: str) -> str:
    path = filename.replace(os.sep, "/")
    for fragment, area in AREAS:
        if fragment in path:
            return area
    if filename.startswith("<built-in") or filename == "~":
        return "C builtins (dict, str, hashlib, json encode...)"
    return "other python"


def by_area(stats: pstats.Stats) -> list[tuple[str, float]]:
    totals: dict[str, float] = {}
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        area = _area(filename)
        totals[area] = totals.get(area, 0.0) + tottime
    return sorted(totals.items(), key=lambda item: -item[1])


async def profile_allowed(caller: Caller, count: int, out: Path) -> tuple[pstats.Stats, float]:
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    await caller.many(count)
    profiler.disable()
    seconds = time.perf_counter() - started
    profiler.dump_stats(str(out))
    return pstats.Stats(profiler), seconds


# --- steps ---------------------------------------------------------------------------------------


def step_costs(app: FastAPI, body: bytes) -> list[tuple[str, float, str]]:
    """µs per call of each step the allowed handler takes (best of 5 timeit runs)."""
    policy: Policy = app.state.policy
    snapshot = policy.store.snapshot
    assert snapshot is not None
    request = AuthorizeRequest.model_validate_json(body)
    now = datetime.now(UTC)
    decision = decide(request, snapshot, now)
    counter = policy_module.DECISIONS
    token = SERVICE_TOKEN.encode()
    gate = policy_module._gate

    steps: list[tuple[str, Callable[[], object], str]] = [
        ("_gate (service token, staleness)", lambda: gate(policy, SERVICE_TOKEN), "app.py"),
        ("hmac.compare_digest of the token", lambda: hmac.compare_digest(token, token), ""),
        (
            "AuthorizeRequest.model_validate_json",
            lambda: AuthorizeRequest.model_validate_json(body),
            "pydantic",
        ),
        ("datetime.now(UTC)", lambda: datetime.now(UTC), ""),
        ("decide() (checks 1-13, sha256 of key)", lambda: decide(request, snapshot, now), ""),
        (
            "  of which sha256 of the key",
            lambda: hashlib.sha256(ALLOWED_KEY.encode()).hexdigest(),
            "",
        ),
        (
            "DECISIONS.labels(reason=...).inc()",
            lambda: counter.labels(reason="allowed").inc(),
            "prometheus",
        ),
        (
            "JSONResponse(decision.body, ...)",
            lambda: JSONResponse(decision.body, status_code=200, headers=decision.headers),
            "json.dumps + headers",
        ),
    ]
    results = []
    for name, fn, note in steps:
        number = 20_000
        best = min(timeit.repeat(fn, number=number, repeat=5))
        results.append((name, best / number * 1e6, note))
    return results


def access_log_cost(count: int = 20_000) -> float:
    """µs per uvicorn access-log line, configured as `quota policy` configures it (JSON via
    structlog's ProcessorFormatter with key redaction), written to /dev/null."""
    configure_logging("INFO", True)
    root = logging.getLogger()
    devnull = open(os.devnull, "w")  # noqa: SIM115
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(devnull)
    logger = logging.getLogger("uvicorn.access")
    # The call uvicorn's httptools protocol makes per response.
    args = ("127.0.0.1:50000", "POST", "/authorize", "1.1", 200)
    try:
        best = min(
            timeit.repeat(
                lambda: logger.info('%s - "%s %s HTTP/%s" %d', *args), number=count, repeat=3
            )
        )
    finally:
        root.handlers[:] = []
        devnull.close()
    return best / count * 1e6


def snapshot_costs(sizes: Sequence[int]) -> list[tuple[int, float]]:
    """ms per `Snapshot.from_state` (run on every publish) for worlds of `sizes` accounts."""
    out = []
    for size in sizes:
        state = world_state(size)
        runs = 3 if size >= 50_000 else 10

        def rebuild(world: State = state) -> Snapshot:
            return Snapshot.from_state(world, 1)

        best = min(timeit.repeat(rebuild, number=1, repeat=runs))
        out.append((size, best * 1000))
    return out


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.authorize.profile",
        description="In-process cost of an allowed POST /authorize, profiled and broken down.",
    )
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement")
    parser.add_argument("--accounts", type=int, default=10_000, help="filler accounts")
    parser.add_argument("--top", type=int, default=25, help="profile rows shown")
    parser.add_argument(
        "--snapshot-sizes", default="1000,10000,100000", help="accounts for from_state costs"
    )
    parser.add_argument("--workdir", type=Path, default=Path(".work/bench"))
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    state = world_state(args.accounts)
    app = policy_app(state)
    allowed_body = encode(authorize_body(ALLOWED_KEY))
    denied_body = encode(authorize_body(POOR_KEY))
    allowed = Caller(app, "/authorize", allowed_body)
    denied = Caller(app, "/authorize", denied_body)
    raw = Caller(raw_endpoint, "/raw", allowed_body)
    floor = Caller(floor_app(), "/authorize", allowed_body)
    for caller, status in ((allowed, 200), (denied, 403), (raw, 200), (floor, 200)):
        got = await caller.once()
        if got != status:
            raise RuntimeError(f"{caller.scope['path']} answered {got}, expected {status}")
    policy: Policy = app.state.policy
    no_header = Caller(variant_no_header_param(policy), "/authorize", allowed_body)
    bare = Caller(variant_bare_asgi(policy), "/authorize", allowed_body)
    await allowed.once()
    for variant in (no_header, bare):
        if await variant.once() != 200 or variant.last_body != allowed.last_body:
            raise RuntimeError(f"a what-if variant answers differently: {variant.last_body!r}")
    n = args.requests
    callers = {
        "bare ASGI (ceiling app)": raw,
        "empty FastAPI POST endpoint (floor)": floor,
        "/authorize allowed": allowed,
        "/authorize denied (no balance)": denied,
        "what-if: no Header() param, only route": no_header,
        "what-if: bare ASGI /authorize, same functions": bare,
    }
    per_request = await _interleaved(callers, max(1, n // 4))
    per_request["/authorize allowed via httpx.ASGITransport"] = await _httpx_us(
        app, allowed_body, max(1000, n // 4)
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    pstats_path = args.workdir / "authorize-profile.pstats"
    stats, seconds = await profile_allowed(allowed, n, pstats_path)
    return {
        "per_request_us": per_request,
        "callers": callers,
        "profile": {"requests": n, "seconds": seconds, "stats": stats, "path": pstats_path},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(_run(args))
    calls = {name: calls_per_request(caller) for name, caller in result.pop("callers").items()}
    stats: pstats.Stats = result["profile"]["stats"]
    n = result["profile"]["requests"]
    total = sum(t for _, t in by_area(stats))
    app = policy_app(world_state(args.accounts))
    steps = step_costs(app, encode(authorize_body(ALLOWED_KEY)))
    access = access_log_cost()
    sizes = [int(s) for s in args.snapshot_sizes.split(",") if s]
    snapshots = snapshot_costs(sizes)

    print(
        report.grid(
            ["in process, direct ASGI calls", "µs/request", "requests/s (1 core)", "py calls/req"],
            [
                [k, f"{v:.1f}", f"{1e6 / v:,.0f}", f"{calls[k]:.0f}" if k in calls else ""]
                for k, v in result["per_request_us"].items()
            ],
            title=f"Per-request cost (best of 7 interleaved rounds of "
            f"{max(1, args.requests // 4):,} requests; world {args.accounts:,} accounts)",
        )
    )
    print()
    print(
        report.grid(
            ["area (self time)", "µs/request", "share"],
            [
                [area, f"{t / n * 1e6:.1f}", f"{t / total:.0%}"]
                for area, t in by_area(stats)
                if t / total >= 0.005
            ],
            title=f"cProfile of {n:,} allowed requests: self time by area "
            f"(under the profiler: {result['profile']['seconds'] / n * 1e6:.0f} µs/request)",
        )
    )
    print()
    print(
        report.grid(
            ["step of the allowed handler", "µs/call", "note"],
            [[name, f"{us:.2f}", note] for name, us, note in steps]
            + [["uvicorn access-log line (structlog JSON)", f"{access:.2f}", "per request"]],
            title="Steps one by one (timeit, best of 5)",
        )
    )
    print()
    print(
        report.grid(
            ["accounts (+ a token each)", "Snapshot.from_state ms", "at 1 publish/s"],
            [[f"{size:,}", f"{ms:.2f}", f"{ms / 10:.2f}% of a core"] for size, ms in snapshots],
            title="Snapshot rebuild per publish (every ledger notification and heartbeat)",
        )
    )
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.strip_dirs().sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    print()
    print(out.getvalue())
    report.write_json(
        args.workdir / "authorize-profile.json",
        {
            "benchmark": "bench.authorize.profile",
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": report.machine(),
            "accounts": args.accounts,
            "requests": n,
            "per_request_us": result["per_request_us"],
            "python_calls_per_request": calls,
            "self_time_by_area_us": {a: t / n * 1e6 for a, t in by_area(stats)},
            "steps_us": {name: us for name, us, _ in steps},
            "access_log_line_us": access,
            "snapshot_from_state_ms": {str(size): ms for size, ms in snapshots},
            "pstats": str(result["profile"]["path"]),
        },
    )
    print(f"wrote {args.workdir / 'authorize-profile.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
