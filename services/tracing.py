"""OpenTelemetry traces: off, and free, unless QUOTA_OTEL_ENABLED=true.

`quota ledger`, `quota policy` and `quota dev` call `configure` at startup. With traces on it
builds a tracer provider of the service's own (the global one is left alone, so FastAPI's
native telemetry, which follows the global provider, stays as it was) exporting over
OTLP/HTTP with a batching processor. The standard `OTEL_*` variables apply:
OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), OTEL_EXPORTER_OTLP_HEADERS,
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_BSP_*, and
OTEL_PROPAGATORS (W3C `traceparent`/`tracestate` and baggage by default).

The spans (docs/operations.md, "Traces"):

- `POST /authorize` (and `GET`/`POST /authorize/forward`): a server span whose parent is the
  gateway's W3C `traceparent` (and `tracestate`) when the request carries one, with the
  decision's outcome (`authorize_attributes`, never the key), and children `decide`, `hold`
  (when a cost is estimated) and `rate_limit` (check 14).
- `ledger batch`: one per batch the ledger applies, a root span (`batch_attributes`).

Off (the default), or on without the `otel` extra installed, nothing here imports
OpenTelemetry (FastAPI imports the API package itself; the SDK and exporter stay unloaded),
`TRACER` stays None, and the request path pays a read of it: `if tracing.TRACER is not None`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from services.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Tracer

    from services.ledger.ingest import BatchResult
    from services.policy.decision import Decision

log = structlog.get_logger("quota.tracing")

T = TypeVar("T")

#: The tracer while traces are on (`configure`), else None: all the request path reads.
TRACER: Tracer | None = None
_PROVIDER: TracerProvider | None = None
#: The tracer's (instrumentation scope's) name.
SCOPE = "quota-service"


def configure(settings: Settings, service: str, processor: SpanProcessor | None = None) -> bool:
    """Turn traces on when `settings.otel_enabled`; True when they are.

    `service` is the `service.name` unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES)
    names one. Spans go to `processor`, by default a `BatchSpanProcessor` over the OTLP/HTTP
    exporter. Off, nothing is imported; on without the `otel` extra installed, a warning says
    so and traces stay off. A configuration before this one is shut down (its spans flushed)."""
    global TRACER, _PROVIDER
    if not settings.otel_enabled:
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if processor is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processor = BatchSpanProcessor(OTLPSpanExporter())
    except ImportError as exc:
        log.warning(
            "QUOTA_OTEL_ENABLED is set but OpenTelemetry is not installed "
            "(pip install 'quota-service[otel]'); traces stay off",
            error=str(exc),
        )
        return False
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    shutdown()
    _PROVIDER, TRACER = provider, provider.get_tracer(SCOPE)
    log.info("traces on", service_name=resource.attributes.get(SERVICE_NAME))
    return True


def shutdown() -> None:
    """Turn traces off, flushing what the configuration before had not exported yet."""
    global TRACER, _PROVIDER
    provider, _PROVIDER, TRACER = _PROVIDER, None, None
    if provider is not None:
        provider.shutdown()


def _carrier(headers: Iterable[tuple[bytes, bytes]], fields: set[str]) -> dict[str, str]:
    """The ASGI headers (lower-case names) the propagators read (`fields`: `traceparent`,
    `tracestate`, `baggage` by default; never `authorization`), repeats joined by ','."""
    carrier: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1")
        if name in fields:
            value = raw_value.decode("latin-1")
            carrier[name] = f"{carrier[name]},{value}" if name in carrier else value
    return carrier


def authorize_attributes(decision: Decision) -> dict[str, Any]:
    """A decision's outcome on its server span: allowed, reason, status, position, and the
    account (and reservation) it concerns when known. Never the key."""
    attributes: dict[str, Any] = {
        "quota.allowed": decision.allowed,
        "quota.reason": decision.reason or "allowed",
        "quota.status": decision.status,
        "quota.position": decision.position,
    }
    grant = decision.grant
    if grant is not None:
        attributes["quota.account_id"] = grant.account_id
        attributes["quota.token_id"] = grant.token_id
        if grant.reservation is not None:
            attributes["quota.reservation_id"] = grant.reservation.id
    elif decision.rate_limit_key is not None:
        attributes["quota.account_id"] = decision.rate_limit_key[0]
    return attributes


async def authorize_span(
    name: str, headers: Iterable[tuple[bytes, bytes]], pending: Awaitable[Decision]
) -> Decision:
    """`pending`, a decision being made, awaited in the server span `name` (`METHOD route`)
    whose parent is the request's W3C trace context; the decision's outcome is set on it."""
    tracer = TRACER
    if tracer is None:  # turned off meanwhile
        return await pending
    # The API package (a dependency of FastAPI's) is loaded already: these only look it up.
    from opentelemetry.propagate import extract, get_global_textmap
    from opentelemetry.trace import SpanKind

    method, _, route = name.partition(" ")
    carrier = _carrier(headers, get_global_textmap().fields)
    with tracer.start_as_current_span(
        name,
        context=extract(carrier),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": route},
    ) as span:
        try:
            decision = await pending
        except Exception:
            span.set_attribute("quota.status", 500)  # answered 500; the exception is recorded
            raise
        span.set_attributes(authorize_attributes(decision))
        return decision


async def child_span(name: str, pending: Awaitable[T]) -> T:
    """`pending` awaited in a span `name`, a child of the current one (`hold`, `rate_limit`)."""
    tracer = TRACER
    if tracer is None:
        return await pending
    with tracer.start_as_current_span(name):
        return await pending


def batch_attributes(records: int, result: BatchResult) -> dict[str, Any]:
    """A ledger batch's figures: records taken, events applied, duplicates, records
    quarantined, and the ledger position after it."""
    return {
        "quota.batch.records": records,
        "quota.batch.applied": result.applied,
        "quota.batch.duplicates": result.duplicates,
        "quota.batch.quarantined": sum(result.quarantined.values()),
        "quota.batch.looked_up": result.looked_up,
        "quota.position": result.position,
    }


async def batch_span(records: int, pending: Awaitable[BatchResult]) -> BatchResult:
    """`pending`, a ledger batch being applied, awaited in a root span `ledger batch`."""
    tracer = TRACER
    if tracer is None:
        return await pending
    with tracer.start_as_current_span(
        "ledger batch", attributes={"quota.batch.records": records}
    ) as span:
        result = await pending
        span.set_attributes(batch_attributes(records, result))
        return result
