"""HTTP metrics of both services: responses by status class and request latency.

    quota_http_responses_total{service, code}   code: "1xx" .. "5xx"
    quota_http_request_seconds{service}          from the request's arrival to the end of its
                                                 response (histogram)

`HttpMetrics` is a pure ASGI middleware (`install` puts it on an app): it sees the status in
`http.response.start`, and counts a request whose handler raised before answering as a 5xx
(Starlette's outermost layer answers it 500). The probes and the scrape (`/healthz`, `/readyz`,
`/metrics`) are not counted: they would dominate an idle service's latency, and a `/readyz`
503 is already said by the readiness and staleness alerts.

The label children are resolved once per service (`observer`), so a request costs two
`perf_counter` calls, a closure, one counter increment and one histogram observation. Code
that answers outside the middleware (a fast path moved in front of the app) calls
`observe(service, status, seconds)`, or keeps `observer(service)` and calls its `observe`.
"""

from __future__ import annotations

import time
from typing import Final

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.hot_metrics import LabelledCounter, LabelledHistogram

# Counted without a lock (`services.hot_metrics`): the policy observes every /authorize.
RESPONSES = LabelledCounter(
    "quota_http_responses",
    "HTTP responses by service and status class (1xx .. 5xx); probes and /metrics excluded",
    ["service", "code"],
)
LATENCY = LabelledHistogram(
    "quota_http_request_seconds",
    "Time from a request's arrival to the end of its response; probes and /metrics excluded",
    "service",
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

#: Paths neither counted nor timed: the orchestrator's probes and Prometheus' scrape.
UNOBSERVED: Final = frozenset({"/healthz", "/readyz", "/metrics"})
CODES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Observer:
    """One service's label children, resolved once."""

    __slots__ = ("_codes", "_latency")

    def __init__(self, service: str) -> None:
        self._codes = tuple((service, code) for code in CODES)
        RESPONSES.export(*self._codes)
        self._latency = LATENCY.child(service)

    def observe(self, status: int, seconds: float) -> None:
        """Count a response of `status` that took `seconds` (statuses out of 100..599 are
        timed, not counted)."""
        index = status // 100 - 1
        if 0 <= index < 5:
            RESPONSES.inc(self._codes[index])
        self._latency.observe(seconds)


_OBSERVERS: dict[str, Observer] = {}


def observer(service: str) -> Observer:
    """The `Observer` of `service`, made (and its series exported, at 0) on first use."""
    found = _OBSERVERS.get(service)
    if found is None:
        found = _OBSERVERS[service] = Observer(service)
    return found


def observe(service: str, status: int, seconds: float) -> None:
    """Count one response of `service` (for code that answers outside `HttpMetrics`)."""
    observer(service).observe(status, seconds)


class HttpMetrics:
    """Counts and times every HTTP request but those to `UNOBSERVED` paths."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.observer = observer(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNOBSERVED:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        except Exception:
            # Raised before answering: the server error middleware outside answers 500.
            self.observer.observe(status or 500, time.perf_counter() - started)
            raise
        if status:  # else the client went away before an answer: nothing to count
            self.observer.observe(status, time.perf_counter() - started)


def install(app: FastAPI, service: str) -> None:
    """Put `HttpMetrics` outermost of `app`'s middleware (call it after the others), with
    `service`'s series exported from now on."""
    observer(service)
    app.add_middleware(HttpMetrics, service=service)
