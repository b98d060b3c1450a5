"""`python -m bench.fold`: options, the run in order, the report."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from bench import report
from bench.fold.micro import per_event_costs
from bench.fold.phases import PhaseTimer, instrument_ledger
from bench.fold.runs import FoldRun, Timeline, run_fold, run_raw, verify
from bench.fold.workload import produce
from bench.infra import Infra, add_infra_arguments, infrastructure, remove_topic
from services.infra.topics import ensure_topic
from services.ledger import repository as repo
from services.settings import Settings

#: Phases in display order: (timer name, label). Indentation shows what contains what.
PHASE_ROWS: tuple[tuple[str, str], ...] = (
    ("kafka.getmany", "kafka getmany (wait for fetch + unpack)"),
    ("ledger._prepare", "LedgerConsumer._prepare (select records, decode in chunks)"),
    ("decode_all", "  ingest.decode_all (parse, CloudEvent, pydantic)"),
    ("ledger._commit", "LedgerConsumer._commit (one transaction; overlaps the next _prepare)"),
    ("apply_batch", "  ingest.apply_batch"),
    ("sql.lock_head", "    SQL lock_head (SELECT .. FOR UPDATE)"),
    ("sql.stored_content_hashes", "    SQL stored_content_hashes (= ANY ids)"),
    ("sql.load_state", "    SQL load_state (accounts FOR UPDATE)"),
    ("fold", "    fold (pure Python)"),
    ("python.apply_batch", "    Python in apply_batch (screen, _keys, hashes, tuples)"),
    ("sql.append_events", "    SQL append_events (COPY event_store)"),
    ("sql.write_changes", "    SQL write_changes (unnest upsert accounts)"),
    ("sql.quarantine", "    SQL quarantine"),
    ("sql.write_head", "    SQL write_head"),
    ("sql.commit_offsets", "    SQL commit_offsets (UPDATE per partition)"),
    ("sql.notify_changes", "    SQL notify_changes"),
    ("other", "other (event loop, fetcher callbacks)"),
    ("gc.gen0", "(overlapping the above) gc pauses, generation 0"),
    ("gc.gen1", "(overlapping the above) gc pauses, generation 1"),
    ("gc.gen2", "(overlapping the above) gc pauses, generation 2"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fold",
        description="Fold throughput of the ledger consumer against a plain Kafka consumer.",
    )
    parser.add_argument("--events", type=int, default=200_000, help="events to produce")
    parser.add_argument("--accounts", type=int, default=1_000, help="distinct account subjects")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the topic")
    parser.add_argument(
        "--batch-max-records", type=int, default=5_000, help="Settings.batch_max_records"
    )
    parser.add_argument(
        "--batch-timeout-ms", type=int, default=200, help="Settings.batch_timeout_ms"
    )
    parser.add_argument(
        "--raw-max-records", type=int, default=100_000, help="max_records of the raw getmany"
    )
    parser.add_argument("--pool-size", type=int, default=10, help="asyncpg pool max_size")
    add_infra_arguments(parser, result="fold.json")
    parser.add_argument("--target", type=float, default=0.35, help="target ratio fold/raw")
    parser.add_argument("--seed", type=int, default=1, help="workload random seed")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measured run")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the fold under cProfile (slower; writes WORKDIR/fold.pstats, prints the top)",
    )
    parser.add_argument("--profile-top", type=int, default=30, help="rows of the profile shown")
    parser.add_argument("--no-phases", action="store_true", help="do not time the fold's phases")
    parser.add_argument(
        "--no-micro", action="store_true", help="skip the per-event CPU cost measurements"
    )
    parser.add_argument(
        "--gc-threshold",
        default=None,
        metavar="G0[,G1[,G2]]",
        help="gc.set_threshold for the whole run (an experiment knob; default: Python's)",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() just before the fold starts (an experiment knob)",
    )
    parser.add_argument(
        "--fail-on-miss", action="store_true", help="exit 2 when the ratio misses the target"
    )
    args = parser.parse_args(argv)
    if args.gc_threshold is not None:
        try:
            args.gc_threshold = tuple(int(part) for part in args.gc_threshold.split(","))
        except ValueError:
            parser.error("--gc-threshold takes one to three integers, e.g. 50000,20,100")
        if not 1 <= len(args.gc_threshold) <= 3:
            parser.error("--gc-threshold takes one to three integers, e.g. 50000,20,100")
    for name in ("events", "accounts", "partitions", "batch_max_records", "raw_max_records"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _code_version() -> dict[str, Any]:
    """The commit benchmarked and the files under services/ that differ from it."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        # Only trailing whitespace: porcelain lines start with a status column (" M path").
        return done.stdout.rstrip() if done.returncode == 0 else ""

    status = git("status", "--porcelain", "--", "services", "migrations")
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
        "changed": [line[3:] for line in status.splitlines() if line.strip()],
    }


def _step(message: str) -> None:
    print(f"[bench.fold] {message}", file=sys.stderr, flush=True)


async def _postgres_facts(pool: Any) -> dict[str, str]:
    async with pool.acquire() as conn:
        facts = {}
        for setting in ("server_version", "synchronous_commit", "fsync", "shared_buffers"):
            facts[setting] = str(await conn.fetchval(f"SHOW {setting}"))
    return facts


def _phase_table(fold: FoldRun, timer: PhaseTimer) -> tuple[list[dict[str, Any]], str]:
    line = fold.timeline
    assert line.last is not None
    window = line.last - (line.assigned or line.started)
    phases = {name: phase.seconds for name, phase in timer.phases.items()}
    calls = {name: phase.calls for name, phase in timer.phases.items()}
    inner = [name for name in phases if name.startswith("sql.") or name == "fold"]
    if "apply_batch" in phases:
        phases["python.apply_batch"] = phases["apply_batch"] - sum(phases[n] for n in inner)
        calls["python.apply_batch"] = calls["apply_batch"]
    phases["other"] = window - phases.get("kafka.getmany", 0.0) - phases.get("ledger._commit", 0.0)
    rows: list[dict[str, Any]] = []
    printed: list[list[str]] = []
    for name, label in PHASE_ROWS:
        if name not in phases:
            continue
        seconds = phases[name]
        row = {
            "phase": name,
            "calls": calls.get(name),
            "seconds": round(seconds, 4),
            "percent_of_window": round(100 * seconds / window, 1),
            "micros_per_event": round(seconds / line.events * 1e6, 2),
        }
        rows.append(row)
        printed.append(
            [
                label,
                str(calls.get(name, "")),
                f"{seconds:.3f}",
                f"{row['percent_of_window']:.1f}%",
                f"{row['micros_per_event']:.2f}",
            ]
        )
    text = report.grid(
        ["phase (window: assignment -> last commit)", "calls", "s", "% window", "µs/event"],
        printed,
        title=f"Where the fold's time goes ({window:.2f}s window, {line.events:,} events)",
    )
    return rows, text


def _profile_text(profiler: cProfile.Profile, path: Path, top: int) -> str:
    profiler.dump_stats(str(path))
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    out.write("\n")
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


async def _bench(args: argparse.Namespace, infra: Infra, workdir: Path) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:10]
    topic = f"bench.fold.{suffix}"
    raw_group, ledger_group = f"bench-raw-{suffix}", f"bench-ledger-{suffix}"
    await ensure_topic(infra.bootstrap, topic, args.partitions)
    try:
        _step(f"producing {args.events:,} events over {args.accounts:,} accounts to {topic}")
        produced = await produce(infra.bootstrap, topic, args.events, args.accounts, args.seed)
        _step(
            f"produced in {produced.seconds:.1f}s "
            f"({produced.events / produced.seconds:,.0f}/s, "
            f"{produced.value_bytes / produced.events:.0f} B/value)"
        )

        _step("raw baseline: aiokafka getmany + json.loads")
        raw = await run_raw(
            infra.bootstrap, topic, raw_group, args.events, args.raw_max_records, args.timeout
        )

        pool = await repo.create_pool(infra.database_url, max_size=args.pool_size)
        try:
            pg = await _postgres_facts(pool)
            settings = Settings(
                database_url=infra.database_url,
                kafka_bootstrap=infra.bootstrap,
                topic=topic,
                topic_partitions=args.partitions,
                consumer_group=ledger_group,
                batch_max_records=args.batch_max_records,
                batch_timeout_ms=args.batch_timeout_ms,
                dev_mode=True,
            )
            timer = PhaseTimer()
            if not args.no_phases:
                instrument_ledger(timer)
            profiler = cProfile.Profile() if args.profile else None
            _step(
                f"fold: LedgerConsumer, batch_max_records={args.batch_max_records}"
                + (" (under cProfile)" if profiler else "")
            )
            if args.gc_freeze:
                gc.collect()
                gc.freeze()
            try:
                fold = await run_fold(settings, pool, args.events, args.timeout, timer, profiler)
            finally:
                timer.restore()
            _step("verifying the projections and the hash chain")
            checks = await verify(pool, args.events, produced.amount_sum, len(produced.accounts))
        finally:
            await pool.close()
    finally:
        if not infra.broker_started:
            await remove_topic(infra.bootstrap, topic, [raw_group, ledger_group])

    costs = [] if args.no_micro else per_event_costs(produced.sample)
    return _result(args, infra, pg, produced.seconds, raw, fold, timer, checks, costs,
                   profiler, workdir)  # fmt: skip


def _result(
    args: argparse.Namespace,
    infra: Infra,
    pg: dict[str, str],
    produce_seconds: float,
    raw: Timeline,
    fold: FoldRun,
    timer: PhaseTimer,
    checks: Sequence[Any],
    costs: Sequence[Any],
    profiler: cProfile.Profile | None,
    workdir: Path,
) -> dict[str, Any]:
    raw_rate, fold_rate = raw.rate_post_join(), fold.timeline.rate_post_join()
    ratio = fold_rate / raw_rate
    ratio_e2e = fold.timeline.rate_e2e() / raw.rate_e2e()
    machine = report.machine(pg["server_version"], infra.postgres_kind, infra.broker)
    phase_rows, phase_text = ([], "") if args.no_phases else _phase_table(fold, timer)
    profile_text = ""
    if profiler is not None:
        profile_text = _profile_text(profiler, workdir / "fold.pstats", args.profile_top)
    return {
        "benchmark": "bench.fold",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "code": _code_version(),
        "postgresql_settings": pg,
        "workload": {
            "events": args.events,
            "accounts": args.accounts,
            "partitions": args.partitions,
            "type": "quota.account.usage_recorded",
            "mode": "structured JSON, keyed by subject",
            "produce_seconds": round(produce_seconds, 3),
        },
        "settings": {
            "batch_max_records": args.batch_max_records,
            "batch_timeout_ms": args.batch_timeout_ms,
            "raw_max_records": args.raw_max_records,
            "pool_size": args.pool_size,
            "profiled": profiler is not None,
            "phases_timed": not args.no_phases,
            "gc_threshold": list(gc.get_threshold()),
            "gc_freeze": args.gc_freeze,
        },
        "raw": raw.as_dict(),
        "fold": {
            **fold.timeline.as_dict(),
            "batches_without_progress": fold.failed_batches,
            "stale_records_refetched": fold.stale_records,
            "consumer_start_seconds": fold.consumer_started,
        },
        "ratio": ratio,
        "ratio_e2e": ratio_e2e,
        "target": args.target,
        "pass": ratio >= args.target,
        "checks": [
            {"name": c.name, "expected": c.expected, "actual": c.actual, "ok": c.ok} for c in checks
        ],
        "phases": phase_rows,
        "per_event_costs": [
            {
                "step": c.step.strip(),
                "micros_per_event": round(c.micros_per_event, 3),
                "note": c.note,
            }
            for c in costs
        ],
        "_text": {"phases": phase_text, "profile": profile_text, "costs": costs},
    }


def _describe_code(code: dict[str, Any]) -> str:
    changed = code["changed"]
    if not changed:
        return str(code["commit"])
    return f"{code['commit']} + {len(changed)} changed files in services/ or migrations/"


def _share(run: dict[str, Any]) -> str:
    share = run.get("process_cpu_share_post_join")
    return "n/a" if share is None else f"{100 * share:.0f}%"


def _print(result: dict[str, Any]) -> None:
    m, w, s = result["machine"], result["workload"], result["settings"]
    raw, fold = result["raw"], result["fold"]
    failed = [c for c in result["checks"] if not c["ok"]]
    correctness = (
        f"ok ({len(result['checks'])} checks)"
        if not failed
        else "FAILED: " + "; ".join(f"{c['name']} {c['actual']} != {c['expected']}" for c in failed)
    )
    rows = [
        ("machine", f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM"),
        ("python", m["python"]),
        ("postgresql", f"{m['postgresql']} ({m['postgresql_kind']})"),
        ("broker", m["broker"]),
        ("code", _describe_code(result["code"])),
        (
            "events",
            f"{w['events']:,} usage_recorded, {w['accounts']:,} accounts, "
            f"{w['partitions']} partitions",
        ),
        (
            "fold settings",
            f"batch_max_records={s['batch_max_records']}, "
            f"batch_timeout_ms={s['batch_timeout_ms']}"
            + (", under cProfile" if s["profiled"] else "")
            + (f", gc threshold {s['gc_threshold']}" if s["gc_threshold"] != [700, 10, 10] else "")
            + (", gc.freeze() before the fold" if s["gc_freeze"] else ""),
        ),
        (
            "raw events/s",
            f"{report.rate(raw['events_per_second_post_join'])}   "
            f"(incl. group join: {report.rate(raw['events_per_second_e2e'])}; "
            f"join {raw['join_seconds'] or 0:.2f}s)",
        ),
        (
            "fold events/s",
            f"{report.rate(fold['events_per_second_post_join'])}   "
            f"(incl. group join: {report.rate(fold['events_per_second_e2e'])}; "
            f"from 1st commit: {report.rate(fold['events_per_second_steady'])}; "
            f"join {fold['join_seconds'] or 0:.2f}s)",
        ),
    ]
    if fold["stale_records_refetched"]:
        refetched = fold["stale_records_refetched"]
        rows.append(("fold refetch", f"{refetched:,} applied records fetched again, skipped"))
    rows += [
        ("python CPU busy", f"raw {_share(raw)}, fold {_share(fold)} (this process, post-join)"),
        (
            "ratio fold/raw",
            f"{result['ratio']:.3f}x   (incl. group join: {result['ratio_e2e']:.3f}x)",
        ),
        ("target", f"{result['target']:.2f}x"),
        ("result", "PASS" if result["pass"] else "MISS"),
        ("correctness", correctness),
    ]
    print()
    print(report.table(rows, title="bench.fold (rates exclude consumer-group join time)"))
    text = result["_text"]
    if text["phases"]:
        print()
        print(text["phases"])
    if text["costs"]:
        print()
        print(
            report.grid(
                ["step", "µs/event", "what"],
                [[c.step, f"{c.micros_per_event:.2f}", c.note] for c in text["costs"]],
                title="Per-event CPU cost of the in-Python steps (best of 3, on produced values)",
            )
        )
    if text["profile"]:
        print()
        print(text["profile"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    workdir: Path = args.workdir
    output: Path = args.output or workdir / "fold.json"
    if args.gc_threshold is not None:
        gc.set_threshold(*args.gc_threshold)
    started = time.perf_counter()
    with infrastructure(workdir, args.database_url, args.kafka_bootstrap) as infra:
        result = asyncio.run(_bench(args, infra, workdir))
    _print(result)
    text = result.pop("_text")
    if text["profile"]:
        result["profile_stats"] = str(workdir / "fold.pstats")
    report.write_json(output, result)
    print(f"\nwrote {output} ({time.perf_counter() - started:.0f}s in all)")
    if not all(check["ok"] for check in result["checks"]):
        return 1
    if args.fail_on_miss and not result["pass"]:
        return 2
    return 0
