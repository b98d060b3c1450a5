"""`python -m bench.fold`: options, the run in order, the report."""

from __future__ import annotations

import argparse
import functools
import uuid
from collections.abc import Sequence
from typing import Any

from bench import report
from bench.fold.runs import check, produce, run_fold, run_raw
from bench.infra import Infra, arguments, remove_topic, run, say
from services.infra.topics import ensure_topic
from services.settings import Settings
from services.store import db

step = functools.partial(say, "bench.fold")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = arguments(
        "bench.fold", "Fold throughput of the ledger consumer against a plain Kafka consumer."
    )
    option = parser.add_argument
    option("--events", type=int, default=200_000, help="events to produce")
    option("--accounts", type=int, default=1_000, help="distinct account subjects")
    option("--partitions", type=int, default=4, help="partitions of the topic")
    option("--batch-max-records", type=int, default=5_000, help="Settings.batch_max_records")
    option("--batch-timeout-ms", type=int, default=200, help="Settings.batch_timeout_ms")
    option("--raw-max-records", type=int, default=100_000, help="max_records of the raw getmany")
    option("--pool-size", type=int, default=10, help="asyncpg pool max_size")
    option("--target", type=float, default=0.35, help="target ratio fold/raw")
    option("--seed", type=int, default=1, help="workload random seed")
    option("--timeout", type=float, default=900.0, help="seconds per measured run")
    option("--fail-on-miss", action="store_true", help="exit 2 when the ratio misses the target")
    args = parser.parse_args(argv)
    for name in ("events", "accounts", "partitions", "batch_max_records", "raw_max_records"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


async def _bench(args: argparse.Namespace, infra: Infra) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:10]
    topic = f"bench.fold.{suffix}"
    raw_group, ledger_group = f"bench-raw-{suffix}", f"bench-ledger-{suffix}"
    await ensure_topic(infra.bootstrap, topic, args.partitions)
    try:
        step(f"producing {args.events:,} events over {args.accounts:,} accounts")
        produced = await produce(infra.bootstrap, topic, args.events, args.accounts, args.seed)
        step(f"produced in {produced.seconds:.1f}s; raw: getmany + json.loads")
        raw = await run_raw(
            infra.bootstrap, topic, raw_group, args.events, args.raw_max_records, args.timeout
        )
        pool = await db.create_pool(infra.database_url, max_size=args.pool_size)
        try:
            settings = Settings(
                database_url=infra.database_url, kafka_bootstrap=infra.bootstrap, topic=topic,
                topic_partitions=args.partitions, consumer_group=ledger_group,
                batch_max_records=args.batch_max_records,
                batch_timeout_ms=args.batch_timeout_ms, dev_mode=True,
            )  # fmt: skip
            step(f"fold: LedgerConsumer, batch_max_records={args.batch_max_records}")
            fold = await run_fold(settings, pool, args.events, args.timeout)
            step("checking the projections; verify (chain and re-fold)")
            checks = await check(pool, args.events, produced.amount_sum, len(produced.accounts))
            head = await report.header("bench.fold", pool, infra)
        finally:
            await pool.close()
    finally:
        if not infra.broker_started:
            await remove_topic(infra.bootstrap, topic, [raw_group, ledger_group])
    raw_d, fold_d = raw.as_dict(), fold.as_dict()
    ratio = fold_d["events_per_second_post_join"] / raw_d["events_per_second_post_join"]
    return head | {
        "workload": {
            "events": args.events, "accounts": args.accounts, "partitions": args.partitions,
            "type": "quota.account.usage_recorded", "mode": "structured JSON, keyed by subject",
            "produce_seconds": round(produced.seconds, 3),
            "value_bytes_mean": round(produced.value_bytes / produced.events),
        },
        "settings": {
            "batch_max_records": args.batch_max_records,
            "batch_timeout_ms": args.batch_timeout_ms,
            "raw_max_records": args.raw_max_records, "pool_size": args.pool_size,
        },
        "raw": raw_d,
        "fold": fold_d | {
            "batch_ms": report.summarize([s * 1000 for s in fold.batch_seconds]),
            "batch_seconds_sum": sum(fold.batch_seconds),
        },
        "ratio": ratio,
        "ratio_e2e": fold_d["events_per_second_e2e"] / raw_d["events_per_second_e2e"],
        "target": args.target,
        "pass": ratio >= args.target,
        "checks": [{"name": name, "expected": expected, "actual": actual,
                    "ok": expected == actual} for name, expected, actual in checks],
    }  # fmt: skip


def _render(result: dict[str, Any]) -> str:
    m, w, s = result["machine"], result["workload"], result["settings"]
    raw, fold = result["raw"], result["fold"]
    failed = "; ".join(f"{c['name']} {c['actual']} != {c['expected']}"
                       for c in result["checks"] if not c["ok"])  # fmt: skip

    def rates(run: dict[str, Any]) -> str:
        return (
            f"{report.rate(run['events_per_second_post_join'])}   (incl. group join: "
            f"{report.rate(run['events_per_second_e2e'])}; join {run['join_seconds']:.2f}s)"
        )

    rows = [
        report.machine_row(m),
        ("python / postgresql", f"{m['python']} / {m['postgresql']}"),
        ("broker", m["broker"]),
        ("events", f"{w['events']:,} usage_recorded, {w['accounts']:,} accounts, "
                   f"{w['partitions']} partitions, {w['value_bytes_mean']} B/value"),
        ("fold settings", f"batch_max_records={s['batch_max_records']}, "
                          f"batch_timeout_ms={s['batch_timeout_ms']}"),
        ("raw events/s", rates(raw)),
        ("fold events/s", rates(fold)),
        ("ratio fold/raw", f"{result['ratio']:.3f}x   (incl. group join: "
                           f"{result['ratio_e2e']:.3f}x)"),
        ("target", f"{result['target']:.2f}x: {'PASS' if result['pass'] else 'MISS'}"),
        ("correctness", f"FAILED: {failed}" if failed else f"ok ({len(result['checks'])} checks)"),
    ]  # fmt: skip
    parts = [report.table(rows, "bench.fold (rates exclude consumer-group join time)")]
    busy = fold["seconds_post_join"]
    batch = fold["batch_ms"]
    parts.append(report.table([
        ("python CPU busy (this process)", f"raw {raw['process_cpu_share_post_join']:.0%}, "
                                           f"fold {fold['process_cpu_share_post_join']:.0%}"),
        ("batches", f"{fold['batches']:,}, {fold['events'] / fold['batches']:,.0f} events each"),
        ("batch decode start -> commit", f"p50 {batch['p50']:.1f} ms, p99 {batch['p99']:.1f} ms, "
                                         f"sum {fold['batch_seconds_sum']:.2f}s of {busy:.2f}s "
                                         "(the next batch decodes during a commit)"),
    ], "Where the fold's time goes"))  # fmt: skip
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args, "bench.fold", lambda infra: _bench(args, infra), _render)
    if not all(c["ok"] for c in result["checks"]):
        return 1
    return 2 if args.fail_on_miss and not result["pass"] else 0
