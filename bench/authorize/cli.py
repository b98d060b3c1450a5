"""`python -m bench.authorize`: options, the scenarios, the checks, the run in order, the report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import httpx
import uvicorn

from bench import report
from bench.authorize import world, wrk
from bench.authorize.ledger import measure_freshness, running_ledger, wait_for_position
from bench.infra import REJECTED_SQL, Infra, arguments, publish, run, say
from services.infra.processes import QuotaProcesses
from services.ledger.audit import verify
from services.settings import Settings, asyncpg_dsn
from services.store.event_store import read_head

SERVICE_TOKEN: Final = "bench-service-token-0123456789"
HEADERS: Final = {"Content-Type": "application/json", "X-Quota-Service-Token": SERVICE_TOKEN}
#: The policy's reservation TTL in the bench server: longer than any run, so no hold of the
#: reservation scenario expires before the end-of-run checks count them.
RESERVATION_TTL_SECONDS: Final = 3_600
#: Decisions by reason, and the hold group commit's `<histogram>_sum` / `_count`.
_METRIC: Final = re.compile(r'^quota_policy_(?:decisions_total\{reason="([^"]+)"\}|hold_'
                            r"(batch_size_(?:sum|count)))\s+(\S+)$", re.M)  # fmt: skip
step = functools.partial(say, "bench.authorize")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = arguments(
        "bench.authorize",
        "POST /authorize throughput, latency and freshness against its yardsticks.",
    )
    option = parser.add_argument
    option("--duration", type=int, default=10, help="whole seconds per wrk scenario")
    option("--warmup", type=int, default=2, help="unmeasured wrk seconds before each (0: none)")
    option(
        "--rounds",
        type=int,
        default=2,
        help="runs of the scenario list, in turn forward and backward, merged per scenario "
        "(so a machine whose speed drifts during the run weighs every scenario alike)",
    )
    option("--connections", type=int, default=32, help="wrk connections")
    option("--threads", type=int, default=2, help="wrk threads")
    option("--accounts", type=int, default=10_000, help="filler accounts (each with a token)")
    option("--fresh-events", type=int, default=1_000, help="events of the freshness scenario")
    option("--pool-size", type=int, default=10, help="baseline asyncpg pool size")
    option("--fetch-max-wait-ms", type=int, help="Settings.kafka_fetch_max_wait_ms of the ledger")
    option("--no-single", action="store_true", help="skip the 1-connection run of allowed")
    option("--only", default="", help="comma-separated scenarios to run (e.g. baseline,reserve)")
    option("--fail-on-miss", action="store_true", help="exit 2 when a target is missed")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be at least 1 and --warmup at least 0 (whole seconds)")
    if not 1 <= args.threads <= args.connections or min(args.fresh_events, args.pool_size) < 1:
        parser.error("need 1 <= --threads <= --connections, --fresh-events and --pool-size >= 1")
    return args


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    label: str
    path: str
    #: wrk sends one of these per request, round-robin.
    bodies: tuple[bytes, ...]
    #: What every response must be: its status, and the `quota_policy_decisions_total` reason
    #: the policy counts it under (None: not /authorize).
    status: int
    reason: str | None
    connections: int
    threads: int
    #: The warm-up's bodies (default: the scenario's own).
    warmup_bodies: tuple[bytes, ...] = ()


def hold_bodies(*, warmup: bool = False, budgeted: bool = False) -> tuple[bytes, ...]:
    """The reservation scenario's bodies, one per hold account (warm-up: accounts of its own)."""
    keys = (world.hold_key(i, warmup=warmup, budgeted=budgeted)
            for i in range(world.HOLD_ACCOUNTS))  # fmt: skip
    return tuple(world.encode(world.reserve_body(key)) for key in keys)


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    allowed = (world.encode(world.authorize_body(world.ALLOWED_KEY)),)
    budgeted = (world.encode(world.authorize_body(world.BUDGETED_KEY)),)
    denied = (world.encode(world.authorize_body(world.POOR_KEY)),)
    c, t = args.connections, args.threads
    runs = [
        Scenario("ceiling", "ceiling: bare ASGI, constant JSON", "/raw", allowed, 200, None, c, t),
        Scenario("allowed", "/authorize allowed (snapshot hit)", "/authorize", allowed, 200,
                 "allowed", c, t),
        Scenario("budgeted", "/authorize allowed, 3 budgets + a cap", "/authorize", budgeted,
                 200, "allowed", c, t),
        Scenario("denied", "/authorize denied (no balance)", "/authorize", denied, 403,
                 "insufficient_user_quota", c, t),
        Scenario("baseline", "baseline: FastAPI + PostgreSQL", "/baseline", allowed, 200, None,
                 c, t),
        Scenario("reserve", f"/authorize + hold ({world.HOLD_ACCOUNTS} accounts)", "/authorize",
                 hold_bodies(), 200, "allowed", c, t, hold_bodies(warmup=True)),
        Scenario("reserve_budgeted", "/authorize + hold, 3 budgets + a cap", "/authorize",
                 hold_bodies(budgeted=True), 200, "allowed", c, t,
                 hold_bodies(warmup=True, budgeted=True)),
        Scenario("allowed_1conn", "/authorize allowed, 1 connection", "/authorize", allowed, 200,
                 "allowed", 1, 1),
    ]  # fmt: skip
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    if args.no_single:
        wanted = wanted or {run.name for run in runs[:-1]}
    return [run for run in runs if not wanted or run.name in wanted]


@dataclass(slots=True)
class Check:
    name: str
    ok: bool
    detail: str


async def _counters(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {m.group(1) or m.group(2): float(m.group(3)) for m in _METRIC.finditer(text)}


async def run_scenario(
    args: argparse.Namespace, binary: str, client: httpx.AsyncClient, scenario: Scenario
) -> tuple[dict[str, Any], list[Check]]:
    scripts = args.workdir / "authorize-lua"
    script = wrk.write_script(scripts / f"{scenario.name}.lua", scenario.bodies, HEADERS)
    url = str(client.base_url).rstrip("/") + scenario.path
    options: dict[str, Any] = {"connections": scenario.connections, "threads": scenario.threads}
    if args.warmup > 0:
        warm = script
        if scenario.warmup_bodies:
            path = scripts / f"{scenario.name}-warmup.lua"
            warm = wrk.write_script(path, scenario.warmup_bodies, HEADERS)
        await wrk.run(binary, url, warm, seconds=args.warmup, **options)
    before = await _counters(client)
    result = await wrk.run(binary, url, script, seconds=args.duration, **options)
    delta = {k: v - before.get(k, 0.0) for k, v in (await _counters(client)).items()}
    commits, holds = delta.pop("batch_size_count", 0.0), delta.pop("batch_size_sum", 0.0)
    delta = {k: v for k, v in delta.items() if v}
    expected_non_2xx = result.requests if scenario.status >= 400 else 0
    checks = [
        Check(f"{scenario.name}: every response has status {scenario.status}",
              result.non_2xx_3xx == expected_non_2xx,
              f"{result.non_2xx_3xx} non-2xx/3xx of {result.requests}"),
        Check(f"{scenario.name}: no socket errors", not any(result.socket_errors.values()),
              str(result.socket_errors)),
    ]  # fmt: skip
    if scenario.reason is not None:
        counted = delta.get(scenario.reason, 0.0)
        others = {k: v for k, v in delta.items() if k != scenario.reason}
        checks.append(Check(
            f"{scenario.name}: the policy counted each as {scenario.reason!r}",
            counted >= result.requests and not others,
            f"{counted:.0f} counted >= {result.requests} answered; others {others}",
        ))  # fmt: skip
    rps = result.requests_per_second
    row = {
        "name": scenario.name, "label": scenario.label, "path": scenario.path,
        "connections": scenario.connections, "threads": scenario.threads,
        "bodies": len(scenario.bodies), **dataclasses.asdict(result),
        "responses_2xx": result.requests - result.non_2xx_3xx, "decisions_counted": delta,
        "holds_per_commit": round(holds / commits, 2) if commits else None,
        "commits": commits, "holds": holds,
        # Little's law: with N connections each waiting for its answer, mean latency = N / rate.
        "littles_law_mean_ms": round(scenario.connections / rps * 1000, 3) if rps else None,
    }  # fmt: skip
    latency = result.latency_ms
    step(f"{scenario.name}: {rps:,.0f} req/s, p50 {latency['p50']:.2f} ms, "
         f"p99 {latency['p99']:.2f} ms")  # fmt: skip
    return row, checks


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario's rounds as one row: requests and time summed (so the rate is over all of
    them), counts summed, each latency percentile the mean of the rounds'; `rounds_rps` keeps
    each round's rate."""
    first, seconds = rounds[0], sum(r["seconds"] for r in rounds)
    requests = sum(r["requests"] for r in rounds)
    commits, holds = sum(r["commits"] for r in rounds), sum(r["holds"] for r in rounds)
    counted: dict[str, float] = {}
    for r in rounds:
        for reason, n in r["decisions_counted"].items():
            counted[reason] = counted.get(reason, 0.0) + n
    rps = requests / seconds if seconds else 0.0
    return first | {
        "requests": requests, "seconds": seconds, "requests_per_second": rps,
        "rounds_rps": [round(r["requests_per_second"], 1) for r in rounds],
        "latency_ms": {p: statistics.fmean(r["latency_ms"][p] for r in rounds)
                       for p in first["latency_ms"]},
        "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in rounds),
        "socket_errors": {k: sum(r["socket_errors"][k] for r in rounds)
                          for k in first["socket_errors"]},
        "responses_2xx": sum(r["responses_2xx"] for r in rounds),
        "decisions_counted": counted, "commits": commits, "holds": holds,
        "holds_per_commit": round(holds / commits, 2) if commits else None,
        "littles_law_mean_ms": round(first["connections"] / rps * 1000, 3) if rps else None,
    }  # fmt: skip


OVERDRAWN_SQL: Final = "SELECT account_id FROM accounts WHERE held > balance OR held < 0"
#: Per account: accounts.held against the amounts of its reservations in state held.
HELD_MISMATCH_SQL: Final = """
SELECT coalesce(a.account_id, r.account_id) AS account_id, a.held, coalesce(r.amount, 0) AS sum
FROM accounts a
FULL JOIN (SELECT account_id, sum(amount)::bigint AS amount FROM reservations
           WHERE state = 'held' GROUP BY account_id) r ON r.account_id = a.account_id
WHERE a.held IS DISTINCT FROM coalesce(r.amount, 0)
"""
STATES_SQL: Final = """
SELECT state, count(*) AS n FROM reservations WHERE account_id = ANY($1::text[]) GROUP BY state
"""
#: Budgets whose spend this period plus held passes their amount, or whose `held` is not the
#: sum of the held reservations they cover; accounts and tokens past their concurrency caps.
OVER_BUDGET_SQL: Final = """
SELECT b.budget_id, b.amount, b.held, coalesce(s.spent, 0) AS spent, coalesce(r.sum, 0) AS sum
FROM budgets b
LEFT JOIN budget_spend s ON s.budget_id = b.budget_id
     AND s.period_start = quota_period_start(b.period, b.timezone, now())
LEFT JOIN LATERAL (
    SELECT sum(amount)::bigint AS sum FROM reservations r
    WHERE r.account_id = b.account_id AND r.state = 'held'
      AND (b.token_id IS NULL OR r.token_id = b.token_id)
      AND (b.model IS NULL OR r.model = b.model)) r ON true
WHERE coalesce(s.spent, 0) + b.held > b.amount OR b.held <> coalesce(r.sum, 0)
"""
OVER_CAP_SQL: Final = """
SELECT account_id AS id, holds AS n, max_concurrent FROM accounts WHERE holds > max_concurrent
UNION ALL
SELECT t.token_id, count(*), t.max_concurrent FROM tokens t
JOIN reservations r ON r.token_id = t.token_id AND r.state = 'held'
GROUP BY t.token_id, t.max_concurrent HAVING count(*) > t.max_concurrent
"""
BUDGETED_HOLDS_SQL: Final = """
SELECT count(*) AS holds, count(DISTINCT b.budget_id) AS budgets, coalesce(sum(b.held), 0) AS held
FROM budgets b WHERE b.account_id = ANY($1::text[])
"""


async def no_overdraft(conn: asyncpg.Connection, answered: tuple[int, int] | None) -> list[Check]:
    """After the run: no account holds more than its balance, `accounts.held` is the sum of its
    held reservations, no budget or cap is passed, the measured accounts hold one reservation
    per 200 answer of the hold rows (`answered`: their 200s and connections; none ended), and
    `verify` (chain and re-fold of the whole history) agrees."""
    measured = [world.hold_account(i, budgeted=b) for i in range(world.HOLD_ACCOUNTS)
                for b in (False, True)]  # fmt: skip
    overdrawn = [r["account_id"] for r in await conn.fetch(OVERDRAWN_SQL)]
    over_budget = [dict(r) for r in await conn.fetch(OVER_BUDGET_SQL)]
    over_cap = [dict(r) for r in await conn.fetch(OVER_CAP_SQL)]
    budgeted = [world.hold_account(i, budgeted=True) for i in range(world.HOLD_ACCOUNTS)]
    weighed = await conn.fetchrow(BUDGETED_HOLDS_SQL, budgeted)
    mismatched = [dict(r) for r in await conn.fetch(HELD_MISMATCH_SQL)]
    states = {r["state"]: r["n"] for r in await conn.fetch(STATES_SQL, measured)}
    started = time.perf_counter()
    audit = await verify(conn)
    seconds = time.perf_counter() - started
    held = states.pop("held", 0)
    checks = [
        Check("no overdraft: held <= balance for every account", not overdrawn,
              f"{len(overdrawn)} accounts overdrawn {overdrawn[:5]}"),
        Check("no overdraft: accounts.held = sum of held reservations, per account",
              not mismatched, f"{len(mismatched)} accounts differ {mismatched[:5]}"),
        Check("no overshoot: spent + held <= amount and held = its holds, every budget",
              not over_budget, f"{weighed['budgets']} budgets of the budgeted hold accounts "
              f"hold {weighed['held']:,}; {len(over_budget)} over {over_budget[:3]}"),
        Check("no overshoot: active holds <= max_concurrent, every account and token",
              not over_cap, f"{len(over_cap)} over {over_cap[:3]}"),
        Check("no overdraft: no hold of the measured accounts ended", not states,
              f"ended: {states or 'none'} (TTL {RESERVATION_TTL_SECONDS} s)"),
        Check("no overdraft: ledger verify (chain and re-fold) ok", audit.ok,
              f"{audit.events_checked:,} events re-folded in {seconds:.1f}s; "
              f"differences {audit.differences[:3]}"),
    ]  # fmt: skip
    if answered is not None:
        # wrk counts only answers that arrived before it stopped; requests still in flight
        # then (at most one per connection) were held by the server, unseen.
        extra = held - answered[0]
        checks.append(Check(
            f"no overdraft: held reservations = wrk's 200 answers (+ <= {answered[1]} cut off)",
            0 <= extra <= answered[1], f"{held:,} held = {answered[0]:,} answered + {extra}",
        ))  # fmt: skip
    return checks


@contextlib.asynccontextmanager
async def server_process(settings: Settings, workdir: Path, pool_size: int) -> AsyncIterator[str]:
    """`python -m bench.authorize.server` as a child process; its URL once it is ready."""
    (workdir / "authorize-server.log").unlink(missing_ok=True)
    fleet = QuotaProcesses(settings, workdir.resolve())
    program = [sys.executable, "-m", "bench.authorize.server", "--pool-size", str(pool_size)]
    try:
        server = fleet.start("policy", "authorize-server", program=program,
                             service_token=SERVICE_TOKEN, redis_url="", fail_open=False,
                             reservation_ttl_seconds=RESERVATION_TTL_SECONDS)  # fmt: skip
        step(f"server: pid {server.process.pid} on {server.url} (log {server.log_path})")
        await fleet.wait_ready(server)
        yield server.url
    finally:
        fleet.close()


async def _bench(args: argparse.Namespace, infra: Infra, binary: str) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:10]
    settings = Settings(
        database_url=infra.database_url, kafka_bootstrap=infra.bootstrap,
        topic=f"bench.authorize.{suffix}", consumer_group=f"bench-authorize-{suffix}",
        kafka_session_timeout_ms=3_000,  # Tansu holds a group join for half of it
    )  # fmt: skip
    if args.fetch_max_wait_ms is not None:
        settings = settings.model_copy(update={"kafka_fetch_max_wait_ms": args.fetch_max_wait_ms})
    events = world.world_events(args.accounts)
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        step("ledger: create_app with its lifespan (consumer, heartbeat) in this process")
        async with running_ledger(settings) as commits:
            step(f"producing the world: {len(events):,} events")
            produce_seconds = await publish(infra.bootstrap, settings.topic, events)
            await wait_for_position(commits, len(events), timeout=600)
            async with (
                server_process(settings, args.workdir, args.pool_size) as url,
                httpx.AsyncClient(base_url=url, timeout=30) as client,
            ):
                runs: dict[str, list[dict[str, Any]]] = {}
                checks: list[Check] = []
                planned = scenarios(args)
                for round_ in range(args.rounds):
                    for scenario in planned if round_ % 2 == 0 else planned[::-1]:
                        # Each scenario starts on a quiet database: the writes of the one
                        # before (a hold run's) are flushed now, not by a checkpoint during it.
                        await conn.execute("CHECKPOINT")
                        step(f"{scenario.name}: {scenario.label}, {args.duration}s, "
                             f"round {round_ + 1} of {args.rounds}")  # fmt: skip
                        row, found = await run_scenario(args, binary, client, scenario)
                        runs.setdefault(scenario.name, []).append(row)
                        checks += found
                rows = [merge_rounds(runs[scenario.name]) for scenario in planned]
                step(f"freshness: {args.fresh_events:,} recharges, one at a time")
                head = (await read_head(conn)).position
                freshness = await measure_freshness(
                    infra.bootstrap, settings.topic, commits, client, args.fresh_events, head
                )
            step("no overdraft: holds against balances, the reservations table, verify")
            holding = [row for row in rows if row["name"] in ("reserve", "reserve_budgeted")]
            answered = (
                (
                    sum(r["responses_2xx"] for r in holding),
                    sum(r["connections"] * len(r["rounds_rps"]) for r in holding),
                )
                if len(holding) == 2
                else None
            )
            checks += await no_overdraft(conn, answered)
        facts = {"wrk": wrk.wrk_version(binary), "uvicorn": uvicorn.__version__}
        result = await report.header("bench.authorize", conn, infra, **facts)
        rejected = await conn.fetchval(REJECTED_SQL)
    finally:
        await conn.close()
    stamped = freshness["commit_stamped"]
    checks += [
        Check("freshness: every event's ledger commit was stamped",
              stamped == freshness["events"], f"{stamped} of {freshness['events']}"),
        Check("no event quarantined", rejected == 0, f"{rejected} rejected"),
    ]  # fmt: skip
    return result | {
        "settings": {
            "duration_seconds": args.duration, "warmup_seconds": args.warmup,
            "rounds": args.rounds,
            "connections": args.connections, "threads": args.threads, "uvicorn_workers": 1,
            "access_log": os.environ.get("QUOTA_ACCESS_LOG", "false"),
            "baseline_pool_size": args.pool_size,
            "kafka_fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
            "world_events": len(events), "produce_seconds": round(produce_seconds, 3),
        },
        "scenarios": rows,
        "freshness": freshness,
        "targets": _targets(rows, freshness),
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
    }  # fmt: skip


def _targets(rows: list[dict[str, Any]], freshness: dict[str, Any]) -> list[dict[str, Any]]:
    rps = {row["name"]: row["requests_per_second"] for row in rows}
    p99 = {row["name"]: row["latency_ms"]["p99"] for row in rows}

    def ratio(a: str, b: str) -> float | None:
        return rps[a] / rps[b] if a in rps and b in rps else None

    items = [
        ("allowed rps / ceiling rps", ratio("allowed", "ceiling"), ">=", 0.5, "x"),
        ("allowed rps / baseline rps", ratio("allowed", "baseline"), ">=", 4.0, "x"),
        ("reserve rps / baseline rps", ratio("reserve", "baseline"), ">=", 1.5, "x"),
        ("budgeted rps / allowed rps", ratio("budgeted", "allowed"), ">=", 0.9, "x"),
        ("reserve budgeted rps / reserve rps", ratio("reserve_budgeted", "reserve"), ">=", 0.9,
         "x"),
        ("allowed p99 latency", p99.get("allowed"), "<=", 3.0, "ms"),
        ("denied p99 latency", p99.get("denied"), "<=", 3.0, "ms"),
        ("freshness p99 (produce -> snapshot)", freshness["total_ms"]["p99"], "<=", 100.0, "ms"),
    ]  # fmt: skip
    return [
        {"metric": metric, "value": round(value, 4), "target": f"{op} {target:g} {unit}",
         "pass": value >= target if op == ">=" else value <= target}
        for metric, value, op, target, unit in items
        if value is not None  # its scenarios did not run (--only)
    ]  # fmt: skip


def _render(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    parts = [report.table([
        report.machine_row(m),
        ("python / uvicorn / wrk", f"{m['python']} / uvicorn {m['uvicorn']} / {m['wrk']}"),
        ("postgresql / broker", f"{m['postgresql']} / {m['broker']}"),
        ("load", f"wrk -t{s['threads']} -c{s['connections']} -d{s['duration_seconds']}s "
                 f"(+{s['warmup_seconds']}s warmup) x {s['rounds']} rounds (order alternating), "
                 "1 uvicorn worker, "
                 f"QUOTA_ACCESS_LOG={s['access_log']}"),
        ("world", f"{s['world_events']:,} events through Kafka and the ledger"),
        ("ledger fetch wait", f"kafka_fetch_max_wait_ms={s['kafka_fetch_max_wait_ms']}"),
    ], "bench.authorize")]  # fmt: skip
    header = ["scenario", "conns", "req/s", "rounds' req/s", "p50 ms", "p90 ms", "p99 ms",
              "p99.9 ms", "holds/commit"]  # fmt: skip
    rows = [[row["label"], str(row["connections"]), f"{row['requests_per_second']:,.0f}",
             " ".join(f"{r:,.0f}" for r in row["rounds_rps"]),
             *(report.ms(row["latency_ms"].get(p)) for p in ("p50", "p90", "p99", "p99.9")),
             str(row["holds_per_commit"] or "")] for row in result["scenarios"]]  # fmt: skip
    parts.append(report.grid(header, rows, "HTTP scenarios (latency from wrk --latency)"))
    f, stats = result["freshness"], ("p50", "p90", "p99", "max", "mean")
    fresh = [["produce -> snapshot (total)", *(report.ms(f["total_ms"][k]) for k in stats)]]
    fresh += [[f"  {name.replace('_', ' ')}", *(report.ms(part[k]) for k in stats)]
              for name, part in f["components_ms"].items() if part is not None]  # fmt: skip
    title = f"Freshness over {f['events']:,} recharges produced one at a time"
    parts.append(report.grid(["freshness", *(f"{k} ms" for k in stats)], fresh, title))
    targets = [[t["metric"], f"{t['value']:.3f}", t["target"], "PASS" if t["pass"] else "MISS"]
               for t in result["targets"]]  # fmt: skip
    parts.append(report.grid(["target", "measured", "target", "result"], targets, "Targets"))
    checks = result["checks"]
    failed = sum(1 for c in checks if not c["ok"])
    shown = [[c["name"], "PASS" if c["ok"] else "FAIL", c["detail"][:100]] for c in checks
             if c["name"].startswith(("no overdraft", "no overshoot")) or not c["ok"]]  # fmt: skip
    title = f"No overdraft after the run, and any failed check ({failed} of {len(checks)} failed)"
    parts.append(report.grid(["check", "result", "detail"], shown, title))
    allowed = next((r for r in result["scenarios"] if r["name"] == "allowed"), None)
    if allowed is not None:
        parts.append(
            f"note: with {allowed['connections']} closed-loop connections, mean latency = "
            f"connections / rate (Little's law) = {allowed['littles_law_mean_ms']:.2f} ms for the"
            " allowed run; the 1-connection row shows the service time."
        )
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        binary = wrk.find_wrk()
    except wrk.WrkMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    result = run(args, "bench.authorize", lambda infra: _bench(args, infra, binary), _render)
    if not all(c["ok"] for c in result["checks"]):
        return 1
    return 2 if args.fail_on_miss and not all(t["pass"] for t in result["targets"]) else 0
