"""Seconds the ledger's batch path spends per phase, summed in this process (`bench.fold` resets
and reads them): a `perf_counter` pair per phase per batch (a decode chunk), nothing per event.

A phase that awaits PostgreSQL or the broker counts wall time, so it includes whatever else
the event loop ran meanwhile (the next batch's poll and decode run while a batch commits).
"""

from __future__ import annotations

from time import perf_counter

#: phase -> seconds, in the order the phases first ran.
SECONDS: dict[str, float] = {}


def lap(phase: str, started: float) -> float:
    """Add the time since `started` to `phase`; the time now, where the next phase starts."""
    now = perf_counter()
    SECONDS[phase] = SECONDS.get(phase, 0.0) + (now - started)
    return now
