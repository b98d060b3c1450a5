"""`python -m bench.replay`: store the history, time check and rebuild, report."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bench import report
from bench.infra import add_infra_arguments, infrastructure, say
from bench.replay.workload import random_events, store_events
from services.ledger.audit import compare_states
from services.ledger.replay import replay
from services.settings import asyncpg_dsn
from services.store import db, projections

TARGET = 200_000
#: The phases `ReplayReport.phases` names: re-fold (the chain checked alongside), compare with
#: the live rows, swap the rebuilt rows in.
PHASES = ("refold", "compare", "swap")


async def _run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    await db.init_connection(conn)
    try:
        t0 = time.perf_counter()
        async with conn.transaction():
            state, stored = await store_events(conn, random_events(args.events, args.accounts))
        await conn.execute("ANALYZE")
        generate = time.perf_counter() - t0
        say("bench.replay", f"stored {stored:,} events in {generate:.1f}s")
        version: str = await conn.fetchval("SHOW server_version")
        check = await replay(conn, check=True, dsn=asyncpg_dsn(url))
        say("bench.replay", f"check: {check.seconds:.2f}s ok={check.ok}")
        await conn.execute("UPDATE accounts SET balance = balance + 1 WHERE account_id IN "
                           "(SELECT account_id FROM accounts LIMIT 10)")  # fmt: skip
        rebuild = await replay(conn, check=False, dsn=asyncpg_dsn(url))
        say("bench.replay", f"rebuild: {rebuild.seconds:.2f}s repaired {len(rebuild.differences)}")
        identical = compare_states(state, await projections.load_all(conn)) == []
        pure = None
        if args.pure:
            pure = await replay(conn, check=True, accelerated=False)
            say("bench.replay", f"pure check: {pure.seconds:.2f}s")
    finally:
        await conn.close()
    return {
        "version": version,
        "events": stored,
        "generate_seconds": generate,
        "check": check,
        "rebuild": rebuild,
        "pure": pure,
        "identical": identical,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--pure", action="store_true", help="also time the pure re-fold")
    add_infra_arguments(parser, broker=False)
    args = parser.parse_args(argv)
    with infrastructure(
        args.workdir, args.database_url, None, bench="bench.replay", broker=False
    ) as infra:
        result = asyncio.run(_run(infra.database_url, args))
    machine = report.machine(result["version"], infra.postgres_kind, "none (event store only)")
    events = result["events"]
    rows: list[list[str]] = []
    for label, run in (("replay --check", result["check"]), ("replay (rebuild + swap)",
                       result["rebuild"]), ("pure re-fold --check", result["pure"])):  # fmt: skip
        if run is not None:
            rows.append([label, f"{run.seconds:.2f}", report.rate(events / run.seconds),
                         "yes" if run.ok or label.startswith("replay (") else "NO"])  # fmt: skip
    print(report.table([(k, str(v)) for k, v in machine.items()], title="machine"))
    print(report.grid(["run", "seconds", "events/s", "ok"], rows,
                      title=f"replay of {events:,} events over {args.accounts:,} accounts "
                            f"(target >= {TARGET:,} events/s)"))  # fmt: skip
    phase_rows = [
        [label, *(f"{run.phases[name]:.2f}" if name in run.phases else "-" for name in PHASES)]
        for label, run in (("replay --check", result["check"]),
                           ("replay (rebuild + swap)", result["rebuild"]))
    ]  # fmt: skip
    print(report.grid(["run", *(f"{name} s" for name in PHASES)], phase_rows,
                      title="where the time goes"))  # fmt: skip
    print(f"rebuilt projections identical to the generator's fold: {result['identical']}")
    out = {
        "when": datetime.now(UTC).isoformat(),
        "machine": machine,
        "events": events,
        "accounts": args.accounts,
        "generate_seconds": result["generate_seconds"],
        "identical": result["identical"],
        "runs": {label: {"seconds": float(s), "events_per_second": float(r.replace(",", ""))}
                 for label, s, r, _ in rows},
        "head_hash": result["rebuild"].head_hash,
        "phases": {"check": result["check"].phases, "rebuild": result["rebuild"].phases},
    }  # fmt: skip
    report.write_json(args.workdir / "replay.json", out)
    return 0 if result["identical"] and result["check"].ok else 1
