"""A batch's observations added once a bucket give the histogram each observe() would have."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bridge.metrics import Observations

VALUES = [0.0, 0.001, 0.005, 0.0050001, 0.3, 2.5, 2.5, 7.0, 1e9, math.inf, -1.0, 0.25]


def _exposition(feed: str) -> bytes:
    registry = CollectorRegistry()
    histogram = Histogram("lag_seconds", "x", buckets=(0.005, 0.25, 2.5, 10.0), registry=registry)
    if feed == "observe":
        for value in VALUES:
            histogram.observe(value)
    else:
        batch = Observations(histogram)
        for value in VALUES[:5]:
            batch.add(value)
        batch.flush()
        for value in VALUES[5:]:
            batch.add(value)
        batch.flush()
        batch.flush()  # nothing new: nothing added
    return generate_latest(registry)


def test_batched_observations_expose_the_same_histogram_as_observe() -> None:
    observed = _exposition("observe")
    assert b'lag_seconds_bucket{le="0.005"} 4.0' in observed  # (the bounds are inclusive)
    assert _exposition("batch") == observed
