"""`services.hot_metrics`: lock-free counters and histograms expose what prometheus_client's
would."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest

from services.hot_metrics import LabelledCounter, LabelledHistogram

BOUNDS = (0.001, 0.01, 0.1)


def samples(registry: CollectorRegistry, name: str) -> dict[str, float]:
    found = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(name) and not line.startswith(f"{name}_created"):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


def test_they_expose_the_same_samples_as_prometheus_clients_own() -> None:
    counter = LabelledCounter("quota_test_hot_events", "Events", ["kind"])
    histogram = LabelledHistogram("quota_test_hot_seconds", "Seconds", "kind", BOUNDS)
    reference = CollectorRegistry()
    counter_ref = Counter("quota_test_hot_events", "Events", ["kind"], registry=reference)
    histogram_ref = Histogram(
        "quota_test_hot_seconds", "Seconds", ["kind"], buckets=BOUNDS, registry=reference
    )
    try:
        counter.export(("never",))
        counter_ref.labels(kind="never")
        for kind, seconds in [("a", 0.001), ("a", 0.0005), ("b", 0.01), ("a", 5.0), ("b", 0.02)]:
            counter.inc((kind,))
            counter_ref.labels(kind=kind).inc()
            histogram.child(kind).observe(seconds)
            histogram_ref.labels(kind=kind).observe(seconds)
        for name in ("quota_test_hot_events", "quota_test_hot_seconds"):
            assert samples(REGISTRY, name) == samples(reference, name)
        # a value on a bound is in that bucket
        assert (
            samples(REGISTRY, "quota_test_hot_seconds")[
                'quota_test_hot_seconds_bucket{kind="a",le="0.001"}'
            ]
            == 2.0
        )
    finally:
        REGISTRY.unregister(counter)
        REGISTRY.unregister(histogram)
