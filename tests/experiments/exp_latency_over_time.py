"""Where a latency run's tail comes from: its percentiles second by second.

    .venv/bin/python -m tests.bench --parts latency --logs DIR
    .venv/bin/python -m tests.experiments.exp_latency_over_time DIR [SECONDS]

``tests.bench`` leaves each event's times in ``DIR/latency-<mode>.json`` (processed_at, the
broker's append, the read_committed consumer's receipt, all epoch seconds) with the time from
which it counts events (the bridge had every stream open, + 1 s). This prints, for each mode,
p50 and p99 to append and to receive over windows of SECONDS (2 by default) from that time,
then over all the events the bench counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _line(label: str, rows: list[tuple[float, float, float]]) -> str:
    append = [(a - e) * 1000 for e, a, _ in rows]
    receive = [(r - e) * 1000 for e, _, r in rows]
    return (
        f"  {label:<14} {len(rows):>6}  append p50 {_pct(append, 0.5):6.1f} p99 "
        f"{_pct(append, 0.99):6.1f}   receive p50 {_pct(receive, 0.5):6.1f} p99 "
        f"{_pct(receive, 0.99):6.1f} ms"
    )


def main() -> None:
    where = Path(sys.argv[1])
    window = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    for path in sorted(where.glob("latency-*.json")):
        dump = json.loads(path.read_text())
        first = dump["steady_from"]
        rows = sorted((e, a, r) for e, a, r in dump["events"] if e >= first)
        print(f"{path.stem.removeprefix('latency-')}: {len(rows):,} events counted")
        buckets: dict[int, list[tuple[float, float, float]]] = {}
        for row in rows:
            buckets.setdefault(int((row[0] - first) // window), []).append(row)
        for number, bucket in sorted(buckets.items()):
            print(_line(f"{number * window:4.0f}-{(number + 1) * window:.0f} s", bucket))
        print(_line("all counted", rows))


if __name__ == "__main__":
    main()
