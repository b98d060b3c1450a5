"""Prometheus gauges of the policy's snapshot, computed at each scrape (no per-request cost).

    quota_policy_snapshot_age_seconds     seconds since the ledger was last heard from (a
                                          committed batch or a live heartbeat, minus its
                                          `cycle_age`); since start until it has been
    quota_policy_snapshot_position        the ledger position the snapshot has seen (0: not
                                          loaded)
    quota_policy_max_staleness_seconds    QUOTA_MAX_STALENESS_SECONDS: past this age decisions
                                          are refused `503 snapshot_stale` (unless fail-open)

The decisions by reason (`quota_policy_decisions_total`) are counted in
`services.policy.service`, the group commits of holds in `services.policy.reservations`.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Gauge

from services.policy.service import DECISIONS
from services.policy.snapshot_store import SnapshotStore

SNAPSHOT_AGE = Gauge(
    "quota_policy_snapshot_age_seconds",
    "Seconds since the ledger was last heard from (a committed batch or a heartbeat)",
)
SNAPSHOT_POSITION = Gauge(
    "quota_policy_snapshot_position", "Ledger position the snapshot has seen (0: not loaded)"
)
MAX_STALENESS = Gauge(
    "quota_policy_max_staleness_seconds",
    "QUOTA_MAX_STALENESS_SECONDS: snapshot age past which decisions are refused 503",
)


#: Decision reasons the alerts and the dashboard name, exported at 0 from the start so that
#: their first occurrence is an increase (`rate` and `increase` see nothing in a new series).
ALERTED_REASONS: Final = (
    "allowed",
    "reservation_unavailable",
    "budget_exceeded",
    "token_budget_exceeded",
    "concurrency_limited",
    "insufficient_user_quota",
    "model_unavailable",
    "provider_rate_limited",
)
DECISIONS.export(*((reason,) for reason in ALERTED_REASONS))


def watch(store: SnapshotStore, max_staleness_seconds: float) -> None:
    """Read `store`'s age and position at each scrape."""
    SNAPSHOT_AGE.set_function(store.seconds_since_heard)
    SNAPSHOT_POSITION.set_function(lambda: float(store.position))
    MAX_STALENESS.set(max_staleness_seconds)
