"""Where a latency run's tail comes from: its percentiles second by second.

    .venv/bin/python -m tests.bench --parts latency --logs DIR
    .venv/bin/python -m tests.experiments.exp_latency_over_time DIR [SECONDS]

``tests.bench`` leaves each event's times in ``DIR/latency-<mode>.json`` (processed_at, the
broker's append, the read_committed consumer's receipt, all epoch seconds) with the moment the
bridge had every stream open and the time from which it counts events (after the warm-up).
This prints, for each mode, p50 and p99 (the bench's rank) to append and to receive over
windows of SECONDS (2 by default; 1 for the per-second figures the README quotes) from the
first of those, laid so that one starts where the count does (the warm-up's marked), then over
all the events the bench counts.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tests.bench import percentile


def _line(label: str, rows: list[tuple[float, float, float]]) -> str:
    append = [(a - e) * 1000 for e, a, _ in rows]
    receive = [(r - e) * 1000 for e, _, r in rows]
    return (
        f"  {label:<18} {len(rows):>6}  append p50 {percentile(append, 50):6.1f} p99 "
        f"{percentile(append, 99):6.1f}   receive p50 {percentile(receive, 50):6.1f} p99 "
        f"{percentile(receive, 99):6.1f} ms"
    )


def main() -> None:
    where = Path(sys.argv[1])
    window = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    for path in sorted(where.glob("latency-*.json")):
        dump = json.loads(path.read_text())
        counted_from = dump["steady_from"]
        first = dump.get("open_at", counted_from)  # (dumps before the warm-up had no open_at)
        rows = sorted((e, a, r) for e, a, r in dump["events"] if e >= first)
        counted = [row for row in rows if row[0] >= counted_from]
        print(f"{path.stem.removeprefix('latency-')}: {len(counted):,} events counted")
        # Windows from the start of the count backwards and forwards: none holds both.
        buckets: dict[int, list[tuple[float, float, float]]] = {}
        for row in rows:
            buckets.setdefault(math.floor((row[0] - counted_from) / window), []).append(row)
        offset = counted_from - first
        for number, bucket in sorted(buckets.items()):
            start = max(0.0, offset + number * window)  # (the first may start before open)
            warmup = " warm-up" if number < 0 else ""
            end = offset + (number + 1) * window
            print(_line(f"{start:4.0f}-{end:.0f} s{warmup}", bucket))
        print(_line("all counted", counted))


if __name__ == "__main__":
    main()
