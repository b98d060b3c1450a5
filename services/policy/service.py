"""The policy service's orchestration, apart from HTTP: the gate (service token, freshness),
the decision (`decide`), the hold when a cost is estimated, and check 14's shared counter.

It speaks in typed decisions and domain errors; `services.policy.http` renders them. A
database failure while holding is a decision (`503 reservation_unavailable`, nothing held);
while reading or releasing a reservation it is `ReservationUnavailable`, which the HTTP layer
maps to the same answer in one place.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Final

import structlog
from pydantic import ValidationError

from services import tracing
from services.contract.cloudevent import format_time
from services.hot_metrics import LabelledCounter
from services.policy.decision import (
    Decision,
    Hold,
    budget_denied,
    concurrency_limited,
    decide,
    deny,
    rate_limited,
    snapshot_figures,
)
from services.policy.decision import refusal as _refusal
from services.policy.errors import INSUFFICIENT_USER_QUOTA
from services.policy.inputs import extract_key
from services.policy.ratelimit import RateLimiter
from services.policy.request import AuthorizeInput
from services.policy.reservations import HoldOutcome, Reservations
from services.policy.snapshot import Snapshot
from services.policy.snapshot_store import SnapshotStore
from services.settings import Settings
from services.store.budget_rules import BUDGET_EXCEEDED, CONCURRENCY_LIMITED, TOKEN_BUDGET_EXCEEDED
from services.store.model import Reservation
from services.supervise import DATABASE_ERRORS, Readiness

log = structlog.get_logger("quota.policy.service")

#: quota_policy_decisions_total{reason}, counted without a lock on the request path.
DECISIONS = LabelledCounter("quota_policy_decisions", "Decisions by outcome", ["reason"])

INVALID_REQUEST: Final = "invalid_request"
SERVICE_TOKEN_INVALID: Final = "service_token_invalid"
SNAPSHOT_STALE: Final = "snapshot_stale"
RESERVATION_UNAVAILABLE: Final = "reservation_unavailable"
REQUEST_TOO_LARGE: Final = "request_too_large"


class ReservationUnavailable(Exception):
    """The database could not be reached to read or end a reservation; retry later."""


def reservation_unavailable(position: int) -> Decision:
    """503: the hold could not be written (the database failed); retry after a second."""
    return _refusal(
        503,
        RESERVATION_UNAVAILABLE,
        "Quota could not be reserved right now; try again later.",
        "service_unavailable",
        position,
        1,
    )


def invalid_request(exc: ValidationError | ValueError, position: int) -> Decision:
    """400 for a body or header that is not a valid request, naming the first problem."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        detail = f"{where}: {first['msg']}"
    else:
        detail = str(exc)
    return _refusal(
        400, INVALID_REQUEST, f"Bad Request – {detail}", "invalid_request_error", position, None
    )


def request_too_large(position: int) -> Decision:
    return _refusal(
        413, REQUEST_TOO_LARGE, "Request body too large.", "invalid_request_error", position, None
    )


def count(reason: str) -> None:
    DECISIONS.inc((reason,))


def counted(decision: Decision) -> Decision:
    """`decision`, counted in `quota_policy_decisions_total` by its reason."""
    count(decision.reason or "allowed")
    return decision


class Policy:
    """What the lifespan builds and every route uses: the snapshot store, the limiter, the
    reservations, and the settings that govern them."""

    def __init__(
        self,
        settings: Settings,
        store: SnapshotStore,
        limiter: RateLimiter,
        reservations: Reservations,
    ) -> None:
        self.settings = settings
        self.store = store
        self.limiter = limiter
        self.reservations = reservations
        #: The service token as the bytes a header carries (b"": none is configured).
        self._service_token = (settings.service_token or "").encode()

    # ---------------------------------------------------------------------------- the gate

    def refuse_service(self, service_token: str | bytes | None) -> Decision | None:
        """401 when a service token is configured and the gateway did not send it, or sent
        another (compared in constant time). Every route but health and metrics asks this.
        The header's raw bytes, or its value decoded as latin-1 (as frameworks hand it)."""
        expected = self._service_token
        if not expected:
            return None
        if isinstance(service_token, bytes):
            sent = service_token
        else:  # back to the header's bytes, against the UTF-8
            sent = (service_token or "").encode("latin-1", "replace")
        if not hmac.compare_digest(sent, expected):
            return _refusal(
                401,
                SERVICE_TOKEN_INVALID,
                "Unauthorized – missing or wrong X-Quota-Service-Token.",
                "authentication_error",
                self.store.position,
                None,
            )
        return None

    def gate(self, service_token: str | bytes | None) -> Decision | Snapshot:
        """Service authentication and freshness: the snapshot to decide from, or the refusal
        (counted as a decision)."""
        refused = self.refuse_service(service_token)
        if refused is not None:
            return counted(refused)
        snapshot = self.store.snapshot
        if snapshot is None:
            return counted(
                _refusal(
                    503,
                    SNAPSHOT_STALE,
                    "Quota snapshot is not loaded yet.",
                    "service_unavailable",
                    0,
                    1,
                )
            )
        settings = self.settings
        if not settings.fail_open and (
            self.store.seconds_since_heard() > settings.max_staleness_seconds
        ):
            return counted(
                _refusal(
                    503,
                    SNAPSHOT_STALE,
                    "Quota state is stale: the ledger has not been heard from; try again later.",
                    "service_unavailable",
                    self.store.position,
                    1,
                )
            )
        return snapshot

    def readiness(self) -> Readiness:
        """Ready while decisions can be answered: the snapshot is loaded and fresh (or
        QUOTA_FAIL_OPEN); `reason` names what is degraded or missing."""
        store, settings = self.store, self.settings
        reason = None if store.health.ok else f"snapshot listener: {store.health.reason}"
        ready = store.snapshot is not None
        if not ready:
            reason = "snapshot not loaded" + (f" ({reason})" if reason else "")
        elif not settings.fail_open and (
            store.seconds_since_heard() > settings.max_staleness_seconds
        ):
            ready = False
            reason = (
                f"stale: the ledger was last heard from {store.seconds_since_heard():.1f}s ago"
                + (f" ({reason})" if reason else "")
            )
        return Readiness(ready=ready, position=store.position, reason=reason)

    # ---------------------------------------------------------------------------- decisions

    async def authorize(self, request: AuthorizeInput, snapshot: Snapshot) -> Decision:
        """Checks 1-13b from the snapshot (pure), the hold when a cost is estimated (checks 13
        to 13c again, authoritative, under the ledger lock), then check 14 against the shared
        limiter. A dry run stops after the snapshot's checks: nothing held, nothing counted.

        A hold with a request id is decided by the hold alone from check 13 on: `decide` skips
        check 13 for it, the hold answers a known request id (within its TTL, whatever the
        reservation's state) with its reservation before applying check 13, and a repeat is
        not counted by check 14 again."""
        now = datetime.now(UTC)
        tracer = tracing.TRACER  # None unless traces are on: then no step is wrapped in a span
        if tracer is None:
            decision = decide(request, snapshot, now)
        else:
            with tracer.start_as_current_span("decide"):
                decision = decide(request, snapshot, now)
        if request.dry_run:
            count("dry_run:" + (decision.reason or "allowed"))
            return decision
        held: HoldOutcome | None = None
        grant = decision.grant
        if grant is not None and request.estimated_cost is not None:
            try:
                holding = self.reservations.hold(
                    grant.account_id,
                    request.estimated_cost,
                    request.request_id,
                    actor=f"token:{grant.token_id}",
                    token_id=grant.token_id,
                    model=request.model,
                )
                held = await (holding if tracer is None else tracing.child_span("hold", holding))
            except DATABASE_ERRORS as exc:
                # Nothing was held (the statement is one transaction): refuse, never fail open.
                log.warning("hold failed", error=str(exc), account_id=grant.account_id)
                count(RESERVATION_UNAVAILABLE)
                return reservation_unavailable(snapshot.position)
            if held.reservation is None:
                decision = _hold_refused(request, held, snapshot.position)
            else:
                decision = _with_reservation(decision, held, now, snapshot, request.model)
        if (
            decision.allowed
            and decision.rate_limit is not None
            and decision.rate_limit_key
            and not (held is not None and held.repeated)
        ):
            account_id, model = decision.rate_limit_key
            hitting = self.limiter.hit(
                account_id, model, decision.rate_limit, request.estimated_cost or 0
            )
            hit = await (hitting if tracer is None else tracing.child_span("rate_limit", hitting))
            retry_after = hit.retry_after
            if retry_after is not None:
                if held is not None and held.reservation is not None:
                    try:
                        await self.reservations.release(
                            held.reservation.reservation_id, "policy:rate_limited"
                        )
                    except DATABASE_ERRORS as exc:  # the TTL ends it instead
                        log.warning("release after 429 failed", error=str(exc))
                decision = rate_limited(decision, retry_after)
            decision.limit_headers = tuple(hit.headers.items())
        count(decision.reason or "allowed")
        return decision

    # ---------------------------------------------------------------------------- reservations

    async def get_reservation(self, reservation_id: str) -> Reservation | None:
        try:
            return await self.reservations.get(reservation_id)
        except DATABASE_ERRORS as exc:
            raise ReservationUnavailable(str(exc)) from exc

    async def release(self, reservation_id: str) -> Reservation | None:
        """End a held reservation (idempotent); None for an unknown id."""
        try:
            return await self.reservations.release(reservation_id, "api:release")
        except DATABASE_ERRORS as exc:
            raise ReservationUnavailable(str(exc)) from exc


def _hold_refused(request: AuthorizeInput, held: HoldOutcome, position: int) -> Decision:
    """The decision for a hold the hold function refused: check 13, 13a, 13b or 13c."""
    last6 = extract_key(request.authorization)[-6:]
    if held.refusal == CONCURRENCY_LIMITED:
        return concurrency_limited(position)
    if held.refusal in (BUDGET_EXCEEDED, TOKEN_BUDGET_EXCEEDED) and held.budgets:
        return budget_denied(held.budgets[0], position, last6)
    return deny(INSUFFICIENT_USER_QUOTA, position, key_last6=last6)


def _with_reservation(
    decision: Decision, held: HoldOutcome, now: datetime, snapshot: Snapshot, model: str | None
) -> Decision:
    reservation = held.reservation
    grant = decision.grant
    assert reservation is not None and grant is not None
    hold = Hold(
        reservation.reservation_id,
        reservation.amount,
        format_time(reservation.expires_at),
        reservation.state,
    )
    # The hold function weighs no budget for a repeat: the snapshot's figures, then.
    figures = (
        snapshot_figures(snapshot, grant.account_id, grant.token_id, model, now)
        if held.repeated
        else held.budgets
    )
    # `decide` built this decision and its grant for this request alone: completed in place.
    grant.balance = held.balance
    grant.available = held.balance - held.held
    grant.reservation = hold
    grant.budgets = figures
    decision.position = max(decision.position, reservation.held_position)
    return decision
