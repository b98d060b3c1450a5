"""`python -m bench.replay`: store the history, time check and rebuild, report."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg

from bench import report
from bench.infra import Infra, arguments, run, say
from bench.replay.workload import random_events, store_events
from services.ledger.audit import compare_states
from services.ledger.replay import ReplayReport, replay
from services.settings import asyncpg_dsn
from services.store import db, projections

TARGET: Final = 200_000
#: The phases `ReplayReport.phases` names: re-fold (the chain checked alongside), compare with
#: the live rows, swap the rebuilt rows in.
PHASES: Final = ("refold", "compare", "swap")
CHECK, REBUILD, PURE = "replay --check", "replay (rebuild + swap)", "pure re-fold --check"

step = functools.partial(say, "bench.replay")


async def _run(
    events: int, accounts: int, pure: bool, ok: dict[str, bool], infra: Infra
) -> dict[str, Any]:
    """The JSON result; `ok` gets per run whether it is sound (a rebuild repairs what differs)."""
    url = infra.database_url
    conn = await asyncpg.connect(asyncpg_dsn(url))
    await db.init_connection(conn)
    try:
        t0 = time.perf_counter()
        async with conn.transaction():
            state, stored = await store_events(conn, random_events(events, accounts))
        await conn.execute("ANALYZE")
        generate = time.perf_counter() - t0
        step(f"stored {stored:,} events in {generate:.1f}s")
        version: str = await conn.fetchval("SHOW server_version")
        runs: dict[str, ReplayReport] = {}
        runs[CHECK] = check = await replay(conn, check=True, dsn=asyncpg_dsn(url))
        step(f"check: {check.seconds:.2f}s ok={check.ok}")
        await conn.execute("UPDATE accounts SET balance = balance + 1 WHERE account_id IN "
                           "(SELECT account_id FROM accounts LIMIT 10)")  # fmt: skip
        runs[REBUILD] = rebuild = await replay(conn, check=False, dsn=asyncpg_dsn(url))
        step(f"rebuild: {rebuild.seconds:.2f}s repaired {len(rebuild.differences)}")
        identical = compare_states(state, await projections.load_all(conn)) == []
        if pure:
            runs[PURE] = await replay(conn, check=True, accelerated=False)
            step(f"pure check: {runs[PURE].seconds:.2f}s")
    finally:
        await conn.close()
    ok.update({label: run.ok or label == REBUILD for label, run in runs.items()})
    return {
        "when": datetime.now(UTC).isoformat(),
        "machine": report.machine(version, infra.postgres_kind, "none (event store only)"),
        "events": stored,
        "accounts": accounts,
        "generate_seconds": generate,
        "identical": identical,
        "runs": {label: {"seconds": round(run.seconds, 2),
                         "events_per_second": float(round(stored / run.seconds))}
                 for label, run in runs.items()},
        "head_hash": rebuild.head_hash,
        "phases": {"check": check.phases, "rebuild": rebuild.phases},
    }  # fmt: skip


def _render(result: dict[str, Any], ok: dict[str, bool]) -> str:
    events, runs = result["events"], result["runs"]
    rows = [[label, f"{run['seconds']:.2f}", report.rate(run["events_per_second"]),
             "yes" if ok[label] else "NO"] for label, run in runs.items()]  # fmt: skip
    title = (f"replay of {events:,} events over {result['accounts']:,} accounts "
             f"(target >= {TARGET:,} events/s)")  # fmt: skip
    phases = [[label, *(f"{part[name]:.2f}" if name in part else "-" for name in PHASES)]
              for label, part in ((CHECK, result["phases"]["check"]),
                                  (REBUILD, result["phases"]["rebuild"]))]  # fmt: skip
    return "\n".join([
        report.machine_table(result["machine"]),
        report.grid(["run", "seconds", "events/s", "ok"], rows, title),
        report.grid(["run", *(f"{name} s" for name in PHASES)], phases, "where the time goes"),
        f"rebuilt projections identical to the generator's fold: {result['identical']}",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = arguments("bench.replay", __doc__ or "", broker=False)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--pure", action="store_true", help="also time the pure re-fold")
    args = parser.parse_args(argv)
    ok: dict[str, bool] = {}
    measure = functools.partial(_run, args.events, args.accounts, args.pure, ok)
    result = run(args, "bench.replay", measure, functools.partial(_render, ok=ok), broker=False)
    return 0 if result["identical"] and ok[CHECK] else 1
