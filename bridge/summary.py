"""A one-line progress summary at info level, every minute: ``bridge.summary``.

At info the bridge otherwise says nothing after start-up while all is well, which reads like a
hang. This line is what people look for: threads followed, events published since the last
line and in total, the end-to-end lag, reconnects and dead letters. Everything comes from the
metrics registry, so it says exactly what ``/metrics`` says, and it observes only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from bridge.metrics import REGISTRY

__all__ = ["Snapshot", "log_summary", "snapshot", "summary_fields"]

log = structlog.get_logger("bridge.summary")

_LAG = "qoder_bridge_end_to_end_lag_seconds"


@dataclass(frozen=True)
class Snapshot:
    """The figures the summary needs, read from the registry at ``at`` (anyio time)."""

    at: float
    values: dict[str, float] = field(default_factory=dict)
    lag_buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count)


def snapshot(at: float) -> Snapshot:
    """Sums over every label of the counters and gauges, and the lag histogram's buckets."""
    wanted = {
        "qoder_bridge_events_published_total": "published",
        "qoder_bridge_events_received_total": "received",
        "qoder_bridge_reconnects_total": "reconnects",
        "qoder_bridge_dlq_records_total": "dlq",
        "qoder_bridge_threads_followed": "threads",
        "qoder_bridge_open_streams": "open_streams",
        "qoder_bridge_inflight_bytes": "inflight_bytes",
        "qoder_bridge_ready": "ready",
        "qoder_bridge_kafka_reachable": "kafka_reachable",
        f"{_LAG}_count": "lag_count",
        f"{_LAG}_sum": "lag_sum",
    }
    values: dict[str, float] = dict.fromkeys(wanted.values(), 0.0)
    buckets: list[tuple[float, float]] = []
    for family in REGISTRY.collect():
        if not family.name.startswith("qoder_bridge_"):
            continue
        for sample in family.samples:
            if sample.name in wanted:
                values[wanted[sample.name]] += sample.value
            elif sample.name == f"{_LAG}_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    return Snapshot(at, values, tuple(sorted(buckets)))


def summary_fields(before: Snapshot, now: Snapshot) -> dict[str, Any]:
    """The key/values of one ``bridge.summary`` line, for the interval ``before`` -> ``now``."""
    elapsed = max(now.at - before.at, 1e-9)
    v, b = now.values, before.values
    published = v["published"] - b["published"]
    lag_count = v["lag_count"] - b["lag_count"]
    fields: dict[str, Any] = {
        "threads": int(v["threads"]),
        "open_streams": int(v["open_streams"]),
        "events": int(published),
        "events_total": int(v["published"]),
        "events_per_s": round(published / elapsed, 1),
        "received": int(v["received"] - b["received"]),
        "lag_avg_s": None,
        "lag_p99_s": None,
        "reconnects": int(v["reconnects"] - b["reconnects"]),
        "dlq": int(v["dlq"] - b["dlq"]),
        "inflight_bytes": int(v["inflight_bytes"]),
        "ready": bool(v["ready"]),
        "kafka_reachable": bool(v["kafka_reachable"]),
    }
    if lag_count > 0:
        fields["lag_avg_s"] = round((v["lag_sum"] - b["lag_sum"]) / lag_count, 3)
        fields["lag_p99_s"] = _p99_bound(before.lag_buckets, now.lag_buckets, lag_count)
    return fields


def _p99_bound(
    before: tuple[tuple[float, float], ...], now: tuple[tuple[float, float], ...], count: float
) -> float | None:
    """The upper bound of the histogram bucket holding the interval's 99th percentile."""
    earlier = dict(before)
    for le, cumulative in now:
        if cumulative - earlier.get(le, 0.0) >= 0.99 * count:
            return le if math.isfinite(le) else None
    return None


async def log_summary(
    interval_s: float = 60.0, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Log ``bridge.summary`` every ``interval_s`` until cancelled (0: never, returns at once).

    The first line covers the time since this task started.
    """
    if interval_s <= 0:
        task_status.started()
        return
    before = snapshot(anyio.current_time())
    task_status.started()
    while True:
        await anyio.sleep(interval_s)
        now = snapshot(anyio.current_time())
        log.info("bridge.summary", **summary_fields(before, now))
        before = now
