"""A typed client of the quota services for Python gateways, on httpx: `QuotaClient` (sync) and
`AsyncQuotaClient` (async), with the same API.

    quota = AsyncQuotaClient("http://policy:8081", fail_mode=FailMode.CLOSED,
                             service_token=SERVICE_TOKEN,
                             ledger_url="http://ledger:8080", ledger_token=ADMIN_TOKEN)
    decision = await quota.authorize(authorization, model="gpt-4o",
                                     route="/v1/chat/completions", estimated_cost=2_000)
    if not decision.allowed:                     # answer the client as the policy did
        return decision.status, decision.raw, decision.headers
    ...                                          # call the upstream, then one of:
    await quota.settle(decision, used)           # usage_recorded with the reservation_id
    await quota.release(decision.reservation.id) # the upstream failed: free the hold

A transport error, or a 503 with Retry-After of the service's own, is retried (`Retry`) with
the same body, hence the same `request_id` (one is made for a hold that has none), so a retry
never holds twice. When the policy cannot decide after the retries, `FailMode` decides, which
the caller must choose. See docs/client.md.

The two classes differ only in their transport (and the retry loop's sleep): requests are built
and answers parsed once, in `_Core`.
"""

from __future__ import annotations

from services.client.clients import AsyncQuotaClient, QuotaClient
from services.client.model import (
    NO_RETRY,
    SERVICE_TOKEN_HEADER,
    UNAVAILABLE_MESSAGE,
    USAGE_RECORDED,
    AsyncProduce,
    Budget,
    Decision,
    FailMode,
    Hold,
    Produce,
    QuotaError,
    QuotaUnavailable,
    Reason,
    Reservation,
    Retry,
)

__all__ = [
    "NO_RETRY",
    "SERVICE_TOKEN_HEADER",
    "UNAVAILABLE_MESSAGE",
    "USAGE_RECORDED",
    "AsyncProduce",
    "AsyncQuotaClient",
    "Budget",
    "Decision",
    "FailMode",
    "Hold",
    "Produce",
    "QuotaClient",
    "QuotaError",
    "QuotaUnavailable",
    "Reason",
    "Reservation",
    "Retry",
]
