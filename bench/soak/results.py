"""The soak's numbers: per-interval tables, RSS growth, p99 recovery after each fault, targets."""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any, Final

from bench.report import grid, ms, percentile, table
from bench.soak.load import DECISIONS, Record

SERVICES: Final = ("ledger", "policy-a", "policy-b")
#: Recovery: 5-s buckets after a fault against the p99 of the 30 s before it.
BUCKET: Final = 5.0
PRE_FAULT_WINDOW: Final = 30.0
RECOVERY_TARGET: Final = 30.0
RSS_GROWTH_TARGET: Final = 10.0

#: One RSS sample: (seconds after the start, process name, KiB).
RssSample = tuple[float, str, int]


def is_error(status: str) -> bool:
    return status.startswith(("ERR", "5"))


def _stats(rows: Sequence[Record]) -> dict[str, Any]:
    latencies = [r[3] for r in rows]
    return {
        "n": len(rows),
        "p50_ms": percentile(latencies, 50) if rows else None,
        "p99_ms": percentile(latencies, 99) if rows else None,
        "errors": sum(1 for r in rows if is_error(r[2])),
    }


def intervals(records: Sequence[Record], width: float, duration: float) -> list[dict[str, Any]]:
    """Per interval: latency of check-only and hold decisions, the driver's lag, and each
    (kind, status) count."""
    count = max(1, math.ceil(duration / width))
    groups: list[defaultdict[str, list[Record]]] = [defaultdict(list) for _ in range(count)]
    statuses: list[Counter[str]] = [Counter() for _ in range(count)]
    for record in records:
        index = min(int(record[0] // width), count - 1)
        groups[index][record[1]].append(record)
        if record[1] != "lag":
            statuses[index][f"{record[1]} {record[2]}"] += 1
    return [
        {"from_s": i * width, **{k: _stats(groups[i][k]) for k in (*DECISIONS, "lag")},
         "statuses": dict(sorted(statuses[i].items()))}
        for i in range(count)
    ]  # fmt: skip


def rss(
    samples: Sequence[RssSample], width: float, duration: float, warmup: float
) -> dict[str, Any]:
    """RSS in MiB per interval (its last sample) and the growth from warm-up's end to the end."""
    names = list(dict.fromkeys(name for _, name, _ in samples))
    count = max(1, math.ceil(duration / width))
    per_interval: list[dict[str, float | None]] = [dict.fromkeys(names) for _ in range(count)]
    growth: dict[str, dict[str, float]] = {}
    for t, name, kib in samples:
        per_interval[min(int(t // width), count - 1)][name] = round(kib / 1024, 1)
    for name in names:
        series = [(t, kib) for t, n, kib in samples if n == name]
        base = next((kib for t, kib in series if t >= warmup), None)
        if base:
            last = series[-1][1]
            growth[name] = {"after_warmup_mib": round(base / 1024, 1),
                            "end_mib": round(last / 1024, 1),
                            "growth_pct": round((last - base) / base * 100, 2)}  # fmt: skip
    return {"per_interval": per_interval, "growth": growth}


def _bucket(
    rows: Sequence[Record], dues: Sequence[float], lo: float, hi: float, before: float = math.inf
) -> dict[str, Any]:
    """The stats of `rows` due in [lo, hi) (sorted; `dues` their times) answered before `before`."""
    cut = rows[bisect.bisect_left(dues, lo) : bisect.bisect_left(dues, hi)]
    return {"from_s": round(lo, 1), **_stats([r for r in cut if r[0] + r[3] / 1000 < before])}


def recovery(
    records: Sequence[Record], faults: Sequence[dict[str, Any]], warmup: float, duration: float
) -> list[dict[str, Any]]:
    """Per fault and decision kind: the pre-fault level (the highest p99 and error share of the
    5-s buckets of the 30 s before it, after warm-up and the previous recovery, of decisions
    answered before it), and the seconds from its end to the first 5-s bucket back within that
    level (None: not before the next fault or the end of the load)."""
    out: list[dict[str, Any]] = []
    settled = dict.fromkeys(DECISIONS, warmup)
    for number, fault in enumerate(faults):
        start, end = fault["start_s"], fault["end_s"]
        limit = faults[number + 1]["start_s"] if number + 1 < len(faults) else duration
        entry: dict[str, Any] = {"fault": fault["name"]}
        for kind in DECISIONS:
            mine = sorted(r for r in records if r[1] == kind)
            dues = [r[0] for r in mine]
            begin = max(settled[kind], start - PRE_FAULT_WINDOW)
            edges = [start - BUCKET * k for k in range(int(max(0.0, start - begin) // BUCKET) + 1)]
            pre = [_bucket(mine, dues, lo, hi, start) for hi, lo in itertools.pairwise(edges)]
            pre = [b for b in pre if b["n"]]
            level = max((b["p99_ms"] for b in pre), default=None)
            share = max((b["errors"] / b["n"] for b in pre), default=0.0)
            post: list[dict[str, Any]] = []
            settled[kind] = math.inf  # until it recovers: no baseline for the next fault
            lo = end
            while level is not None and lo < limit and settled[kind] > lo:
                post.append(_bucket(mine, dues, lo, min(lo + BUCKET, limit)))
                n, p99, errors = post[-1]["n"], post[-1]["p99_ms"], post[-1]["errors"]
                if n and p99 <= level and errors <= share * n:
                    settled[kind] = lo
                lo += BUCKET
            recovered = None if settled[kind] == math.inf else round(settled[kind] - end, 1)
            entry[kind] = {"pre_fault_p99_ms": level, "pre_fault_error_share": share,
                           "recovered_after_s": recovered, "pre_buckets": pre,
                           "post_buckets": post}  # fmt: skip
        out.append(entry)
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with what was measured and whether it was met (computed, never assumed)."""
    rows: list[tuple[str, str, bool]] = []
    for name in SERVICES:
        pct = result["rss"]["growth"].get(name, {}).get("growth_pct")
        rows.append((f"{name} RSS growth after warm-up < {RSS_GROWTH_TARGET:g}%",
                     "n/a" if pct is None else f"{pct:+.1f}%",
                     pct is not None and pct < RSS_GROWTH_TARGET))  # fmt: skip
    e, verify = result["events"], result["verify"]
    rows.append(("0 events lost, 0 doubled",
                 f"{e['lost']} lost, {e['doubled']} doubled of {e['produced']:,}",
                 e["produced"] > 0 and e["lost"] == 0 and e["doubled"] == 0))  # fmt: skip
    for entry in result["recovery"]:
        for kind in DECISIONS:
            seconds = entry[kind]["recovered_after_s"]
            rows.append((f"{entry['fault']}: {kind} p99 back within 30 s", _recovered(entry[kind]),
                         seconds is not None and seconds <= RECOVERY_TARGET))  # fmt: skip
    rows.append(("/audit/verify ok at the end",
                 f"ok={verify.get('ok')}, {verify.get('events_checked')} events",
                 verify.get("ok") is True))  # fmt: skip
    dead = {n: c for n, c in result["exit_codes"].items() if c is not None}
    rows.append(("every service process alive to the end",
                 f"exited: {dead}" if dead else "all alive", not dead))  # fmt: skip
    return [{"target": target, "measured": measured, "met": met} for target, measured, met in rows]


def _recovered(entry: dict[str, Any]) -> str:
    if not entry["post_buckets"]:
        return "no pre-fault baseline"
    seconds = entry["recovered_after_s"]
    return "not recovered" if seconds is None else f"{seconds:g} s"


def render(result: dict[str, Any]) -> str:
    """The printed report: machine, settings, the interval tables, events, recovery, targets."""
    s, load, width = result["settings"], result["load"], result["settings"]["interval_s"]
    faults = ", ".join(
        f"{f['name']} {f['start_s']:.1f}-{f['end_s']:.1f} s" for f in result["faults"]
    )
    parts = [table([(k, str(v)) for k, v in result["machine"].items()], "machine")]
    parts.append(table([
        ("duration / rate", f"{s['duration_s']:g} s at {s['rate']:g} req/s (open loop)"),
        ("mix (%)", ", ".join(f"{k} {v}" for k, v in s["mix"].items())),
        ("accounts", f"{s['accounts']:,} + 1 hot ({s['hot_share']:.0%} of requests)"),
        ("processes", "1 quota ledger, 2 quota policy (requests alternate)"),
        ("warm-up", f"{s['warmup_s']:g} s"),
        ("faults", faults or "none"),
        ("requests", f"{load['sent']:,} sent, {load['dropped']} dropped, "
                     f"{load['unfinished']} unfinished"),
        ("driver", f"lag p99 {ms(load['lag_p99_ms'])} ms, CPU {load['cpu_cores']:.2f} cores"),
    ], "soak"))  # fmt: skip
    rows = result["intervals"]
    decision_rows = [
        [f"{r['from_s']:g}", *(x for k in DECISIONS for x in
          (str(r[k]["n"]), ms(r[k]["p50_ms"]), ms(r[k]["p99_ms"]))),
         str(sum(c for k, c in r["statuses"].items() if is_error(k.split(" ", 1)[1]))),
         ms(r["lag"]["p99_ms"])]
        for r in rows
    ]  # fmt: skip
    header = ["from s", "check n", "p50 ms", "p99 ms", "hold n", "p50 ms", "p99 ms", "errors",
              "driver lag p99 ms"]  # fmt: skip
    title = f"decision latency per {width:g} s (from when each request was due)"
    parts.append(grid(header, decision_rows, title))
    labels = sorted({label for r in rows for label in r["statuses"]})
    status_rows = [[label, *(str(r["statuses"].get(label, 0)) for r in rows)] for label in labels]
    parts.append(grid(["kind status", *(f"{r['from_s']:g}s" for r in rows)], status_rows,
                      f"responses per {width:g} s (errors: 5xx and transport errors)"))  # fmt: skip
    memory = result["rss"]
    names = list(memory["growth"])
    rss_rows = [[f"{i * width:g}", *(f"{r[n]:.1f}" if r.get(n) else "-" for n in names)]
                for i, r in enumerate(memory["per_interval"])]  # fmt: skip
    rss_rows.append(["growth %", *(f"{memory['growth'][n]['growth_pct']:+.1f}" for n in names)])
    title = f"RSS MiB (last sample per {width:g} s; growth from the end of warm-up)"
    parts.append(grid(["from s", *names], rss_rows, title))
    e = result["events"]
    parts.append(table([
        ("produced (202 from POST /events)", f"{e['produced']:,}"),
        ("applied (distinct ids in event_store)", f"{e['applied']:,}"),
        ("lost / doubled", f"{e['lost']} / {e['doubled']}"),
        ("not confirmed (error, timeout) / applied",
         f"{e['unconfirmed']} / {e['unconfirmed_applied']}"),
        ("waited after the load for the ledger to catch up", f"{e['drain_s']:.1f} s"),
        ("quarantined (rejected_events)", str(e["rejected"])),
    ], "events"))  # fmt: skip
    recovery_rows = [
        [entry["fault"], kind, ms(entry[kind]["pre_fault_p99_ms"]), _recovered(entry[kind])]
        for entry in result["recovery"]
        for kind in DECISIONS
    ]
    title = (
        f"p99 recovery ({BUCKET:g}-s buckets against the {PRE_FAULT_WINDOW:g} s before the fault)"
    )
    parts.append(grid(["fault", "kind", "pre-fault p99 ms", "back after"], recovery_rows, title))
    target_rows = [
        [t["target"], t["measured"], "met" if t["met"] else "NOT MET"] for t in result["targets"]
    ]
    parts.append(grid(["target", "measured", "result"], target_rows, "targets"))
    return "\n\n".join(parts)
