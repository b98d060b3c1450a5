"""`python -m bench.authorize`: options, the run in order, the report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import pstats
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import structlog
from fastapi import FastAPI

from bench.authorize import report, wrk
from bench.authorize.infra import Infra, infrastructure, step
from bench.authorize.ledger import (
    freshness_report,
    measure_freshness,
    produce,
    running_ledger,
    wait_for_position,
)
from bench.authorize.world import (
    ALLOWED_KEY,
    HOLD_ACCOUNTS,
    HOLD_BALANCE,
    HOLD_COST,
    POOR_KEY,
    Expectation,
    authorize_body,
    encode,
    hold_account,
    hold_key,
    reserve_body,
    world_events,
)
from bench.infra import add_infra_arguments
from services.infra.broker import free_port
from services.ledger import repository as repo
from services.ledger.audit import verify
from services.settings import Settings, asyncpg_dsn

ROOT = Path(__file__).resolve().parents[2]
SERVICE_TOKEN = "bench-service-token-0123456789"
ADMIN_TOKEN = "bench-admin-token"
#: The policy's reservation TTL in the bench server: longer than any run, so no hold of the
#: reservation scenario expires before the end-of-run checks count them.
RESERVATION_TTL_SECONDS = 3_600
_DECISIONS = re.compile(r'^quota_policy_decisions_total\{reason="([^"]+)"\}\s+([0-9.e+]+)$', re.M)
#: The group commit of holds: `<histogram>_sum` and `_count` of batch sizes and commit times.
_HOLDS = re.compile(
    r"^quota_policy_hold_(batch_size|commit_seconds)_(sum|count)\s+([0-9.e+-]+)$", re.M
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.authorize",
        description="POST /authorize throughput, latency and freshness against its yardsticks.",
    )
    parser.add_argument("--duration", type=int, default=10, help="whole seconds per wrk scenario")
    parser.add_argument(
        "--warmup", type=int, default=2, help="unmeasured wrk seconds before each (0: none)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--accounts", type=int, default=10_000, help="filler accounts (each with a token)"
    )
    parser.add_argument(
        "--fresh-events", type=int, default=1_000, help="events of the freshness scenario"
    )
    parser.add_argument("--pool-size", type=int, default=10, help="baseline asyncpg pool size")
    parser.add_argument(
        "--fetch-max-wait-ms",
        type=int,
        default=None,
        help="EXPERIMENT: override the ledger's Kafka fetch_max_wait_ms (default: as shipped, "
        "aiokafka's 500 ms; Tansu holds every fetch that long)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="serve with uvicorn's access log (off by default, like `quota policy`: "
        "Settings.access_log, QUOTA_ACCESS_LOG)",
    )
    parser.add_argument(
        "--no-single",
        action="store_true",
        help="skip the informational 1-connection run of the allowed decision",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios to run (e.g. baseline,reserve); targets whose "
        "scenarios did not run are left out",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more allowed run with cProfile on in the server; prints the top functions",
    )
    parser.add_argument("--profile-top", type=int, default=25)
    add_infra_arguments(parser, result="authorize.json")
    parser.add_argument(
        "--fail-on-miss", action="store_true", help="exit 2 when a target is missed"
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be at least 1 and --warmup at least 0 (whole seconds)")
    for name in ("connections", "threads", "fresh_events", "pool_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads > args.connections:
        parser.error("--threads may not exceed --connections")
    return args


# --- scenarios ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    label: str
    path: str
    body: bytes
    expect: Expectation
    connections: int
    threads: int
    informational: bool = False
    #: Given: wrk sends one of these per request, round-robin (`body` is the precheck's).
    bodies: tuple[bytes, ...] = ()
    #: The warm-up's bodies (default: the scenario's own).
    warmup_bodies: tuple[bytes, ...] = ()
    #: Every allowed answer holds quota (estimated_cost): checked after the run.
    holds: bool = False


def hold_bodies(*, warmup: bool = False) -> tuple[bytes, ...]:
    """The reservation scenario's bodies, one per hold account (warm-up: accounts of its own)."""
    return tuple(
        encode(reserve_body(hold_key(index, warmup=warmup))) for index in range(HOLD_ACCOUNTS)
    )


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    allowed = encode(authorize_body(ALLOWED_KEY))
    denied = encode(authorize_body(POOR_KEY))
    c, t = args.connections, args.threads
    holds = hold_bodies()
    runs = [
        Scenario("ceiling", "ceiling: bare ASGI, constant JSON", "/raw", allowed,
                 Expectation(200, None), c, t),
        Scenario("allowed", "/authorize allowed (snapshot hit)", "/authorize", allowed,
                 Expectation(200, "allowed"), c, t),
        Scenario("denied", "/authorize denied (no balance)", "/authorize", denied,
                 Expectation(403, "insufficient_user_quota"), c, t),
        Scenario("baseline", "baseline: FastAPI + PostgreSQL", "/baseline", allowed,
                 Expectation(200, None), c, t),
        Scenario("reserve", f"/authorize + hold ({HOLD_ACCOUNTS} accts, group commit)",
                 "/authorize", holds[0], Expectation(200, "allowed"), c, t, bodies=holds,
                 warmup_bodies=hold_bodies(warmup=True), holds=True),
    ]  # fmt: skip
    if not args.no_single:
        runs.append(
            Scenario("allowed_1conn", "/authorize allowed, 1 connection (info)", "/authorize",
                     allowed, Expectation(200, "allowed"), 1, 1, informational=True)
        )  # fmt: skip
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        runs = [run for run in runs if run.name in wanted]
    return runs


HEADERS = {"Content-Type": "application/json", "X-Quota-Service-Token": SERVICE_TOKEN}


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    detail: str


async def _decisions(client: httpx.AsyncClient) -> dict[str, float]:
    """Decisions by reason, plus `hold:<histogram>_<sum|count>` of the hold group commit."""
    text = (await client.get("/metrics")).text
    found = {m.group(1): float(m.group(2)) for m in _DECISIONS.finditer(text)}
    for m in _HOLDS.finditer(text):
        found[f"hold:{m.group(1)}_{m.group(2)}"] = float(m.group(3))
    return found


def _group_commit(delta: dict[str, float]) -> dict[str, float] | None:
    """Mean holds per commit and mean commit time over a run, from the metrics' deltas."""
    commits = delta.pop("hold:batch_size_count", 0.0)
    holds = delta.pop("hold:batch_size_sum", 0.0)
    seconds = delta.pop("hold:commit_seconds_sum", 0.0)
    delta.pop("hold:commit_seconds_count", None)
    if not commits:
        return None
    return {
        "commits": commits,
        "holds_per_commit": round(holds / commits, 2),
        "commit_ms_mean": round(seconds / commits * 1000, 3),
        "commits_per_second_busy": round(commits / seconds, 1) if seconds else 0.0,
    }


def _pause_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Pauses during the run: counts and total ms diffed; max_ms is since start if unchanged."""
    out = {}
    for name, entry in after.items():
        prior = before.get(name, {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
        count = entry["count"] - prior["count"]
        if count:
            out[name] = {
                "count": count,
                "total_ms": round(entry["total_ms"] - prior["total_ms"], 3),
                "max_ms_since_start": round(entry["max_ms"], 3),
            }
    return out


async def _precheck(client: httpx.AsyncClient, scenario: Scenario) -> Check:
    answer = await client.post(scenario.path, content=scenario.body, headers=HEADERS)
    ok = answer.status_code == scenario.expect.status
    detail = f"HTTP {answer.status_code}: {answer.text[:300]}"
    if ok and scenario.expect.reason not in (None, "allowed"):
        ok = answer.json().get("error", {}).get("reason") == scenario.expect.reason
    elif ok and scenario.path != "/raw":
        ok = answer.json().get("allowed") is True
    if ok and scenario.holds:
        held = answer.json().get("reservation") or {}
        ok = held.get("amount") == HOLD_COST and str(held.get("id", "")).startswith("rsv_")
    return Check(f"{scenario.name}: one request answers as expected", ok, detail)


async def run_scenario(
    args: argparse.Namespace,
    binary: str,
    client: httpx.AsyncClient,
    server: ServerProcess,
    scenario: Scenario,
    scripts: Path,
) -> tuple[dict[str, Any], list[Check]]:
    checks = [await _precheck(client, scenario)]
    script = wrk.write_script(
        scripts / f"authorize-{scenario.name}.lua",
        "POST",
        scenario.body,
        HEADERS,
        bodies=scenario.bodies,
    )
    warmup_script = script
    if scenario.warmup_bodies:
        warmup_script = wrk.write_script(
            scripts / f"authorize-{scenario.name}-warmup.lua",
            "POST",
            scenario.warmup_bodies[0],
            HEADERS,
            bodies=scenario.warmup_bodies,
        )
    url = server.url + scenario.path
    options: dict[str, Any] = {"connections": scenario.connections, "threads": scenario.threads}
    if args.warmup > 0:
        await wrk.run(binary, url, warmup_script, seconds=args.warmup, **options)
    before = await _decisions(client)
    pauses_before = (await client.get("/_bench/pauses")).json()
    cpu_before, started = report.cpu_sample(server.pid), time.perf_counter()
    result = await wrk.run(binary, url, script, seconds=args.duration, **options)
    cpu_after, elapsed = report.cpu_sample(server.pid), time.perf_counter() - started
    pauses = _pause_delta(pauses_before, (await client.get("/_bench/pauses")).json())
    after = await _decisions(client)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    delta = {k: v for k, v in delta.items() if v}
    group_commit = _group_commit(delta)

    expected_non_2xx = result.requests if scenario.expect.status >= 400 else 0
    checks.append(
        Check(
            f"{scenario.name}: every response has status {scenario.expect.status}",
            result.non_2xx_3xx == expected_non_2xx,
            f"{result.non_2xx_3xx} non-2xx/3xx of {result.requests}",
        )
    )
    errors = sum(result.socket_errors.values())
    checks.append(
        Check(f"{scenario.name}: no socket errors", errors == 0, str(result.socket_errors))
    )
    if scenario.expect.reason is not None:
        counted = delta.get(scenario.expect.reason, 0.0)
        others = {k: v for k, v in delta.items() if k != scenario.expect.reason}
        checks.append(
            Check(
                f"{scenario.name}: the policy counted each as {scenario.expect.reason!r}",
                counted >= result.requests and not others,
                f"{counted:.0f} counted >= {result.requests} answered; others {others}",
            )
        )
    cpu = report.cpu_usage(cpu_before, cpu_after, elapsed)
    rps = result.requests_per_second
    row = {
        "name": scenario.name,
        "label": scenario.label,
        "path": scenario.path,
        "informational": scenario.informational,
        "connections": scenario.connections,
        "threads": scenario.threads,
        "expected_status": scenario.expect.status,
        "bodies": len(scenario.bodies) or 1,
        **result.as_dict(),
        "responses_2xx": result.requests - result.non_2xx_3xx,
        "decisions_counted": delta,
        "group_commit": group_commit,
        "server_pauses": pauses,
        "cpu": cpu,
        "server_cpu_us_per_request": round(cpu["server_cpu_seconds"] / result.requests * 1e6, 1)
        if result.requests
        else None,
        # Little's law: with N connections each waiting for its answer, mean latency = N / rate.
        "littles_law_mean_ms": round(scenario.connections / rps * 1000, 3) if rps else None,
    }
    step(
        f"{scenario.name}: {rps:,.0f} req/s, p50 {result.latency_ms['p50']:.2f} ms, "
        f"p99 {result.latency_ms['p99']:.2f} ms, server {cpu['server_cores']:.2f} cores"
        + (f", group commit {group_commit}" if group_commit else "")
    )
    return row, checks


# --- no overdraft ------------------------------------------------------------------------------

OVERDRAWN_SQL = "SELECT account_id, balance, held FROM accounts WHERE held > balance OR held < 0"
#: Per account: accounts.held against the amounts of its reservations in state held.
HELD_MISMATCH_SQL = """
SELECT coalesce(a.account_id, r.account_id) AS account_id, a.held, coalesce(r.amount, 0) AS sum
FROM accounts a
FULL JOIN (SELECT account_id, sum(amount)::bigint AS amount FROM reservations
           WHERE state = 'held'
           GROUP BY account_id) r ON r.account_id = a.account_id
WHERE a.held IS DISTINCT FROM coalesce(r.amount, 0)
"""
STATES_SQL = """
SELECT state, count(*) AS n, coalesce(sum(amount), 0)::bigint AS amount FROM reservations
WHERE account_id = ANY($1::text[]) GROUP BY state
"""


async def no_overdraft(
    database_url: str, ledger: FastAPI, reserve: dict[str, Any] | None
) -> tuple[dict[str, Any], list[Check]]:
    """After the run: no account holds more than its balance, `accounts.held` is the sum of
    its held reservations, the measured accounts hold one reservation per 200 answer (+ the
    precheck's), and `verify` (re-fold of the whole history) agrees with the projections."""
    measured = [hold_account(i) for i in range(HOLD_ACCOUNTS)]
    warm = [hold_account(i, warmup=True) for i in range(HOLD_ACCOUNTS)]
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    await repo.init_connection(conn)  # the pool's codecs (jsonb): verify compares decoded rows
    try:
        overdrawn = [dict(r) for r in await conn.fetch(OVERDRAWN_SQL)]
        mismatched = [dict(r) for r in await conn.fetch(HELD_MISMATCH_SQL)]
        states = {r["state"]: dict(r) for r in await conn.fetch(STATES_SQL, measured)}
        warm_states = {r["state"]: dict(r) for r in await conn.fetch(STATES_SQL, warm)}
        accounts_checked = await conn.fetchval("SELECT count(*) FROM accounts")
        started = time.perf_counter()
        audit = await verify(conn)
        verify_seconds = time.perf_counter() - started
    finally:
        await conn.close()
    transport = httpx.ASGITransport(app=ledger)
    views: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://ledger",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as client:
        for account in measured + warm:
            answer = await client.get(f"/accounts/{account}")
            answer.raise_for_status()
            views[account] = answer.json()
    held = states.get("held", {"n": 0, "amount": 0})
    ended = {k: v["n"] for k, v in states.items() if k != "held"}
    negative = {k: v["available"] for k, v in views.items() if v["available"] < 0}
    api_held = sum(v["held"] for k, v in views.items() if k in measured)
    checks = [
        Check(
            "no overdraft: held <= balance for every account",
            not overdrawn,
            f"{len(overdrawn)} of {accounts_checked} accounts overdrawn {overdrawn[:5]}",
        ),
        Check(
            "no overdraft: GET /accounts/{id} (ledger) available >= 0 on every hold account",
            not negative and api_held == held["amount"],
            f"negative {negative}; held {api_held:,} by the ledger API = "
            f"{held['amount']:,} in held reservations",
        ),
        Check(
            "no overdraft: accounts.held = sum of held reservations, per account",
            not mismatched,
            f"{len(mismatched)} accounts differ {mismatched[:5]}",
        ),
        Check(
            "no overdraft: no reservation of the measured accounts ended (TTL "
            f"{RESERVATION_TTL_SECONDS} s)",
            not ended,
            f"ended: {ended or 'none'}",
        ),
        Check(
            "no overdraft: ledger verify (re-fold of the history) ok",
            audit.ok,
            f"{audit.events_checked:,} events re-folded in {verify_seconds:.1f}s; "
            f"differences {audit.differences[:3]}",
        ),
    ]
    detail: dict[str, Any] = {
        "accounts_checked": accounts_checked,
        "overdrawn": overdrawn,
        "held_mismatches": mismatched,
        "measured_accounts": {"states": states, "held_count": held["n"]},
        "warmup_accounts": {"states": warm_states},
        "ledger_api": views,
        "verify": {
            "ok": audit.ok,
            "events_checked": audit.events_checked,
            "seconds": round(verify_seconds, 3),
            "differences": [str(d) for d in audit.differences[:20]],
        },
    }
    if reserve is not None:
        answered = reserve["responses_2xx"]
        # Precheck: 1 hold. wrk counts only answers that arrived before it stopped; requests
        # still in flight then (at most one per connection) were held by the server, unseen.
        extra = held["n"] - answered - 1
        decided = reserve["decisions_counted"].get("allowed", 0.0)
        checks.append(
            Check(
                "no overdraft: held reservations = wrk's 200 answers + precheck "
                f"(+ <= {reserve['connections']} cut off in flight)",
                0 <= extra <= reserve["connections"],
                f"{held['n']:,} held = {answered:,} answered + 1 + {extra} in flight; "
                f"the policy counted {decided:,.0f} allowed in the run",
            )
        )
        detail["held_minus_answered_minus_precheck"] = extra
    return detail, checks


# --- the server process ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerProcess:
    url: str
    pid: int
    log: Path
    profile_out: Path


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


@contextlib.asynccontextmanager
async def server_process(
    args: argparse.Namespace, database_url: str, workdir: Path, position: int
) -> AsyncIterator[ServerProcess]:
    """`python -m bench.authorize.server` as a child process, ready at `position`."""
    port = free_port()
    log = (workdir / "authorize-server.log").resolve()
    profile_out = (workdir / "authorize-server.pstats").resolve()
    env = {
        **os.environ,
        "QUOTA_DATABASE_URL": database_url,
        "QUOTA_SERVICE_TOKEN": SERVICE_TOKEN,
        "QUOTA_REDIS_URL": "",
        "QUOTA_FAIL_OPEN": "false",
        "QUOTA_LOG_LEVEL": "INFO",
        "QUOTA_LOG_JSON": "true",
        "QUOTA_RESERVATION_TTL_SECONDS": str(RESERVATION_TTL_SECONDS),
    }
    command = [
        sys.executable, "-m", "bench.authorize.server", "--host", "127.0.0.1",
        "--port", str(port), "--pool-size", str(args.pool_size),
        "--profile-out", str(profile_out),
    ]  # fmt: skip
    if args.access_log:
        command.append("--access-log")
    with log.open("wb") as handle:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=handle, stderr=handle, cwd=ROOT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    step(f"server: pid {process.pid} on {url} (log {log})")
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            deadline = time.monotonic() + 60
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"the server exited {process.returncode}:\n{_tail(log)}")
                with contextlib.suppress(httpx.TransportError):
                    ready = await client.get("/readyz")
                    if ready.status_code == 200 and ready.json()["position"] >= position:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server was not ready in 60 s:\n{_tail(log)}")
                await asyncio.sleep(0.1)
        yield ServerProcess(url, process.pid, log, profile_out)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


# --- the run -----------------------------------------------------------------------------------


async def _postgres_facts(database_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return {
            "server_version": await conn.fetchval("SHOW server_version"),
            "accounts": await conn.fetchval("SELECT count(*) FROM accounts"),
            "tokens": await conn.fetchval("SELECT count(*) FROM tokens"),
            "rejected_events": await conn.fetchval("SELECT count(*) FROM rejected_events"),
        }
    finally:
        await conn.close()


async def _ledger_head(database_url: str) -> int:
    """The ledger head's position (the reservation holds moved it past the consumer's)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return (await repo.read_head(conn)).position
    finally:
        await conn.close()


async def _background_load(pid: int, seconds: float = 3.0) -> dict[str, float]:
    """The machine's CPU use with the server idle: other work on the box skews every number."""
    before = report.cpu_sample(pid)
    await asyncio.sleep(seconds)
    return report.cpu_usage(before, report.cpu_sample(pid), seconds)


async def _profile(
    args: argparse.Namespace,
    binary: str,
    client: httpx.AsyncClient,
    server: ServerProcess,
    scripts: Path,
) -> dict[str, Any]:
    script = scripts / "authorize-allowed.lua"
    url = server.url + "/authorize"
    options: dict[str, Any] = {"connections": args.connections, "threads": args.threads}
    step("profile: allowed decisions with cProfile on in the server")
    (await client.post("/_bench/profile/start")).raise_for_status()
    result = await wrk.run(binary, url, script, seconds=args.duration, **options)
    (await client.post("/_bench/profile/stop")).raise_for_status()
    out = io.StringIO()
    stats = pstats.Stats(str(server.profile_out), stream=out)
    stats.sort_stats("tottime").print_stats(args.profile_top)
    stats.sort_stats("cumulative").print_stats(args.profile_top)
    return {
        "requests_per_second_under_profiler": result.requests_per_second,
        "requests": result.requests,
        "pstats": str(server.profile_out),
        "_text": out.getvalue(),
    }


async def _bench(
    args: argparse.Namespace, infra: Infra, workdir: Path, binary: str
) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:10]
    settings = Settings(
        database_url=infra.database_url,
        kafka_bootstrap=infra.bootstrap,
        topic=f"bench.authorize.{suffix}",
        topic_partitions=4,
        consumer_group=f"bench-authorize-{suffix}",
        admin_token=ADMIN_TOKEN,
        kafka_session_timeout_ms=3_000,  # Tansu holds a group join for half of it
    )
    events = world_events(args.accounts)
    scripts = workdir / "authorize-lua"
    step("ledger: create_app with its lifespan (consumer, heartbeat) in this process")
    async with running_ledger(settings, args.fetch_max_wait_ms) as (ledger_app, consumer):
        step(f"producing the world: {len(events):,} events ({args.accounts:,} filler accounts)")
        produce_seconds = await produce(infra.bootstrap, settings.topic, events)
        started = time.perf_counter()
        await wait_for_position(consumer, len(events), timeout=600)
        fold_seconds = time.perf_counter() - started
        step(f"ledger at position {consumer.position} ({fold_seconds:.1f}s after producing)")
        pg = await _postgres_facts(infra.database_url)
        async with (
            server_process(args, infra.database_url, workdir, len(events)) as server,
            httpx.AsyncClient(base_url=server.url, timeout=30) as client,
        ):
            info = (await client.get("/_bench/info")).json()
            background = await _background_load(server.pid)
            step(f"background: machine {background['machine_busy']:.0%} busy while idle")
            rows: list[dict[str, Any]] = []
            checks: list[Check] = []
            for scenario in scenarios(args):
                step(f"{scenario.name}: {scenario.label}, {args.duration:g}s")
                row, found = await run_scenario(args, binary, client, server, scenario, scripts)
                rows.append(row)
                checks += found
            profile = None
            if args.profile:
                profile = await _profile(args, binary, client, server, scripts)
            step(f"freshness: {args.fresh_events:,} recharges, one at a time")
            head = await _ledger_head(infra.database_url)
            samples = await measure_freshness(
                infra.bootstrap, settings.topic, consumer, client, args.fresh_events, head=head
            )
        step("no overdraft: holds against balances, the reservations table, verify")
        reserve = next((row for row in rows if row["name"] == "reserve"), None)
        overdraft, found = await no_overdraft(infra.database_url, ledger_app, reserve)
        checks += found
        step(
            "no overdraft: "
            + ("ok" if all(c.ok for c in found) else "FAILED")
            + f" ({overdraft['measured_accounts']['held_count']:,} holds)"
        )
    freshness = freshness_report(samples)
    checks.append(
        Check(
            "freshness: every event's ledger commit was stamped",
            freshness["commit_stamped"] == freshness["events"],
            f"{freshness['commit_stamped']} of {freshness['events']}",
        )
    )
    checks.append(
        Check(
            "world: no event quarantined",
            pg["rejected_events"] == 0,
            f"{pg['rejected_events']} rejected",
        )
    )
    machine = report.machine(
        server_python=info["python"],
        postgresql=f"{pg['server_version']} ({infra.postgres_kind})",
        wrk=wrk.wrk_version(binary),
        broker=infra.broker,
        uvicorn=f"{info['uvicorn']} (loop {info['loop']}, http {info['http']})",
    )
    return {
        "benchmark": "bench.authorize",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "duration_seconds": args.duration,
            "warmup_seconds": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "uvicorn_workers": 1,
            "access_log": info["access_log"],
            "baseline_pool_size": args.pool_size,
            "service_token": True,
            "rate_limiter": "in-process (no rate limit on the bench accounts)",
            "fetch_max_wait_ms_override": args.fetch_max_wait_ms,
            "reservation": {
                "accounts": HOLD_ACCOUNTS,
                "warmup_accounts": HOLD_ACCOUNTS,
                "estimated_cost": HOLD_COST,
                "balance": HOLD_BALANCE,
                "ttl_seconds": RESERVATION_TTL_SECONDS,
                "request_id": None,
            },
            "ledger": {
                "batch_timeout_ms": settings.batch_timeout_ms,
                "heartbeat_seconds": settings.heartbeat_seconds,
                "partitions": settings.topic_partitions,
            },
        },
        "world": {
            "events": len(events),
            "filler_accounts": args.accounts,
            "accounts_in_db": pg["accounts"],
            "tokens_in_db": pg["tokens"],
            "produce_seconds": round(produce_seconds, 3),
            "fold_wait_seconds": round(fold_seconds, 3),
        },
        "background_load": background,
        "scenarios": rows,
        "freshness": freshness,
        "no_overdraft": {
            "ok": all(c.ok for c in checks if c.name.startswith("no overdraft")),
            "checks": [
                {"name": c.name, "ok": c.ok, "detail": c.detail}
                for c in checks
                if c.name.startswith("no overdraft")
            ],
            **overdraft,
        },
        "targets": _targets(rows, freshness),
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
        "_profile": profile,
    }


def _targets(rows: list[dict[str, Any]], freshness: dict[str, Any]) -> list[dict[str, Any]]:
    by = {row["name"]: row for row in rows}
    rps = {name: row["requests_per_second"] for name, row in by.items()}

    def ratio(a: str, b: str) -> float | None:
        return rps[a] / rps[b] if a in rps and b in rps and rps[b] else None

    def p99(name: str) -> float | None:
        return by[name]["latency_ms"]["p99"] if name in by else None

    items = [
        ("allowed rps / ceiling rps", ratio("allowed", "ceiling"), ">=", 0.5, "x"),
        ("allowed rps / baseline rps", ratio("allowed", "baseline"), ">=", 4.0, "x"),
        ("reserve rps / baseline rps", ratio("reserve", "baseline"), ">=", 1.0, "x"),
        ("allowed p99 latency", p99("allowed"), "<=", 3.0, "ms"),
        ("denied p99 latency", p99("denied"), "<=", 3.0, "ms"),
        ("freshness p99 (produce -> snapshot)", freshness["total_ms"]["p99"], "<=", 100.0, "ms"),
    ]
    return [
        {
            "metric": metric,
            "value": round(value, 4),
            "target": f"{op} {target:g} {unit}",
            "pass": value >= target if op == ">=" else value <= target,
        }
        for metric, value, op, target, unit in items
        if value is not None  # its scenarios did not run (--only)
    ]


# --- printing ----------------------------------------------------------------------------------


SCENARIO_HEADER = (
    "scenario", "conns", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "srv cores",
    "box busy", "srv µs/req", "gen2 GC n / ms total",
)  # fmt: skip


def _pause_text(pauses: dict[str, dict[str, float]]) -> str:
    gen2 = pauses.get("gc.gen2")
    return "0" if gen2 is None else f"{gen2['count']:.0f} / {gen2['total_ms']:.0f}"


def _print(result: dict[str, Any]) -> None:
    m, s, w = result["machine"], result["settings"], result["world"]
    print()
    print(
        report.table(
            [
                ("machine", f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM"),
                ("kernel", m["kernel"]),
                ("python (server)", m["server_python"]),
                ("uvicorn", m["uvicorn"]),
                ("postgresql", m["postgresql"]),
                ("wrk", m["wrk"]),
                ("broker", m["broker"]),
                (
                    "load",
                    f"wrk -t{s['threads']} -c{s['connections']} -d{s['duration_seconds']:g}s "
                    f"(+{s['warmup_seconds']:g}s warmup), 1 uvicorn worker, access log "
                    f"{'ON (--access-log)' if s['access_log'] else 'off (as quota policy)'}",
                ),
                (
                    "world",
                    f"{w['accounts_in_db']:,} accounts, {w['tokens_in_db']:,} tokens "
                    f"({w['events']:,} events through Kafka and the ledger)",
                ),
                (
                    "background load",
                    f"{result['background_load']['machine_busy']:.0%} of the machine busy "
                    "with the server idle (other processes)",
                ),
                (
                    "ledger fetch wait",
                    "as shipped (aiokafka default 500 ms)"
                    if s["fetch_max_wait_ms_override"] is None
                    else f"EXPERIMENT: fetch_max_wait_ms={s['fetch_max_wait_ms_override']}",
                ),
            ],
            title="bench.authorize",
        )
    )
    rows = []
    for row in result["scenarios"]:
        lat = row["latency_ms"]
        rows.append(
            [
                row["label"],
                str(row["connections"]),
                f"{row['requests_per_second']:,.0f}",
                report.ms(lat["p50"]),
                report.ms(lat.get("p90")),
                report.ms(lat["p99"]),
                report.ms(row["extra"].get("p999_us", 0) / 1000 if row["extra"] else None),
                f"{row['cpu']['server_cores']:.2f}",
                f"{row['cpu']['machine_busy']:.0%}",
                f"{row['server_cpu_us_per_request']:.0f}",
                _pause_text(row["server_pauses"]),
            ]
        )
    print()
    print(
        report.grid(
            SCENARIO_HEADER,
            rows,
            title="HTTP scenarios (latency from wrk --latency; server CPU from /proc)",
        )
    )
    f = result["freshness"]
    fresh_rows = [["produce -> snapshot (total)", *_stats(f["total_ms"])]]
    for name, stats in f["components_ms"].items():
        if stats is not None:
            fresh_rows.append([f"  {name.replace('_', ' ')}", *_stats(stats)])
    print()
    print(
        report.grid(
            ["freshness", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms"],
            fresh_rows,
            title=f"Freshness over {f['events']:,} recharges produced one at a time",
        )
    )
    print()
    print(
        report.grid(
            ["target", "measured", "target", "result"],
            [
                [
                    t["metric"],
                    f"{t['value']:.3f}",
                    t["target"],
                    "PASS" if t["pass"] else "MISS",
                ]
                for t in result["targets"]
            ],
            title="Targets",
        )
    )
    od = result["no_overdraft"]
    by_name = {r["name"]: r for r in result["scenarios"]}
    reserve, baseline = by_name.get("reserve"), by_name.get("baseline")
    print()
    print(
        report.grid(
            ["scenario", "req/s", "p50 ms", "p99 ms", "200 answers", "held reservations"],
            [
                [
                    row["label"],
                    f"{row['requests_per_second']:,.0f}",
                    report.ms(row["latency_ms"]["p50"]),
                    report.ms(row["latency_ms"]["p99"]),
                    f"{row['responses_2xx']:,}",
                    held,
                ]
                for row, held in (
                    (reserve, f"{od['measured_accounts']['held_count']:,} (incl. 1 precheck)"),
                    (baseline, "-"),
                )
                if row is not None
            ],
            title="Reservations (estimated_cost, no request_id: a new hold per request) "
            "against the PostgreSQL-per-request baseline",
        )
    )
    print()
    print(
        report.grid(
            ["check", "result", "detail"],
            [[c["name"], "PASS" if c["ok"] else "FAIL", c["detail"]] for c in od["checks"]],
            title=f"No overdraft ({od['accounts_checked']:,} accounts, after the run)",
        )
    )
    failed = [c for c in result["checks"] if not c["ok"]]
    print()
    if result["background_load"]["machine_busy"] > 0.15:
        print(
            f"WARNING: {result['background_load']['machine_busy']:.0%} of the machine was busy "
            "before the scenarios (other processes): the numbers are skewed."
        )
    if failed:
        print("CHECKS FAILED:")
        for check in failed:
            print(f"  - {check['name']}: {check['detail']}")
    else:
        print(f"checks: all {len(result['checks'])} passed")
    allowed = by_name.get("allowed")
    if allowed is not None:
        print(
            f"note: with {allowed['connections']} closed-loop connections, mean latency = "
            f"connections / rate (Little's law) = {allowed['littles_law_mean_ms']:.2f} ms "
            "for the allowed run; see the 1-connection row for service time."
        )
    if result.get("_profile"):
        print()
        print(
            f"Server profile ({result['_profile']['requests']:,} allowed requests, "
            f"{result['_profile']['requests_per_second_under_profiler']:,.0f} req/s under "
            f"cProfile; {result['_profile']['pstats']}):"
        )
        print(result["_profile"]["_text"])


def _stats(values: dict[str, float]) -> list[str]:
    return [report.ms(values[k]) for k in ("p50", "p90", "p99", "max", "mean")]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        binary = wrk.find_wrk()
    except wrk.WrkMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    workdir: Path = args.workdir
    output: Path = args.output or workdir / "authorize.json"
    started = time.perf_counter()
    with infrastructure(workdir, args.database_url, args.kafka_bootstrap) as infra:
        result = asyncio.run(_bench(args, infra, workdir, binary))
    _print(result)
    profile = result.pop("_profile")
    if profile:
        result["profile"] = {k: v for k, v in profile.items() if k != "_text"}
    report.write_json(output, result)
    print(f"\nwrote {output} ({time.perf_counter() - started:.0f}s in all)")
    if not all(check["ok"] for check in result["checks"]):
        return 1
    if args.fail_on_miss and not all(t["pass"] for t in result["targets"]):
        return 2
    return 0
