"""`python -m bench.soak`: options, the processes, the faults, the run in order, the report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import asyncpg
import httpx

from bench import report
from bench.authorize.world import world_events
from bench.infra import REJECTED_SQL, Infra, arguments, run, say
from bench.soak import results
from bench.soak.load import CONNECTIONS, MIX, Load
from services.contract.samples import recharge, token_issued
from services.infra.postgres import connections_refused
from services.infra.processes import QuotaProcesses
from services.settings import Settings, asyncpg_dsn

ADMIN_TOKEN: Final = "soak-admin-token-0123456789"
SERVICE_TOKEN: Final = "soak-service-token-0123456789"
SESSION_TIMEOUT_MS: Final = 6_000
ACCOUNT_BALANCE: Final = 10**12
APPLIED_SQL: Final = """
SELECT count(*), count(DISTINCT event_id) FROM event_store WHERE event_id = ANY($1::text[])
"""

Fault = tuple[str, float, Callable[[], Awaitable[None]]]
step = functools.partial(say, "bench.soak")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = arguments(
        "bench.soak",
        "Mixed load at a fixed rate against 1 ledger + 2 policies, with a database outage and a"
        " broker pause in the middle; memory, latency, events, recovery.",
    )
    option = parser.add_argument
    option("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    option("--rate", type=float, default=200.0, help="requests/s in all (default 200)")
    option("--accounts", type=int, default=1_000, help="accounts besides the hot one")
    option("--hot-share", type=float, default=0.2, help="share of requests on the hot account")
    option("--fault-seconds", type=float, default=10.0, help="length of each fault")
    option("--db-outage-at", type=float, default=0.35, help="when, as a share of --duration")
    option("--broker-pause-at", type=float, default=0.65, help="when, as a share of --duration")
    option("--no-faults", action="store_true", help="load only")
    option("--sample-seconds", type=float, default=2.0, help="RSS sampling period")
    option("--drain-timeout", type=float, default=60.0, help="longest wait for the ledger")
    args = parser.parse_args(argv)
    if args.duration < 30 or args.rate <= 0 or args.accounts < 1:
        parser.error("--duration must be >= 30 s, --rate > 0 and --accounts >= 1")
    return args


def world(accounts: int) -> list[dict[str, Any]]:
    """bench.authorize's catalog and hot account, then `accounts` accounts, each with a token
    and a balance that no run can exhaust."""
    events = world_events(0)
    for index, (account, key) in enumerate(Load.account_keys(accounts)):
        events.append(recharge(account, ACCOUNT_BALANCE))
        events.append(token_issued(account, f"tok-soak-{index:07d}", key))
    return events


async def database_outage(database_url: str, seconds: float) -> None:
    """Refuse new connections to the database and end the open ones, for `seconds`."""
    async with connections_refused(database_url):
        await asyncio.sleep(seconds)


async def broker_pause(pid: int, seconds: float) -> None:
    """SIGSTOP the broker for `seconds` (longer than the ledger's session timeout), SIGCONT."""
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def plan_faults(args: argparse.Namespace, infra: Infra) -> list[Fault]:
    seconds, pid = args.fault_seconds, infra.broker_pid
    if args.no_faults:
        return []
    plan: list[Fault] = [(f"database outage {seconds:g} s", args.db_outage_at * args.duration,
                          lambda: database_outage(infra.database_url, seconds))]  # fmt: skip
    if pid is None:
        step("no broker pause: the broker was given, not started by this run")
    else:
        plan.append((f"broker pause {seconds:g} s", args.broker_pause_at * args.duration,
                     lambda: broker_pause(pid, seconds)))  # fmt: skip
    return plan


async def run_faults(load: Load, plan: Sequence[Fault]) -> list[dict[str, Any]]:
    """Each fault at its time; when it began and ended, in seconds of the run."""
    done: list[dict[str, Any]] = []
    for name, at, cause in plan:
        await asyncio.sleep(max(0.0, at - load.now()))
        step(f"fault: {name} at {load.now():.1f} s")
        start = load.now()
        await cause()
        done.append({"name": name, "start_s": start, "end_s": load.now()})
    return done


async def sample_rss(
    load: Load, pids: dict[str, int], every: float, out: list[results.RssSample]
) -> None:
    while True:
        for name, pid in pids.items():
            kib = report.proc_kib(f"/proc/{pid}/status", "VmRSS")
            if kib is not None:
                out.append((load.now(), name, kib))
        await asyncio.sleep(every)


async def events_outcome(conn: asyncpg.Connection, load: Load, timeout: float) -> dict[str, Any]:
    """Wait (bounded) until every produced event is in event_store; then produced against
    applied (rows and distinct ids), the unconfirmed ones, the quarantine."""
    started = time.monotonic()
    while (row := await conn.fetchrow(APPLIED_SQL, load.produced))[1] < len(load.produced):
        if time.monotonic() - started > timeout:
            break
        await asyncio.sleep(1.0)
    unconfirmed = await conn.fetchrow(APPLIED_SQL, load.unconfirmed)
    return {
        "produced": len(load.produced), "applied": row[1],
        "lost": len(load.produced) - row[1], "doubled": row[0] - row[1],
        "unconfirmed": len(load.unconfirmed), "unconfirmed_applied": unconfirmed[1],
        "drain_s": time.monotonic() - started,
        "rejected": await conn.fetchval(REJECTED_SQL),
    }  # fmt: skip


async def soak(args: argparse.Namespace, infra: Infra) -> dict[str, Any]:
    warmup = min(60.0, args.duration / 10)
    interval = 60.0 if args.duration >= 300 else max(10.0, args.duration / 6)
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    json_type = {"content-type": "application/json"}
    suffix = uuid.uuid4().hex[:10]
    settings = Settings(
        database_url=infra.database_url, kafka_bootstrap=infra.bootstrap,
        topic=f"bench.soak.{suffix}", consumer_group=f"bench-soak-{suffix}",
        admin_token=ADMIN_TOKEN, service_token=SERVICE_TOKEN,
        kafka_session_timeout_ms=SESSION_TIMEOUT_MS,
    )  # fmt: skip
    logs = (args.workdir / "soak").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):  # the processes append; keep one run per log
        old.unlink()
    async with contextlib.AsyncExitStack() as stack:
        fleet = QuotaProcesses(settings, logs)
        stack.callback(fleet.close)
        ledger = fleet.start("ledger", "ledger")
        await fleet.wait_ready(ledger)
        ledger_client = await stack.enter_async_context(httpx.AsyncClient(
            base_url=ledger.url, timeout=30, limits=limits,
            headers={"authorization": f"Bearer {ADMIN_TOKEN}", **json_type},
        ))  # fmt: skip
        events = world(args.accounts)
        step(f"world: {len(events):,} events through POST /events")
        for first in range(0, len(events), 5_000):
            chunk = events[first : first + 5_000]
            (await ledger_client.post("/events", json=chunk)).raise_for_status()
        await fleet.wait_ready(ledger, len(events))
        clients = []
        for name in ("policy-a", "policy-b"):
            policy = fleet.start("policy", name)
            await fleet.wait_ready(policy, len(events))
            clients.append(await stack.enter_async_context(httpx.AsyncClient(
                base_url=policy.url, timeout=10, limits=limits,
                headers={"x-quota-service-token": SERVICE_TOKEN, **json_type},
            )))  # fmt: skip
        pids = {p.name: p.process.pid for p in fleet.processes} | {"driver": os.getpid()}
        if infra.broker_pid:
            pids["tansu"] = infra.broker_pid
        step(f"load: {args.rate:g} req/s for {args.duration:g} s")
        load = Load(clients, ledger_client, args.accounts, args.hot_share)
        samples: list[results.RssSample] = []
        sampler = asyncio.create_task(sample_rss(load, pids, args.sample_seconds, samples))
        faults = asyncio.create_task(run_faults(load, plan_faults(args, infra)))
        cpu = os.times()
        try:
            await load.run(args.rate, args.duration)
            unfinished = await load.finish(timeout=40)
            fault_log = await asyncio.wait_for(faults, 60)
        finally:
            sampler.cancel()
            faults.cancel()
        cpu_cores = (sum(os.times()[:2]) - sum(cpu[:2])) / load.now()
        step(f"load over: {load.sent:,} sent; waiting for the ledger to apply what was produced")
        conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
        try:
            events_result = await events_outcome(conn, load, args.drain_timeout)
            result = await report.header("bench.soak", conn, infra)
        finally:
            await conn.close()
        step("/audit/verify")
        try:
            verify = (await ledger_client.get("/audit/verify", timeout=300)).json()
        except (httpx.HTTPError, ValueError) as exc:
            verify = {"ok": None, "error": repr(exc)}
        exit_codes = {p.name: p.process.poll() for p in fleet.processes}
    lags = [r[3] for r in load.records if r[1] == "lag"] or [0.0]
    result |= {
        "settings": {
            "duration_s": args.duration, "rate": args.rate, "mix": MIX,
            "accounts": args.accounts, "hot_share": args.hot_share, "warmup_s": warmup,
            "interval_s": interval, "fault_seconds": args.fault_seconds,
            "session_timeout_ms": SESSION_TIMEOUT_MS, "sample_seconds": args.sample_seconds,
        },
        "faults": fault_log,
        "load": {"sent": load.sent, "dropped": load.dropped, "unfinished": unfinished,
                 "lag_p99_ms": report.percentile(lags, 99), "cpu_cores": cpu_cores},
        "intervals": results.intervals(load.records, interval, args.duration),
        "timeline_5s": results.intervals(load.records, results.BUCKET, args.duration),
        "rss": results.rss(samples, interval, args.duration, warmup),
        "events": events_result,
        "recovery": results.recovery(load.records, fault_log, warmup, args.duration),
        "verify": verify | {"differences": verify.get("differences", [])[:20]},
        "exit_codes": exit_codes,
        "logs": {p.name: str(p.log_path) for p in fleet.processes},
    }  # fmt: skip
    result["targets"] = results.targets(result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args, "bench.soak", lambda infra: soak(args, infra), results.render)
    return 0 if all(t["met"] for t in result["targets"]) else 2
