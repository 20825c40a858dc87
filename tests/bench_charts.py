"""The benchmark as pictures: ``make bench`` draws them at its end (``--charts DIR``, default
``.cache/bench/charts``), from the figures of that run, which it also leaves there as
``figures.json``. ``python -m tests.bench_charts DIR`` draws them again from that file.

- ``throughput.png``: events/s and CPU an event against the number of threads, for the bridge
  and both baselines (the plain producer on the same records, the tutorial script);
- ``latency.png``: the CDF of the latency from ``processed_at`` to a read_committed consumer,
  for both delivery modes;
- ``memory.png``: the bridge's RSS against the number of open idle streams.

matplotlib comes with the ``bench`` extra (and ``dev``); it never reaches the image.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

COLOURS = {
    "bridge at_least_once": "#1f77b4",
    "bridge exactly_once": "#17becf",
    "plain producer": "#2ca02c",
    "transactional producer": "#98df8a",
    "tutorial script": "#d62728",
}


def draw(figures: dict[str, Any], out: Path) -> list[Path]:
    """Write the charts the figures allow; returns their paths."""
    import matplotlib  # noqa: PLC0415 -- only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    # The command on one line, the machine on the next.
    caption = figures.get("caption", "").replace("  |  ", "\n")
    written: list[Path] = []

    runs = figures.get("pipeline") or []
    if runs:
        fig, (rate_ax, cpu_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
        for who, colour in COLOURS.items():
            points = sorted(((r["threads"], r) for r in runs if r["who"] == who), key=_first)
            if not points:
                continue
            xs = [t for t, _ in points]
            rates = [r["events"] / r["seconds"] for _, r in points]
            cpu = [r["cpu_s"] / r["events"] * 1e6 for _, r in points]
            style = {"color": colour, "marker": "o", "label": who}
            rate_ax.plot(xs, rates, **style)
            cpu_ax.plot(xs, cpu, **style)
        for ax in (rate_ax, cpu_ax):
            ax.set_xscale("log")
            ax.set_xlabel("threads (about 50,000 events of ~300 B in all)")
            ax.grid(True, which="both", alpha=0.3)
        rate_ax.set_ylabel("events/s (steady)")
        rate_ax.set_ylim(bottom=0)
        cpu_ax.set_ylabel("CPU µs an event (the worker process)")
        cpu_ax.set_ylim(bottom=0)
        rate_ax.legend(fontsize=8)
        fig.suptitle("Throughput: the bridge and its baselines, same records, same producer")
        fig.text(0.01, 0.01, caption, fontsize=7, alpha=0.7)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        written.append(_save(fig, out / "throughput.png"))

    latency = figures.get("latency") or []
    if latency:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for run in latency:
            values = sorted(run["receive_ms"])
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            # The bench's own rank (the smallest value with 99 % of the events at or below it).
            p99 = values[min(len(values) - 1, max(0, math.ceil(0.99 * len(values)) - 1))]
            label = f"{run['mode']} (p99 {p99:.1f} ms, {len(values):,} events)"
            (line,) = ax.plot(values, ys, label=label)
            left_out = sorted(run.get("warmup_ms") or [])
            if left_out:
                ys = [(i + 1) / len(left_out) for i in range(len(left_out))]
                label = f"{run['mode']}, warm-up left out ({len(left_out):,} events)"
                ax.plot(left_out, ys, label=label, linestyle=":", color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("ms from processed_at to a read_committed consumer")
        ax.set_ylabel("share of events")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        rate = figures.get("latency_rate", "")
        warmup = figures.get("latency_warmup", "")
        ax.set_title(f"Latency CDF at {rate}" + (f"\ncounted {warmup}" if warmup else ""))
        fig.text(0.01, 0.01, caption, fontsize=7, alpha=0.7)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        written.append(_save(fig, out / "latency.png"))

    memory = figures.get("memory") or []
    if memory:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        # Streams open when RSS was read (the simulator's count when /metrics did not answer);
        # a run whose streams did not all open is drawn hollow.
        points = sorted(
            (max(m["open_bridge"], m["open_simulator"], 0), m["rss"], m["open_s"] == m["open_s"])
            for m in memory
        )
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] / 2**20 for p in points], color="#1f77b4", label="bridge RSS")
        for x, rss, all_open in points:
            face = "#1f77b4" if all_open or x == 0 else "white"
            ax.plot([x], [rss / 2**20], "o", color="#1f77b4", markerfacecolor=face)
        full = [p for p in points if p[2] or p[0] == 0]
        if len(full) > 1 and full[-1][0] > full[0][0]:
            slope = (full[-1][1] - full[0][1]) / (full[-1][0] - full[0][0]) / 1024
            ax.set_title(f"RSS against open idle streams ({slope:.1f} KiB a stream)")
        ax.set_xlabel("open idle thread streams (heartbeats only)")
        ax.set_ylabel("RSS, MiB")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        fig.text(0.01, 0.01, caption, fontsize=7, alpha=0.7)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        written.append(_save(fig, out / "memory.png"))
    return written


def _first(pair: tuple[int, Any]) -> int:
    return pair[0]


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else ".cache/bench/charts")
    figures = json.loads((folder / "figures.json").read_text())
    for path in draw(figures, folder):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
