"""The built-in scenarios, by name (``qoder-bridge simulate --scenario NAME``)."""

from __future__ import annotations

from pathlib import Path

from bridge.errors import ConfigError
from bridge.simulator.scenario import Faults, Scenario, SessionSpec, ThreadSpec


def _demo() -> Scenario:
    # Lively for `make run`: a few sessions, children appearing and finishing, an event every
    # 100-500 ms per thread, and a fresh set of sessions every 25 s so it never goes quiet.
    def session(start: float, title: str, children: int, final: str) -> SessionSpec:
        kids = tuple(
            ThreadSpec(events=14, rate=3.0, start_after_s=1.5 + 2.5 * i, final_status=final)  # type: ignore[arg-type]
            for i in range(children)
        )
        return SessionSpec(ThreadSpec(events=16, rate=3.0), kids, start, title)

    return Scenario(
        name="demo",
        seed=7,
        sessions=(
            session(0.0, "Fix the flaky retry test", 2, "idle"),
            session(3.0, "调研竞品 API 的最新动态", 3, "archived"),
            session(8.0, "Benchmark the ingest path 🚀", 4, "terminated"),
        ),
        repeat_every_s=25.0,
    )


def _default() -> Scenario:
    children = (
        ThreadSpec(events=15, start_after_s=0.1),
        ThreadSpec(events=15, start_after_s=0.3, rerun_after_s=0.5),
        ThreadSpec(events=15, start_after_s=0.5, final_status="archived"),
    )
    return Scenario(
        name="default",
        seed=1,
        sessions=(
            SessionSpec(ThreadSpec(events=14), children, title="Refactor the config loader"),
            SessionSpec(ThreadSpec(events=10), children[:1], 0.2, "Write the release notes"),
        ),
    )


def _adversarial() -> Scenario:
    # Everything a careful bridge must survive, at once and at a pace a test can follow (about
    # 7 s): the older list envelope (after_id only), Forward's strict streams (the cursor from
    # Last-Event-ID only), tail-only fresh streams, replays from before the cursor, bytes that
    # are not UTF-8, items with no id, cut streams, and short sessions archived soon after
    # they appear.
    def long(title: str) -> SessionSpec:
        kids = tuple(ThreadSpec(events=32, rate=6.0, start_after_s=0.5 * (i + 1)) for i in range(3))
        return SessionSpec(ThreadSpec(events=36, rate=6.0), kids, title=title)

    def brief(start: float, title: str) -> SessionSpec:
        kid = (ThreadSpec(events=10, rate=25.0, start_after_s=0.1),)
        return SessionSpec(ThreadSpec(events=12, rate=25.0), kid, start, title, archive=True)

    return Scenario(
        name="adversarial",
        seed=10,
        sessions=(
            long("Migrate the billing jobs"),
            long("审查依赖升级 🔍"),
            brief(2.5, "Quick lint fix"),
            brief(4.5, "One-off data export"),
        ),
        fresh_stream="tail",
        pagination="after_id",
        stream_query="strict",
        heartbeat_interval_s=1.0,
        faults=Faults(
            drop_rate=0.2,
            drop_after_frames=(3, 30),
            replay_rate=0.8,
            replay_max=3,
            invalid_utf8_rate=0.02,
            malformed_item_rate=0.02,
        ),
    )


_TINY = SessionSpec(ThreadSpec(events=8, rate=0), (ThreadSpec(events=8, rate=0),) * 2, title="tiny")

NAMED: dict[str, Scenario] = {
    "demo": _demo(),
    "default": _default(),
    # Everything generated at start: for tests that only read.
    "tiny": Scenario(name="tiny", seed=2, sessions=(_TINY,), instant=True),
    "many-threads": Scenario(
        name="many-threads",
        seed=3,
        sessions=(SessionSpec(ThreadSpec(events=8, rate=0), (ThreadSpec(events=6, rate=0),) * 30),),
        instant=True,
    ),
    # The older generation (G2): full replay on connect, named heartbeats, statuses[] honoured,
    # thread streams only on the events route.
    "legacy": Scenario(
        name="legacy",
        seed=4,
        sessions=(_TINY,),
        fresh_stream="replay",
        heartbeat="event",
        heartbeat_interval_s=1.0,
        honour_thread_statuses=True,
        thread_stream_routes="events",
    ),
    "adversarial": _adversarial(),
    "chaos": Scenario(
        name="chaos",
        seed=5,
        sessions=(
            SessionSpec(ThreadSpec(events=30, rate=50), (ThreadSpec(events=40, rate=50),) * 3),
        )
        * 2,
        heartbeat_interval_s=1.0,
        faults=Faults(
            error_rate=0.1,
            drop_rate=0.3,
            stall_rate=0.05,
            stall_s=2.0,
            replay_rate=0.5,
            non_json_rate=0.02,
            huge_rate=0.02,
        ),
    ),
    # Throughput: one thread with 100,000 events, all there at start.
    "bench": Scenario(
        name="bench",
        seed=6,
        sessions=(SessionSpec(ThreadSpec(events=100_000, rate=0)),),
        instant=True,
        fresh_stream="replay",
    ),
    # Fan-out: 2,000 threads (50 sessions x 40), quiet after start, heartbeats every second.
    "bench-streams": Scenario(
        name="bench-streams",
        seed=8,
        sessions=(SessionSpec(ThreadSpec(events=6, rate=0), (ThreadSpec(events=6, rate=0),) * 39),)
        * 50,
        instant=True,
        heartbeat_interval_s=1.0,
    ),
}


def load_scenario(source: Scenario | str | Path) -> Scenario:
    """A Scenario as is, a ``.json``/``.toml`` file, or the name of a built-in."""
    if isinstance(source, Scenario):
        return source
    path = Path(source)
    if isinstance(source, Path) or path.suffix in (".json", ".toml") or path.is_file():
        return Scenario.from_file(path)
    if source in NAMED:
        return NAMED[source]
    raise ConfigError(f"scenario {source!r}: not a file, nor one of {', '.join(sorted(NAMED))}")
