"""`python -m bench.fold`: options, the run in order, the report."""

from __future__ import annotations

import argparse
import functools
import uuid
from collections.abc import Sequence
from typing import Any, Final

from bench import report
from bench.fold.runs import check, producer_process, run_fold, run_raw
from bench.infra import Infra, arguments, remove_topic, run, say
from services.infra.processes import QuotaProcesses
from services.infra.topics import ensure_topic
from services.settings import Settings
from services.store import db

step = functools.partial(say, "bench.fold")


#: What each phase of the ledger's batch path covers (`services.store.phases`), and whether it
#: awaits PostgreSQL or the broker (wall time, overlapping the other task's CPU phases).
PHASES: Final = {
    "poll": ("getmany: aiokafka parses records, waits for fetches", True),
    "pick": ("the owned partitions' records as ingest.Incoming", False),
    "decode": ("ingest.decode_all: msgspec, canonical JSON, content hash", False),
    "lookup": ("duplicates: the ids already stored, SELECT", True),
    "screen": ("duplicates and id conflicts", False),
    "load": ("the rows the batch folds onto, SELECT", True),
    "fold": ("the pure fold", False),
    "chain": ("hash chain, the rows to COPY", False),
    "store": ("head lock, COPY events, upsert rows, head, offsets", True),
    "notify": ("pg_notify to the policies", True),
    "commit": ("COMMIT", True),
}
ORDER: Final = {name: i for i, name in enumerate(PHASES)}
NOTE: Final = """\
notes: both passes produce the same records from one confluent-kafka process to a fresh topic
whose consumer has already joined (as deployed: the ledger runs before events arrive), so the
join is in neither figure. The raw pass runs alone, not beside the fold: on 2 cores a raw
consumer running at the same time would take CPU from the fold it is compared with, and its own
rate would depend on the scheduler. "steady" counts from a pass's first batch to its last.
Phases: "cpu" ones run on the event loop without awaiting, exclusive of everything else; "wall"
ones await PostgreSQL or the broker, and as a batch commits while the next is polled and
decoded, the other task's cpu phases run meanwhile: they overlap those."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = arguments(
        "bench.fold",
        "The ledger's fold with policies listening against a plain Kafka consumer, from the "
        "first event produced (confluent-kafka, its own process) to the last applied.",
    )
    option = parser.add_argument
    option("--events", type=int, default=200_000, help="events to produce")
    option("--accounts", type=int, default=1_000, help="distinct account subjects")
    option("--partitions", type=int, default=4, help="partitions of the topic")
    option("--policies", type=int, default=2, help="`quota policy` processes listening")
    option("--batch-max-records", type=int, default=5_000, help="Settings.batch_max_records")
    option("--batch-timeout-ms", type=int, default=200, help="Settings.batch_timeout_ms")
    option("--raw-max-records", type=int, default=100_000, help="max_records of the raw getmany")
    option(
        "--session-timeout-ms",
        type=int,
        default=3_000,
        help="both consumers' session timeout (Tansu holds a group join for half of it)",
    )
    option("--target", type=float, default=0.35, help="target ratio fold/raw")
    option("--seed", type=int, default=1, help="workload random seed")
    option("--timeout", type=float, default=900.0, help="seconds per measured pass")
    option(
        "--fail-on-miss",
        action="store_true",
        help="exit 2 when the ratio (first produced to last applied) misses the target",
    )
    args = parser.parse_args(argv)
    for name in ("events", "accounts", "partitions", "batch_max_records", "raw_max_records"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.policies < 0 or args.session_timeout_ms < 1_000:
        parser.error("--policies must be at least 0, --session-timeout-ms at least 1000")
    return args


async def _bench(args: argparse.Namespace, infra: Infra) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:10]
    settings = Settings(
        database_url=infra.database_url, kafka_bootstrap=infra.bootstrap,
        topic=f"bench.fold.{suffix}", topic_partitions=args.partitions,
        consumer_group=f"bench-ledger-{suffix}", batch_max_records=args.batch_max_records,
        batch_timeout_ms=args.batch_timeout_ms,
        kafka_session_timeout_ms=args.session_timeout_ms, dev_mode=True,
    )  # fmt: skip
    raw_settings = settings.model_copy(
        update={"topic": f"bench.fold.raw.{suffix}", "consumer_group": f"bench-raw-{suffix}"}
    )
    await ensure_topic(infra.bootstrap, raw_settings.topic, args.partitions)
    fleet = QuotaProcesses(settings, args.workdir.resolve())
    for i in range(args.policies):
        (args.workdir / f"fold-policy-{i}.log").unlink(missing_ok=True)
    pool = await db.create_pool(infra.database_url, max_size=2)
    broker = {"tansu": [infra.broker_pid]} if infra.broker_pid else {}
    try:
        step(f"producer process: making {args.events:,} events over {args.accounts:,} accounts")
        async with producer_process(infra.bootstrap, args.events, args.accounts, args.seed) as p:
            step("raw: aiokafka getmany + json.loads, joined to a fresh topic; producing")
            raw = await run_raw(raw_settings, p, args.raw_max_records, args.timeout, broker)
            step(f"fold: the ledger app in this process, {args.policies} `quota policy` "
                 "processes listening; producing")  # fmt: skip
            try:
                fold = await run_fold(settings, p, fleet, args.policies, pool, args.timeout, broker)
            finally:
                fleet.close()
        totals = p.totals
        step("checking the projections; verify (chain and re-fold)")
        checks = await check(pool, args.events, totals["amount_sum"], totals["accounts"])
        head = await report.header("bench.fold", pool, infra)
    finally:
        await pool.close()
        if not infra.broker_started:
            groups = [settings.consumer_group, raw_settings.consumer_group]
            for topic in (settings.topic, raw_settings.topic):
                await remove_topic(infra.bootstrap, topic, groups)
    ratio = fold["events_per_second"] / raw["events_per_second"]
    steady = fold["events_per_second_steady"], raw["events_per_second_steady"]
    fold["phases"] = [
        {"phase": name, "seconds": seconds, "us_per_event": seconds / args.events * 1e6,
         "share": seconds / fold["seconds"]}
        for name, seconds in sorted(fold["phases"].items(), key=lambda p: ORDER.get(p[0], 99))
    ]  # fmt: skip
    return head | {
        "workload": {
            "events": args.events, "accounts": args.accounts, "partitions": args.partitions,
            "type": "quota.account.usage_recorded", "mode": "structured JSON, keyed by subject",
            "value_bytes_mean": totals["value_bytes_mean"], "producer": totals["client"],
        },
        "settings": {
            "batch_max_records": args.batch_max_records,
            "batch_timeout_ms": args.batch_timeout_ms, "raw_max_records": args.raw_max_records,
            "session_timeout_ms": args.session_timeout_ms, "policies": args.policies,
            "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        },
        "raw": raw,
        "fold": fold,
        "ratio": ratio,
        "ratio_steady": steady[0] / steady[1] if all(steady) else None,
        "target": args.target,
        "pass": ratio >= args.target,
        "checks": [{"name": name, "expected": expected, "actual": actual,
                    "ok": expected == actual} for name, expected, actual in checks],
    }  # fmt: skip


def _render(result: dict[str, Any]) -> str:
    m, w, s = result["machine"], result["workload"], result["settings"]
    raw, fold, policies = result["raw"], result["fold"], result["fold"]["policies"]
    failed = "; ".join(f"{c['name']} {c['actual']} != {c['expected']}"
                       for c in result["checks"] if not c["ok"])  # fmt: skip

    def verdict(ratio: float | None) -> str:
        if ratio is None:
            return "n/a (one batch)"
        return f"{ratio:.3f}x  ({'PASS' if ratio >= result['target'] else 'MISS'})"

    rows = [
        report.machine_row(m),
        ("python / postgresql", f"{m['python']} / {m['postgresql']}"),
        ("broker", m["broker"]),
        ("events", f"{w['events']:,} usage_recorded, {w['accounts']:,} accounts, "
                   f"{w['partitions']} partitions, {w['value_bytes_mean']} B/value"),
        ("producer", f"{w['producer']}, its own process, acks=all"),
        ("fold pass", f"ledger app in this process (batch_max_records={s['batch_max_records']}"
                      f"), {s['policies']} `quota policy` processes listening"),
        ("raw pass", "aiokafka getmany + json.loads in this process, the ledger's fetch "
                     "settings, alone"),
        ("group join (before producing)", f"raw {raw['join_seconds']:.1f}s, "
                                          f"ledger {fold['join_seconds']:.1f}s"),
        ("ratio fold/raw, first produced -> last applied", verdict(result["ratio"])),
        ("ratio fold/raw, steady (first batch -> last)", verdict(result["ratio_steady"])),
        ("target", f"{result['target']:.2f}x"),
        ("policy snapshots", f"all {policies['count']} at {policies['position']:,} "
                             f"{policies['after_ledger_ms']:.0f} ms after the ledger's last "
                             f"commit; <= {policies['max_events_behind']:,} events behind it"),
        ("correctness", f"FAILED: {failed}" if failed else f"ok ({len(result['checks'])} checks:"
                        " head, events, sums, accounts, no quarantine, verify)"),
    ]  # fmt: skip
    parts = [report.table(rows, "bench.fold")]
    header = ["pass", "seconds", "events/s", "steady ev/s", "batches", "produced in s"]

    def row(label: str, run: dict[str, Any]) -> list[str]:
        return [label, f"{run['seconds']:.2f}", report.rate(run["events_per_second"]),
                report.rate(run["events_per_second_steady"]), f"{run['batches']:,}",
                f"{run['produce_seconds']:.2f}"]  # fmt: skip

    reached = ["fold: both policy snapshots", f"{policies['seconds']:.2f}",
               report.rate(w["events"] / policies["seconds"]), "", "", ""]  # fmt: skip
    runs = [row("raw: consumed", raw), row("fold: ledger committed", fold), reached]
    parts.append(report.grid(header, runs, "From the first event produced to the last applied"))
    described = [(p, *PHASES.get(p["phase"], ("?", False))) for p in fold["phases"]]
    phases = [[f"{p['phase']} ({what})", "wall" if waits else "cpu", f"{p['seconds']:.3f}",
               f"{p['us_per_event']:.1f}", f"{p['share']:.0%}"]
              for p, what, waits in described]  # fmt: skip
    cpu_only = [p for p, _, waits in described if not waits]
    phases.append(["cpu phases, summed", "cpu", f"{sum(p['seconds'] for p in cpu_only):.3f}",
                   f"{sum(p['us_per_event'] for p in cpu_only):.1f}",
                   f"{sum(p['share'] for p in cpu_only):.0%}"])  # fmt: skip
    title = (
        f"The ledger's phases, measured over {fold['batches']:,} batches "
        f"(share: of its {fold['seconds']:.2f}s from the first produced to the last applied)"
    )
    header = ["phase", "time", "seconds", "µs/event", "share"]
    parts.append(report.grid(header, phases, title))
    names = list(dict.fromkeys([*raw["cpu_share"], *fold["cpu_share"]]))
    cpu = [[name, *(report.percent(run["cpu_share"].get(name)) for run in (raw, fold))]
           for name in names]  # fmt: skip
    title = "CPU share of one core over each pass (/proc/<pid>/stat)"
    parts.append(report.grid(["process", "raw pass", "fold pass"], cpu, title))
    return "\n\n".join([*parts, NOTE])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args, "bench.fold", lambda infra: _bench(args, infra), _render)
    if not all(c["ok"] for c in result["checks"]):
        return 1
    return 2 if args.fail_on_miss and not result["pass"] else 0
