"""Prometheus series counted on the request path at the cost of a dict or list update.

`prometheus_client`'s Counter and Histogram take a lock per increment (they are thread-safe);
the policy answers every request on one event loop thread, so its per-request series are kept
in plain integers here and handed to Prometheus when it scrapes (a registered collector). The
exposition is the same as a Counter's and a Histogram's.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class LabelledCounter(Collector):
    """`name`_total by its labels' values (a tuple, in `labels`' order); `counts[values] += 1`
    is all an increment costs."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.counts: dict[tuple[str, ...], int] = {}
        REGISTRY.register(self)

    def inc(self, values: tuple[str, ...]) -> None:
        counts = self.counts
        counts[values] = counts.get(values, 0) + 1

    def export(self, *values: tuple[str, ...]) -> None:
        """Export these label values from now on, at 0 until counted."""
        for value in values:
            self.counts.setdefault(value, 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, count in list(self.counts.items()):
            family.add_metric(list(values), count)
        yield family


class LatencyHistogram:
    """One label set's buckets of a `LabelledHistogram`."""

    __slots__ = ("bounds", "buckets", "count", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds


class LabelledHistogram(Collector):
    """A histogram by one label, its children resolved once (`child`)."""

    def __init__(self, name: str, documentation: str, label: str, bounds: Sequence[float]) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = tuple(sorted(bounds))
        self.children: dict[str, LatencyHistogram] = {}
        REGISTRY.register(self)

    def child(self, value: str) -> LatencyHistogram:
        found = self.children.get(value)
        if found is None:
            found = self.children[value] = LatencyHistogram(self.bounds)
        return found

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, child in list(self.children.items()):
            running, cumulative = 0, []
            for bound, n in zip((*self.bounds, float("inf")), child.buckets, strict=True):
                running += n
                cumulative.append((_bound_text(bound), running))
            family.add_metric([value], cumulative, child.total)
        yield family


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
