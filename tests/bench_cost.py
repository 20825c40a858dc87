"""What the bridge costs the API and the machine: ``python -m tests.bench --parts soak,restart,
startup,http2`` (each part runs alone too; ``make bench`` runs them after the throughput parts).

Every part runs the bridge as users run it (``python -m bridge run``, a child process) with the
bridge's own defaults unless a line says otherwise, against the simulator in another child
process, on the broker tests.bench started. Figures are ratios or per-unit costs:

soak
    An account of 3,000 sessions: 2,970 of history (a third archived, a third terminated) and
    30 running at any time, a new one every 2.7 s (a coordinator and two children, an event
    every 2 s each, about 80 s a session). The bridge catches up from nothing, is restarted
    (the history is then checkpointed) until steady again, and is watched for ``--soak-s``
    seconds (150; ``BRIDGE_BENCH_SOAK_S=1800`` for the 30-minute soak): API requests per
    second by route, TCP connections to the API against running threads + running sessions,
    RSS over time, the delay of each new thread's
    first event into Kafka (children, found through the session's hints; coordinators of new
    sessions, found by the discovery poll), and at the end every event of every thread is
    looked for in the topic.
restart
    1,000 running threads (25 sessions x 40), each with a checkpoint; the bridge is stopped
    (SIGTERM), the threads go on, and a new bridge starts with the default budget
    (``BRIDGE_API_MAX_RPS=50``): how long until every thread has a new record in Kafka, and
    the API requests it took, per thread.
startup
    100,000 historical threads: their checkpoints written straight into a checkpoint topic (as
    the bridge writes them: 32 recent ids each), then ``load_checkpoints`` timed in a child
    process (seconds, RSS before, peak and after), then the bridge started against an account
    whose 2,500 sessions those threads belong to: until ready, until its first full listing,
    its peak RSS and the requests the history cost.
http2
    The simulator's ASGI app served by hypercorn over TLS (ALPN: h2 or http/1.1), and a client
    process opening N thread streams with httpx as the bridge does (HTTP/1.1, pools of 128
    streams) or with ``http2=True`` (one connection per 100 streams, httpcore's most): streams
    per connection, time to open them all, RSS per idle stream, CPU per event; and whether a
    stream that goes silent is noticed (the bridge's stall timeout). Needs ``hypercorn`` and
    ``h2`` importable: ``pip install --target /tmp/h2pkgs hypercorn h2`` and
    ``PYTHONPATH=/tmp/h2pkgs``; skipped (said so) without them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.bench import (
    _CHILDREN,
    Bridge,
    CpuMeter,
    cpu_seconds,
    create_events_topic,
    fmt,
    free_port,
    percentile,
    proc_status,
    ratio,
    say,
    table,
)
from tests.bridge_harness import TOKEN, BridgeProcess, bridge_env
from tests.kafka_broker import KafkaTopics, create_topics, read_topic

PARTITIONS = 6
#: The bridge's own defaults, written out: tests.bridge_harness.bridge_env sets test values.
DEFAULTS = {
    "BRIDGE_API_MAX_RPS": "50",
    "BRIDGE_MAX_STREAMS": "2000",
    "BRIDGE_POLL_INTERVAL_S": "15",
    "BRIDGE_FULL_SCAN_INTERVAL_S": "600",
    "BRIDGE_LIST_POLL_INTERVAL_S": "5",
    "BRIDGE_STALL_TIMEOUT_S": "45",
    "BRIDGE_BACKOFF_INITIAL_S": "0.5",
    "BRIDGE_BACKOFF_MAX_S": "30",
    "BRIDGE_DRAIN_TIMEOUT_S": "20",
    "BRIDGE_TOPIC_PARTITIONS": str(PARTITIONS),
}
#: Routes of qoder_bridge_api_requests_total that read a thread (the rest are discovery).
THREAD_ROUTES = ("events", "stream", "thread")
PUBLISHED = "qoder_bridge_events_published_total"
REQUESTS = "qoder_bridge_api_requests_total"
SOAK_ENV = "BRIDGE_BENCH_SOAK_S"


@dataclass(frozen=True)
class CostSizes:
    history_sessions: int
    running_sessions: int
    session_every_s: float
    soak_s: float
    restart_sessions: int  # x 40 threads
    startup_threads: int
    h2_streams: tuple[int, ...]


FULL_COST = CostSizes(2970, 30, 2.7, 150.0, 25, 100_000, (1_000, 5_000))
QUICK_COST = CostSizes(570, 10, 8.0, 60.0, 5, 20_000, (400,))


# -- the simulator child: richer counts, a dump of what it emitted, freeze, traffic ----------


def serve_simulator(args: argparse.Namespace) -> None:
    """The child: the simulator (uvicorn, or hypercorn with TLS), a status file every 0.5 s;
    SIGUSR1 stops the scenario (no new event, no new thread) and writes the dump, SIGUSR2
    writes the dump (with ``--traffic-rate``: starts the traffic instead)."""
    from bridge.simulator import Scenario, running_simulator  # noqa: PLC0415 -- child only
    from bridge.simulator.server import Simulator  # noqa: PLC0415

    status_path: Path = args.status
    dump_path = status_path.with_suffix(".dump.json")

    def write(path: Path, data: Any) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)

    def status(sim: Any) -> dict[str, Any]:
        sessions = sim.world.sessions
        threads = [t for s in sessions for t in s.threads]
        return {
            "time": time.time(),
            "events": sum(len(t.log) for t in threads),
            "history_events": sum(
                len(t.log) for s in sessions if s.spec.title == "history" for t in s.threads
            ),
            "threads": len(threads),
            "running_threads": sum(1 for t in threads if t.status == "running"),
            "sessions": len(sessions),
            "running_sessions": sum(1 for s in sessions if s.status == "running"),
            "thread_streams": sum(1 for c in sim.app.open if c.thread_id),
            "session_streams": sum(1 for c in sim.app.open if not c.thread_id),
            "stalls": sum(1 for _, what in sim.app.planner.log if "stall" in what),
            "idle": sim.driver.idle.is_set(),
            "traffic": traffic_sent,
        }

    def dump(sim: Any) -> dict[str, Any]:
        return {
            "sessions": {s.id: s.updated.rfc3339_ms for s in sim.world.sessions},
            "threads": [
                [s.id, t.id, t.parent_id is None, t.created.ms, [e.id for e in t.log.events]]
                for s in sim.world.sessions
                for t in s.threads
            ],
        }

    traffic_sent = 0

    async def traffic(sim: Any, rate: float, seconds: float) -> None:
        """``rate`` events/s over every thread in turn, for ``seconds``: ~300-byte messages."""
        from bridge.simulator.events import Step  # noqa: PLC0415

        nonlocal traffic_sent
        threads = [t for s in sim.world.sessions for t in s.threads]
        text = "The retry loop never resets its backoff after a healthy connection. " * 3
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < seconds:
            due = int(elapsed * rate)
            while traffic_sent < due:
                thread = threads[traffic_sent % len(threads)]
                body = {"content": [{"type": "text", "text": text}]}
                sim.world.emit(thread, Step("agent.message", body))
                traffic_sent += 1
            await anyio.sleep(0.01)

    async def report(sim: Any) -> None:
        while True:
            write(status_path, status(sim))
            await anyio.sleep(0.5)

    async def control(sim: Any, freeze: anyio.CancelScope, tg: Any) -> None:
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
        with anyio.open_signal_receiver(*signals) as received:
            async for signum in received:
                if signum in (signal.SIGINT, signal.SIGTERM):
                    return
                if signum == signal.SIGUSR2 and args.traffic_rate:
                    tg.start_soon(traffic, sim, args.traffic_rate, args.traffic_s)
                    continue
                if signum == signal.SIGUSR1:
                    freeze.cancel()
                write(dump_path, dump(sim))

    async def uvicorn_main() -> None:
        scenario = Scenario.from_file(args.serve_simulator)
        ctx = running_simulator(scenario, token=TOKEN, port=args.port)
        async with ctx as sim, anyio.create_task_group() as tg:
            tg.start_soon(report, sim)
            await control(sim, ctx._driver_scope, tg)
            tg.cancel_scope.cancel()

    async def hypercorn_main() -> None:
        from hypercorn.asyncio import serve  # noqa: PLC0415 -- the http2 part only
        from hypercorn.config import Config  # noqa: PLC0415

        scenario = Scenario.from_file(args.serve_simulator)
        sim = Simulator(scenario, TOKEN, "127.0.0.1", args.port)
        config = Config()
        config.bind = [f"127.0.0.1:{args.port}"]
        config.certfile, config.keyfile = args.tls
        config.backlog = 4096
        config.accesslog = None
        config.errorlog = None
        config.keep_alive_timeout = 3600
        stop = anyio.Event()
        driver = anyio.CancelScope()

        async def drive() -> None:
            with driver:
                await sim.driver.run()

        async with anyio.create_task_group() as tg:
            sim.driver.start()
            tg.start_soon(drive)
            tg.start_soon(lambda: serve(sim.app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
            tg.start_soon(report, sim)
            await control(sim, driver, tg)
            stop.set()
            await anyio.sleep(1)
            tg.cancel_scope.cancel()

    anyio.run(hypercorn_main if args.server == "hypercorn" else uvicorn_main)


class SimChild:
    """The simulator in a child process (``python -m tests.bench_cost --serve-simulator``)."""

    def __init__(
        self,
        scenario: dict[str, Any],
        workdir: Path,
        *,
        tls: tuple[Path, Path] | None = None,
        traffic: tuple[float, float] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        name = scenario["name"]
        self.scenario_path = workdir / f"{name}.json"
        self.scenario_path.write_text(json.dumps(scenario))
        self.status_path = workdir / f"{name}.status.json"
        self.dump_path = self.status_path.with_suffix(".dump.json")
        for path in (self.status_path, self.dump_path):
            path.unlink(missing_ok=True)
        self.port = free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/api/v1/cloud"
        cmd = [
            sys.executable,
            "-m",
            "tests.bench_cost",
            "--serve-simulator",
            str(self.scenario_path),
        ]
        cmd += ["--port", str(self.port), "--status", str(self.status_path)]
        if tls:
            cmd += ["--server", "hypercorn", "--tls", str(tls[0]), str(tls[1])]
        if traffic:
            cmd += ["--traffic-rate", str(traffic[0]), "--traffic-s", str(traffic[1])]
        log = (workdir / f"{name}.simulator.log").open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
        )
        _CHILDREN.append(self.proc)

    async def started(self, timeout_s: float = 180) -> None:
        with anyio.fail_after(timeout_s):
            while not self.status_path.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"simulator exited with {self.proc.returncode}")
                await anyio.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return json.loads(self.status_path.read_text())

    async def dump(self, *, freeze: bool) -> dict[str, Any]:
        """What it emitted: every thread's event ids; ``freeze`` stops the scenario first."""
        self.dump_path.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1 if freeze else signal.SIGUSR2)
        with anyio.fail_after(120):
            while not self.dump_path.exists():
                await anyio.sleep(0.1)
        return json.loads(self.dump_path.read_text())

    def start_traffic(self) -> None:
        self.proc.send_signal(signal.SIGUSR2)

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await anyio.to_thread.run_sync(lambda: self.proc.wait(30))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await anyio.to_thread.run_sync(self.proc.wait)


# -- the bridge with chosen settings, and what /proc says about a process --------------------


class CostBridge(Bridge):
    """``python -m bridge run`` with the given settings over bridge_env's."""

    def __init__(
        self, url: str, bootstrap: str, topics: KafkaTopics, workdir: Path, label: str, **env: str
    ) -> None:
        self.http_port = free_port()
        full = bridge_env(url, bootstrap, topics, **env, BRIDGE_HTTP_PORT=str(self.http_port))
        self.log_path = workdir / f"{label}.{uuid.uuid4().hex[:6]}.bridge.log"
        self.process = BridgeProcess(full, self.log_path)
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", timeout=5)
        self.started_at = math.nan
        self.stop_s = math.nan
        self.spy = None

    async def by_label(self, name: str, label: str) -> dict[str, float]:
        """One metric summed per value of one label (e.g. requests per route)."""
        try:
            text = (await self.client.get("/metrics")).text
        except httpx.HTTPError:
            return {}
        out: dict[str, float] = defaultdict(float)
        for line in text.splitlines():
            if line.startswith(name + "{"):
                labels, _, value = line.rpartition(" ")
                for part in labels[len(name) + 1 : -1].split(","):
                    key, _, raw = part.partition("=")
                    if key == label:
                        out[raw.strip('"')] += float(value)
        return dict(out)

    async def wait_ready(self, timeout_s: float = 120) -> float:
        """Seconds from the start until /readyz answers 200."""
        with anyio.fail_after(timeout_s):
            while not await self.ready():
                if not self.alive():
                    raise RuntimeError(f"the bridge exited; log {self.log_path}")
                await anyio.sleep(0.05)
        return time.time() - self.started_at


def rss(pid: int) -> int:
    return proc_status(pid, "VmRSS")


def tcp_connections(pid: int, remote_port: int) -> int:
    """Established TCP connections of ``pid`` to ``remote_port`` (loopback), from /proc."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return 0
    count = 0
    for table_name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table_name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if (
                state == "01"
                and inode in inodes
                and int(remote.rsplit(":", 1)[1], 16) == remote_port
            ):
                count += 1
    return count


# -- Kafka: lean reads --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    key: str
    event_id: str
    emitted: str  # ce_time: the event's processed_at
    appended_ms: int  # LogAppendTime
    offset: int


async def read_events(
    bootstrap: str, topic: str, start: dict[int, int] | None = None, timeout_s: float = 300
) -> list[Seen]:
    """Every committed record of the topic from ``start`` (or the beginning) to its end as of
    now, keeping only what the figures need."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 2**20,
    )
    out: list[Seen] = []
    await consumer.start()
    try:
        with anyio.fail_after(timeout_s):
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, (start or {}).get(tp.partition, 0))
            ends = await consumer.end_offsets(tps)
            remaining = {tp for tp in tps if ends[tp] > (start or {}).get(tp.partition, 0)}
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=20_000)
                for records in batches.values():
                    for r in records:
                        headers = dict(r.headers)
                        out.append(
                            Seen(
                                r.key.decode(),
                                headers["ce_id"].decode(),
                                headers["ce_time"].decode(),
                                r.timestamp,
                                r.offset,
                            )
                        )
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
    finally:
        await consumer.stop()
    return out


async def end_offsets(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: ends[tp] for tp in tps}
    finally:
        await consumer.stop()


async def checkpoint_keys(bootstrap: str, topic: str) -> int:
    """Distinct keys in the checkpoint topic (read_committed, every shard, to its end now)."""
    return len({r.key for r in await read_topic(bootstrap, topic)})


@dataclass
class Check:
    """Every event the simulator emitted, looked for in the topic."""

    expected: int = 0
    found: int = 0
    missing: int = 0
    duplicates: int = 0

    @property
    def verdict(self) -> str:
        if self.missing == 0 and self.duplicates == 0:
            return f"all {self.expected:,} events there, once each"
        return f"{self.missing:,} of {self.expected:,} missing, {self.duplicates:,} twice"


def check_delivery(dump: dict[str, Any], seen: Sequence[Seen]) -> Check:
    got = Counter((s.key, s.event_id) for s in seen)
    result = Check()
    for session_id, thread_id, _coordinator, _created, ids in dump["threads"]:
        key = f"{session_id}/{thread_id}"
        for event_id in ids:
            result.expected += 1
            n = got.get((key, event_id), 0)
            result.found += n > 0
            result.missing += n == 0
            result.duplicates += max(0, n - 1)
    return result


def epoch_s(stamp: str) -> float:
    from tests.bench import _epoch  # noqa: PLC0415

    return _epoch(stamp)


async def wait_steady(bridge: CostBridge, timeout_s: float = 900) -> float:
    """Seconds from the start until the bridge is past a discovery poll (15 s) and its request
    rate no longer presses on the budget (under a quarter of it for 15 s): what a start costs
    is spent."""
    budget = float(DEFAULTS["BRIDGE_API_MAX_RPS"])
    totals: list[tuple[float, float]] = []
    with anyio.move_on_after(timeout_s):
        while True:
            now = time.time() - bridge.started_at
            totals.append((now, (await bridge.metrics()).get(REQUESTS, 0.0)))
            back = [r for t, r in totals if t <= now - 15]
            if now >= 30 and back and (totals[-1][1] - back[-1]) / 15 < budget / 4:
                break
            await anyio.sleep(1)
    return time.time() - bridge.started_at


async def wait_published(
    bridge: CostBridge, sim: SimChild, timeout_s: float = 120, quiet_s: float = 20
) -> None:
    """Until the bridge has published as many events as the simulator emitted, or nothing
    moved for ``quiet_s``."""
    last, since = -1.0, time.monotonic()
    with anyio.move_on_after(timeout_s):
        while True:
            published = (await bridge.metrics()).get(PUBLISHED, 0.0)
            if published >= sim.status()["events"]:
                return
            if published > last:
                last, since = published, time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return
            await anyio.sleep(0.5)


# -- scenarios -----------------------------------------------------------------------------------


def account_scenario(sizes: CostSizes, horizon_s: float) -> dict[str, Any]:
    """History (finished at start) and live sessions, a new one every ``session_every_s``."""
    third = sizes.history_sessions // 3
    history = [
        {
            "count": count,
            "title": "history",
            "coordinator": {"events": 12, "rate": 0},
            "children": [{"events": 10, "rate": 0}],
            **extra,
        }
        for count, extra in (
            (third, {"archive": True}),
            (third, {"terminate": True}),
            (sizes.history_sessions - 2 * third, {}),
        )
    ]
    live = [
        {
            "title": "live",
            "start_after_s": round(i * sizes.session_every_s, 2),
            "coordinator": {"events": 30, "rate": 0.5},
            "children": [
                {"events": 20, "rate": 0.5, "start_after_s": 10},
                {"events": 20, "rate": 0.5, "start_after_s": 30},
            ],
        }
        for i in range(int(horizon_s / sizes.session_every_s) + 1)
    ]
    return {"name": "bench-account", "seed": 21, "sessions": history + live}


def running_scenario(sessions: int, events: int, rate: float) -> dict[str, Any]:
    """``sessions`` x 40 threads that keep running, an event every 1/rate s each."""
    child = {"count": 39, "events": events, "rate": rate}
    coordinator = {"events": events, "rate": rate}  # it spawns the children at its 4th event
    spec = {"count": sessions, "coordinator": coordinator, "children": [child]}
    return {"name": "bench-restart", "seed": 22, "sessions": [spec]}


def history_scenario(sessions: int) -> dict[str, Any]:
    specs = [
        {"count": count, "coordinator": {"events": 6, "rate": 0}, **extra}
        for count, extra in (
            (sessions // 3, {"archive": True}),
            (sessions // 3, {"terminate": True}),
            (sessions - 2 * (sessions // 3), {}),
        )
    ]
    return {"name": "bench-history", "seed": 23, "instant": True, "sessions": specs}


def idle_threads_scenario(streams: int, heartbeat_s: float = 5.0) -> dict[str, Any]:
    """Threads that are there and idle (``streams`` / 40 sessions x 40): their streams carry
    heartbeats until the traffic starts."""
    spec = {
        "count": streams // 40,
        "coordinator": {"events": 6, "rate": 0},
        "children": [{"count": 39, "events": 6, "rate": 0}],
    }
    return {
        "name": f"bench-h2-{streams}",
        "seed": 24,
        "instant": True,
        "heartbeat_interval_s": heartbeat_s,
        "sessions": [spec],
    }


def stalling_scenario(streams: int) -> dict[str, Any]:
    """Threads with an event a second; about a third of the streams go silent (no heartbeat
    either) at their first event, for a minute."""
    return {
        "name": f"bench-h2-stall-{streams}",
        "seed": 25,
        "heartbeat_interval_s": 1.0,
        "sessions": [{"count": streams, "coordinator": {"events": 120, "rate": 1.0}}],
        "faults": {"stall_rate": 0.3, "stall_after_frames": [1, 1], "stall_s": 60.0},
    }


# -- results -------------------------------------------------------------------------------------


@dataclass
class Soak:
    sessions: int = 0
    catch_up_s: float = math.nan
    catch_up_requests: float = math.nan
    catch_up_events: int = 0
    restart_requests: dict[str, float] = field(default_factory=dict)
    restart_ready_s: float = math.nan
    restart_streaming_s: float = math.nan  # every running thread has its stream again
    restart_s: float = math.nan
    window_s: float = math.nan
    requests: dict[str, float] = field(default_factory=dict)  # per route, in the window
    new_threads: int = 0
    running_threads: float = math.nan  # mean over the window
    running_sessions: float = math.nan
    conns_max: int = 0
    excess_max: int = 0  # connections - (running threads + running sessions), worst sample
    excess_mean: float = math.nan
    rss_first: int = 0
    rss_last: int = 0
    rss_max: int = 0
    rss_slope_mb_h: float = math.nan
    cpu: float = math.nan  # bridge, % of one core over the window
    events: int = 0  # published in the window
    first_child: list[float] = field(default_factory=list)  # s, emit -> append
    first_coordinator: list[float] = field(default_factory=list)
    check: Check | None = None
    exit_code: int | None = None


@dataclass
class Restart:
    threads: int = 0
    ready_s: float = math.nan
    all_streams_s: float = math.nan  # the simulator saw every thread stream open
    flowing: list[float] = field(default_factory=list)  # per thread, s from start
    requests: float = math.nan  # when the last thread flowed
    requests_by_route: dict[str, float] = field(default_factory=dict)
    checkpoints: int = 0
    check: Check | None = None


@dataclass
class Startup:
    threads: int = 0
    records: int = 0
    topic_mib: float = math.nan
    write_s: float = math.nan
    loads: list[dict[str, Any]] = field(default_factory=list)
    ready_s: float = math.nan
    loop_stall_s: float = math.nan  # the longest /livez answer until after the first listing
    steady_s: float = math.nan
    scan_cpu_s: float = math.nan
    scan_s: float = math.nan
    rss: int = 0
    hwm: int = 0
    requests: dict[str, float] = field(default_factory=dict)
    followed: float = math.nan
    sessions: int = 0


@dataclass
class H2Run:
    mode: str
    streams: int
    opened: int = 0
    open_s: float = math.nan
    connections: int = 0
    rss_base: int = 0
    rss_idle: int = 0
    idle_cpu: float = math.nan
    events: int = 0
    cpu_per_event_us: float = math.nan
    server_cpu_per_event_us: float = math.nan
    note: str = ""


# -- the parts --------------------------------------------------------------------------------


class CostBench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, broker_pid: int, workdir: Path):
        self.args = args
        self.bootstrap = bootstrap
        self.broker_pid = broker_pid
        self.workdir = workdir
        self.sizes = QUICK_COST if args.quick else FULL_COST
        soak = args.soak_s or float(os.environ.get(SOAK_ENV) or 0) or self.sizes.soak_s
        self.soak_s = soak
        self.soak: Soak | None = None
        self.restart: Restart | None = None
        self.startup: Startup | None = None
        self.h2: list[H2Run] = []
        self.h2_notes: list[str] = []
        self._window = (math.nan, math.nan)
        self._defaults_said = False

    def _say_defaults(self) -> None:
        if not self._defaults_said:
            self._defaults_said = True
            say(
                "\nsoak, restart, startup: the bridge's own defaults, not the settings above ("
                + " ".join(f"{k}={v}" for k, v in DEFAULTS.items())
                + "), unless a line says otherwise"
            )

    # -- soak -----------------------------------------------------------------------------------

    async def run_soak(self) -> None:
        s = self.sizes
        total = s.history_sessions + s.running_sessions
        catch_up_bound = 1200.0
        horizon = catch_up_bound + 120 + self.soak_s
        sim = SimChild(account_scenario(s, horizon), self.workdir)
        result = Soak(sessions=total)
        self.soak = result
        self._say_defaults()
        say(
            f"\nsoak: an account of {total:,} sessions, {s.history_sessions:,} of history and"
            f" ~{s.running_sessions} running (a new one every {s.session_every_s:g} s);"
            f" {self.soak_s:.0f} s watched ({SOAK_ENV}=1800 for 30 minutes)"
        )
        topics = KafkaTopics.unique("bench-account")
        await create_events_topic(self.bootstrap, topics.events)
        bridge: CostBridge | None = None
        try:
            await sim.started()
            # 1. Catch up from nothing. (With BRIDGE_API_MAX_RPS=500 here, 3,000 sessions'
            # looks queue in the 64-connection JSON pool faster than it drains, and the bridge
            # stalls: PoolTimeouts, retries, nothing published in 10 minutes.)
            bridge = CostBridge(
                sim.url, self.bootstrap, topics, self.workdir, "soak-catchup", **DEFAULTS
            )
            bridge.start()
            await bridge.wait_ready()
            with anyio.fail_after(catch_up_bound):
                while True:
                    m, st = await bridge.metrics(), sim.status()
                    if (
                        m.get(PUBLISHED, 0) >= st["history_events"]
                        and m.get("qoder_bridge_threads_followed", 1e9) <= st["running_threads"] + 5
                    ):
                        break
                    await anyio.sleep(1)
            result.catch_up_s = time.time() - bridge.started_at
            result.catch_up_requests = m.get("qoder_bridge_api_requests_total", math.nan)
            result.catch_up_events = int(m.get(PUBLISHED, 0))
            say(
                f"  caught up in {result.catch_up_s:.0f} s: {result.catch_up_events:,} events,"
                f" {result.catch_up_requests:,.0f} API requests"
            )
            await anyio.sleep(5)
            await bridge.stop()
            # 2. Restart with every default: the history is checkpointed now.
            bridge = CostBridge(sim.url, self.bootstrap, topics, self.workdir, "soak", **DEFAULTS)
            async with anyio.create_task_group() as tg:
                bridge.start()
                tg.start_soon(_all_streaming, bridge, sim, result)
                result.restart_ready_s = await bridge.wait_ready()
                result.restart_s = await wait_steady(bridge)
                tg.cancel_scope.cancel()
            result.restart_requests = await bridge.by_label(REQUESTS, "route")
            say(
                f"  restarted with the defaults: every running thread streaming again after"
                f" {result.restart_streaming_s:.1f} s; ready after {result.restart_ready_s:.1f} s;"
                f" steady after {result.restart_s:.0f} s and"
                f" {sum(result.restart_requests.values()):,.0f} requests"
                f" ({_routes(result.restart_requests)})"
            )
            # 3. The watched window.
            await self._soak_window(bridge, sim, result)
            # 4. Nothing missing: stop the scenario, let the bridge finish, look for everything.
            dump = await sim.dump(freeze=True)
            await wait_published(bridge, sim)
            await anyio.sleep(2)
            result.exit_code = await bridge.stop()
            seen = await read_events(self.bootstrap, topics.events)
            result.check = check_delivery(dump, seen)
            self._first_events(result, dump, seen)
        except Exception:
            if bridge is not None:
                say(f"  bridge log ({bridge.log_path}):\n{bridge.log_tail()}")
            raise
        finally:
            if bridge is not None:
                with anyio.CancelScope(shield=True):
                    await bridge.stop()
            await sim.stop()
        self._say_soak(result)

    async def _soak_window(self, bridge: CostBridge, sim: SimChild, result: Soak) -> None:
        assert bridge.process.proc is not None
        pid = bridge.pid
        began = time.time()
        self._window = (began, began + self.soak_s)
        requests0 = await bridge.by_label("qoder_bridge_api_requests_total", "route")
        published0 = (await bridge.metrics()).get(PUBLISHED, 0)
        threads0 = sim.status()["threads"]
        meter = CpuMeter({"bridge": pid})
        running_t: list[int] = []
        running_s: list[int] = []
        excess: list[int] = []
        rss_samples: list[tuple[float, int]] = []
        next_rss = 0.0
        while (now := time.time()) < began + self.soak_s:
            st = sim.status()
            conns = tcp_connections(pid, sim.port)
            running_t.append(st["running_threads"])
            running_s.append(st["running_sessions"])
            excess.append(conns - st["running_threads"] - st["running_sessions"])
            result.conns_max = max(result.conns_max, conns)
            if now >= next_rss:
                rss_samples.append((now - began, rss(pid)))
                next_rss = now + 5
            if not bridge.alive():
                raise RuntimeError("the bridge exited during the soak")
            await anyio.sleep(1)
        rss_samples.append((time.time() - began, rss(pid)))
        result.window_s = time.time() - began
        result.cpu = meter.read()["bridge"]
        requests1 = await bridge.by_label("qoder_bridge_api_requests_total", "route")
        result.requests = {k: v - requests0.get(k, 0) for k, v in requests1.items()}
        result.events = int((await bridge.metrics()).get(PUBLISHED, 0) - published0)
        result.new_threads = sim.status()["threads"] - threads0
        result.running_threads = sum(running_t) / len(running_t)
        result.running_sessions = sum(running_s) / len(running_s)
        result.excess_max = max(excess)
        result.excess_mean = sum(excess) / len(excess)
        result.rss_first, result.rss_last = rss_samples[0][1], rss_samples[-1][1]
        result.rss_max = max(v for _, v in rss_samples)
        result.rss_slope_mb_h = _slope(rss_samples) * 3600 / 2**20

    def _first_events(self, result: Soak, dump: dict[str, Any], seen: Sequence[Seen]) -> None:
        """Each thread created in the window: its first event, emitted -> appended."""
        start, end = self._window
        at = {(s.key, s.event_id): s for s in seen}
        for session_id, thread_id, coordinator, created_ms, ids in dump["threads"]:
            if not ids or not start <= created_ms / 1000 <= end:
                continue
            record = at.get((f"{session_id}/{thread_id}", ids[0]))
            if record is None:
                continue
            delay = record.appended_ms / 1000 - epoch_s(record.emitted)
            (result.first_coordinator if coordinator else result.first_child).append(delay)

    def _say_soak(self, r: Soak) -> None:
        total = sum(r.requests.values())
        threads = sum(r.requests.get(k, 0) for k in THREAD_ROUTES)
        say(
            f"  {r.window_s:.0f} s watched: {total / r.window_s:.2f} requests/s"
            f" ({(total - threads) / r.window_s:.2f}/s discovery, {threads / r.window_s:.2f}/s"
            f" thread reads), {r.new_threads} new threads, {r.running_threads:.0f} threads and"
            f" {r.running_sessions:.0f} sessions running on average"
        )
        say(
            f"  connections to the API: at most {r.conns_max} (at most running threads + running"
            f" sessions + {r.excess_max}); RSS {r.rss_first / 2**20:.1f} ->"
            f" {r.rss_last / 2**20:.1f} MiB; {r.check.verdict if r.check else 'not checked'}"
        )

    # -- restart -------------------------------------------------------------------------------

    async def run_restart(self) -> None:
        n = self.sizes.restart_sessions * 40
        result = Restart(threads=n)
        self.restart = result
        self._say_defaults()
        say(f"\nrestart: {n:,} running threads, each with a checkpoint, the default budget")
        rate = 0.5
        sim = SimChild(running_scenario(self.sizes.restart_sessions, 110, rate), self.workdir)
        topics = KafkaTopics.unique("bench-restart")
        await create_events_topic(self.bootstrap, topics.events)
        bridge: CostBridge | None = None
        try:
            await sim.started()
            bridge = CostBridge(
                sim.url, self.bootstrap, topics, self.workdir, "restart-first",
                **{**DEFAULTS, "BRIDGE_API_MAX_RPS": "1000"},
            )  # fmt: skip
            bridge.start()
            with anyio.fail_after(120):
                while sim.status()["thread_streams"] < n:
                    await anyio.sleep(0.5)
            with anyio.fail_after(90):
                while (keys := await checkpoint_keys(self.bootstrap, topics.checkpoints)) < n:
                    await anyio.sleep(2)
            result.checkpoints = keys
            await bridge.stop()
            say(
                f"  first bridge: every stream open and {keys:,} checkpoints; stopped (SIGTERM) in"
                f" {bridge.stop_s:.1f} s"
            )
            await anyio.sleep(3)  # the threads go on: every one has something new
            ends = await end_offsets(self.bootstrap, topics.events)
            bridge = CostBridge(
                sim.url, self.bootstrap, topics, self.workdir, "restart", **DEFAULTS
            )
            first: dict[str, float] = {}
            samples: list[tuple[float, float]] = []  # (s since start, requests so far)
            async with anyio.create_task_group() as tg:
                await tg.start(_first_after, self.bootstrap, topics.events, ends, first)
                bridge.start()
                t0 = bridge.started_at
                result.ready_s = await bridge.wait_ready()
                with anyio.move_on_after(120):
                    while len(first) < n or math.isnan(result.all_streams_s):
                        now = time.time() - t0
                        m = await bridge.metrics()
                        samples.append((now, m.get("qoder_bridge_api_requests_total", 0)))
                        if math.isnan(result.all_streams_s) and sim.status()["thread_streams"] >= n:
                            result.all_streams_s = now
                        await anyio.sleep(0.25)
                tg.cancel_scope.cancel()
            result.flowing = sorted(ms / 1000 - t0 for ms in first.values())
            if len(first) >= n:
                last = result.flowing[-1]
                result.requests = next((r for t, r in samples if t >= last), samples[-1][1])
            result.requests_by_route = await bridge.by_label(
                "qoder_bridge_api_requests_total", "route"
            )
            dump = await sim.dump(freeze=True)
            await wait_published(bridge, sim)
            await anyio.sleep(2)
            await bridge.stop()
            result.check = check_delivery(dump, await read_events(self.bootstrap, topics.events))
        except Exception:
            if bridge is not None:
                say(f"  bridge log ({bridge.log_path}):\n{bridge.log_tail()}")
            raise
        finally:
            if bridge is not None:
                with anyio.CancelScope(shield=True):
                    await bridge.stop()
            await sim.stop()
        flowing = f"{len(result.flowing):,} of {n:,} threads flowing"
        say(
            f"  restarted: ready after {result.ready_s:.1f} s; {flowing}, the last after"
            f" {fmt(result.flowing[-1] if result.flowing else math.nan, '.1f', ' s')};"
            f" {fmt(result.requests / n, '.2f')} requests per thread;"
            f" {result.check.verdict if result.check else ''}"
        )

    # -- startup -------------------------------------------------------------------------------

    async def run_startup(self) -> None:
        n = self.sizes.startup_threads
        versions = self.args.checkpoint_versions
        sessions = max(1, n // 40)
        result = Startup(threads=n, sessions=sessions)
        self.startup = result
        self._say_defaults()
        say(
            f"\nstartup: {n:,} historical threads ({sessions:,} sessions x 40) with a checkpoint"
            f" each{f', {versions} records per thread (uncompacted)' if versions > 1 else ''}"
        )
        sim = SimChild(history_scenario(sessions), self.workdir)
        topics = KafkaTopics.unique("bench-startup")
        bridge: CostBridge | None = None
        try:
            await sim.started()
            dump = await sim.dump(freeze=False)
            await create_topics(
                self.bootstrap,
                [topics.checkpoints],
                partitions=1,
                configs={"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
            )
            began = time.monotonic()
            result.records, size = await write_checkpoints(
                self.bootstrap, topics.checkpoints, dump, n, versions
            )
            result.write_s = time.monotonic() - began
            result.topic_mib = size / 2**20
            say(
                f"  wrote {result.records:,} checkpoint records ({result.topic_mib:.0f} MiB of"
                f" values) in {result.write_s:.1f} s"
            )
            for how in ("index", "dict"):
                load = await load_in_child(self.bootstrap, topics.checkpoints, how)
                result.loads.append(load)
                say(
                    f"  read into {how}: {load['threads']:,} threads in {load['load_s']:.1f} s,"
                    f" RSS {load['rss_before'] / 2**20:.0f} -> {load['rss_after'] / 2**20:.0f}"
                    f" MiB, peak {load['hwm'] / 2**20:.0f} MiB"
                )
            bridge = CostBridge(
                sim.url, self.bootstrap, topics, self.workdir, "startup", **DEFAULTS
            )
            stalls: list[float] = []
            async with anyio.create_task_group() as tg:
                bridge.start()
                tg.start_soon(_answer_times, bridge, stalls)
                result.ready_s = await bridge.wait_ready(300)
                await bridge.wait_for(
                    "a full listing", lambda m: m.get("qoder_bridge_full_scans_total", 0) >= 1, 120
                )
                result.scan_s = time.time() - bridge.started_at
                result.scan_cpu_s = cpu_seconds(bridge.pid)
                await anyio.sleep(2)
                tg.cancel_scope.cancel()
            result.loop_stall_s = max(stalls, default=math.nan)
            result.steady_s = await wait_steady(bridge)
            result.rss = rss(bridge.pid)
            result.hwm = proc_status(bridge.pid, "VmHWM")
            result.requests = await bridge.by_label("qoder_bridge_api_requests_total", "route")
            result.followed = (await bridge.metrics()).get("qoder_bridge_threads_followed", 0)
        except Exception:
            if bridge is not None:
                say(f"  bridge log ({bridge.log_path}):\n{bridge.log_tail()}")
            raise
        finally:
            if bridge is not None:
                with anyio.CancelScope(shield=True):
                    await bridge.stop()
            await sim.stop()
        say(
            f"  bridge: ready after {result.ready_s:.1f} s, first full listing after"
            f" {result.scan_s:.1f} s ({result.scan_cpu_s:.1f} s of CPU; /livez answered within"
            f" {result.loop_stall_s:.2f} s throughout), steady after {result.steady_s:.0f} s and"
            f" {sum(result.requests.values()):,.0f} requests ({_routes(result.requests)}),"
            f" RSS {result.rss / 2**20:.0f} MiB (peak {result.hwm / 2**20:.0f} MiB)"
        )

    # -- http2 ---------------------------------------------------------------------------------

    async def run_http2(self) -> None:
        probe = subprocess.run(
            [sys.executable, "-c", "import hypercorn, h2"], capture_output=True, check=False
        )
        if probe.returncode != 0:
            note = (
                "skipped: needs hypercorn and h2 (pip install --target /tmp/h2pkgs hypercorn h2;"
                " PYTHONPATH=/tmp/h2pkgs python -m tests.bench --parts http2)"
            )
            self.h2_notes.append(note)
            say(f"\nhttp2: {note}")
            return
        say("\nhttp2: hypercorn over TLS serving the simulator; httpx clients in a child process")
        tls = make_cert(self.workdir)
        for streams in self.sizes.h2_streams:
            for mode in ("http1.1", "h2"):
                run = await self.h2_run(mode, streams, tls)
                self.h2.append(run)
                say(
                    f"  {mode}, {streams:,} streams: {run.opened:,} open over"
                    f" {run.connections:,} connections in {fmt(run.open_s, '.1f', ' s')};"
                    f" {fmt((run.rss_idle - run.rss_base) / 1024 / max(1, run.opened), '.1f')}"
                    f" KiB per idle stream; {fmt(run.cpu_per_event_us, '.0f')} us CPU per event"
                    f"{'; ' + run.note if run.note else ''}"
                )
        # httpx with http2=True opens one connection per origin and queues the rest.
        run = await self.h2_run("h2", 160, tls, per_client=160, traffic=False)
        self.h2_notes.append(
            f"one httpx client with http2=True, 160 streams: {run.opened} open after 20 s, over"
            f" {run.connections} connection(s); the other {160 - run.opened} wait for a free"
            " stream of that connection (httpcore: at most 100 streams a connection, and no"
            " second connection to the same origin)"
        )
        say(f"  {self.h2_notes[-1]}")
        for mode in ("http1.1", "h2"):
            note = await self.stall_run(mode, 20, tls)
            self.h2_notes.append(note)
            say(f"  {note}")

    async def h2_run(
        self,
        mode: str,
        streams: int,
        tls: tuple[Path, Path],
        *,
        per_client: int | None = None,
        traffic: bool = True,
    ) -> H2Run:
        result = H2Run(mode, streams)
        rate = 1000.0  # events/s over all streams
        seconds = 15.0
        sim = SimChild(
            {**idle_threads_scenario(streams), "name": f"bench-h2-{mode}-{streams}"},
            self.workdir,
            tls=tls,
            traffic=(rate, seconds),
        )
        client: subprocess.Popen[bytes] | None = None
        try:
            await sim.started()
            # Every thread is there from the start (instant); SIGUSR2 is the traffic's signal.
            dump = await sim.dump(freeze=True)
            paths = [f"/sessions/{s}/threads/{t}/events" for s, t, *_ in dump["threads"]]
            paths_file = self.workdir / f"h2-{mode}-{streams}.paths.json"
            paths_file.write_text(json.dumps(paths[:streams]))
            status_file = self.workdir / f"h2-{mode}-{streams}.client.json"
            status_file.unlink(missing_ok=True)
            per = per_client or (100 if mode == "h2" else 128)
            cmd = [sys.executable, "-m", "tests.bench_cost", "--h2-client", sim.url]
            cmd += ["--mode", mode, "--paths", str(paths_file), "--per-client", str(per)]
            cmd += ["--status", str(status_file), "--ca", str(tls[0])]
            log = (self.workdir / f"h2-{mode}-{streams}.client.log").open("ab")
            client = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            _CHILDREN.append(client)

            def status() -> dict[str, Any]:
                try:
                    return dict(json.loads(status_file.read_text()))
                except (OSError, ValueError):
                    return {}

            with anyio.fail_after(60):
                while "rss_ready" not in status():
                    await anyio.sleep(0.1)
            result.rss_base = status()["rss_ready"]
            bound = 20 if per_client else 120
            with anyio.move_on_after(bound):
                while status().get("opened", 0) < len(paths[:streams]):
                    await anyio.sleep(0.2)
            st = status()
            result.opened = st.get("opened", 0)
            result.open_s = st.get("all_open_s", math.nan)
            if result.opened < streams and not per_client:
                result.note = f"only {result.opened} of {streams} opened within {bound} s"
            await anyio.sleep(6)  # a heartbeat (5 s) on every stream
            result.connections = tcp_connections(client.pid, sim.port)
            meter = CpuMeter({"client": client.pid})
            await anyio.sleep(5)
            result.idle_cpu = meter.read()["client"]
            result.rss_idle = rss(client.pid)
            if traffic:
                events0 = status().get("events", 0)
                cpu0, server0 = cpu_seconds(client.pid), cpu_seconds(sim.proc.pid)
                began = time.monotonic()
                sim.start_traffic()
                expected = math.inf  # until the simulator has sent all of it
                with anyio.move_on_after(seconds + 30):
                    while status().get("events", 0) - events0 < expected:
                        if time.monotonic() - began > seconds + 1:
                            expected = sim.status()["traffic"]
                        await anyio.sleep(0.1)
                result.events = status().get("events", 0) - events0
                cpu1, server1 = cpu_seconds(client.pid), cpu_seconds(sim.proc.pid)
                if result.events:
                    result.cpu_per_event_us = (cpu1 - cpu0) / result.events * 1e6
                    result.server_cpu_per_event_us = (server1 - server0) / result.events * 1e6
                if result.events < expected:
                    result.note = f"{result.events:,} of {expected:,.0f} events arrived"
        finally:
            if client is not None and client.poll() is None:
                client.send_signal(signal.SIGTERM)
                try:
                    await anyio.to_thread.run_sync(lambda: client.wait(20))
                except subprocess.TimeoutExpired:
                    client.kill()
            await sim.stop()
        return result

    async def stall_run(self, mode: str, streams: int, tls: tuple[Path, Path]) -> str:
        """Streams that go silent: does a read timeout (the bridge's stall timeout) fire?"""
        sim = SimChild(
            {**stalling_scenario(streams), "name": f"bench-h2-stall-{mode}"}, self.workdir, tls=tls
        )
        client: subprocess.Popen[bytes] | None = None
        try:
            await sim.started()
            dump = await sim.dump(freeze=False)
            paths = [f"/sessions/{s}/threads/{t}/events" for s, t, *_ in dump["threads"]]
            paths_file = self.workdir / f"h2-stall-{mode}.paths.json"
            paths_file.write_text(json.dumps(paths))
            status_file = self.workdir / f"h2-stall-{mode}.client.json"
            status_file.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "tests.bench_cost", "--h2-client", sim.url]
            cmd += ["--mode", mode, "--paths", str(paths_file), "--per-client", str(streams)]
            cmd += ["--status", str(status_file), "--ca", str(tls[0]), "--read-timeout", "3"]
            log = (self.workdir / f"h2-stall-{mode}.client.log").open("ab")
            client = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            _CHILDREN.append(client)
            await anyio.sleep(20)
            st = json.loads(status_file.read_text())
            stalls = sim.status()["stalls"]
        finally:
            if client is not None and client.poll() is None:
                client.send_signal(signal.SIGTERM)
                try:
                    await anyio.to_thread.run_sync(lambda: client.wait(20))
                except subprocess.TimeoutExpired:
                    client.kill()
            await sim.stop()
        timeouts = st.get("errors", {}).get("ReadTimeout", 0)
        return (
            f"{mode}, {streams} streams on {'one connection' if mode == 'h2' else 'their own'},"
            f" {stalls} of them silent for 60 s: {timeouts} read timeouts (3 s) within 20 s"
        )

    # -- the report ----------------------------------------------------------------------------

    def report(self) -> None:
        if self.soak:
            self._report_soak(self.soak)
        if self.restart:
            self._report_restart(self.restart)
        if self.startup:
            self._report_startup(self.startup)
        if self.h2 or self.h2_notes:
            self._report_h2()

    def _report_soak(self, r: Soak) -> None:
        say(f"\nCOST OF AN ACCOUNT of {r.sessions:,} sessions, after catch-up, the defaults")
        w = r.window_s
        total = sum(r.requests.values())
        threads = sum(r.requests.get(k, 0) for k in THREAD_ROUTES)
        discovery = total - threads
        per_new = threads / r.new_threads if r.new_threads else math.nan
        first = r.first_child + r.first_coordinator
        rows = [
            ["window", f"{w:.0f} s", ""],
            [
                "API requests/s, all",
                f"{total / w:.2f}",
                f"{r.running_threads:.0f} threads, {r.running_sessions:.0f} sessions running",
            ],
            [
                "  discovery (sessions, session, threads, session_events)",
                f"{discovery / w:.2f}",
                f"target <= 5: {'met' if discovery / w <= 5 else 'MISSED'};"
                f" {discovery / w / max(1e-9, r.running_sessions):.3f}/s per running session",
            ],
            [
                "  thread reads (events, stream, thread)",
                f"{threads / w:.2f}",
                f"{fmt(per_new, '.2f')} per new thread ({r.new_threads} new)",
            ],
            [
                "  by route, per second",
                ", ".join(f"{k} {v / w:.2f}" for k, v in sorted(r.requests.items())),
                "",
            ],
            [
                "TCP connections to the API, most",
                f"{r.conns_max}",
                f"running threads + running sessions + {r.excess_max} at worst"
                f" ({r.excess_mean:+.1f} on average)",
            ],
            [
                "RSS first -> last sample (max)",
                f"{r.rss_first / 2**20:.1f} -> {r.rss_last / 2**20:.1f} MiB",
                f"{(r.rss_last - r.rss_first) / 2**20:+.1f} MiB, max"
                f" {r.rss_max / 2**20:.1f}; trend {r.rss_slope_mb_h:+.1f} MiB/h",
            ],
            [
                "CPU of the bridge",
                f"{r.cpu:.1f} %",
                f"{r.events:,} events published:"
                f" {fmt(r.cpu / 100 * w / max(1, r.events) * 1e6, '.0f')} us of CPU an event,"
                " everything included",
            ],
            [
                "new thread's first event -> Kafka, p50/p99/max",
                _p50_p99_max(first),
                f"{len(first)} threads; target p99 <= 3 s:"
                f" {'met' if percentile(first, 99) <= 3 else 'MISSED'}",
            ],
            [
                "  children (found by the session's hints)",
                _p50_p99_max(r.first_child),
                f"{len(r.first_child)} threads",
            ],
            [
                "  coordinators of new sessions (discovery poll, 15 s)",
                _p50_p99_max(r.first_coordinator),
                f"{len(r.first_coordinator)} threads",
            ],
            ["delivery", r.check.verdict if r.check else "n/a", f"exit code {r.exit_code}"],
        ]
        say(table(["figure", "value", "note"], rows))
        say(
            f"  catch-up from nothing: {r.catch_up_s:.0f} s, {r.catch_up_requests:,.0f} requests"
            f" ({r.catch_up_requests / r.sessions:.2f} per session), {r.catch_up_events:,} events."
            f" Restart with the history checkpointed:"
            f" every running thread streaming again after {r.restart_streaming_s:.1f} s,"
            f" ready after {r.restart_ready_s:.1f} s, steady (under a quarter of the request"
            f" budget for 15 s) after {r.restart_s:.0f} s and"
            f" {sum(r.restart_requests.values()):,.0f} requests"
            f" ({sum(r.restart_requests.values()) / r.sessions:.2f} per session;"
            f" {_routes(r.restart_requests)})"
        )

    def _report_restart(self, r: Restart) -> None:
        say(f"\nRESTART with {r.threads:,} running threads, each with a checkpoint, the defaults")
        last = r.flowing[-1] if len(r.flowing) >= r.threads else math.nan
        rows = [
            ["ready (/readyz 200)", fmt(r.ready_s, ".1f", " s"), ""],
            [
                "every thread flowing (a new record in Kafka)",
                fmt(last, ".1f", " s"),
                f"target <= 25 s: {'met' if last <= 25 else 'MISSED'};"
                f" p50 {fmt(percentile(r.flowing, 50), '.1f')} s,"
                f" p99 {fmt(percentile(r.flowing, 99), '.1f')} s"
                f" ({len(r.flowing):,} of {r.threads:,})",
            ],
            ["every thread stream open (simulator)", fmt(r.all_streams_s, ".1f", " s"), ""],
            [
                "API requests per thread until then",
                fmt(r.requests / r.threads, ".2f"),
                f"target <= 1.2: {'met' if r.requests / r.threads <= 1.2 else 'MISSED'};"
                f" {r.requests:,.0f} in all",
            ],
            ["requests by route (whole run)", _routes(r.requests_by_route), ""],
            ["delivery", r.check.verdict if r.check else "n/a", ""],
        ]
        say(table(["figure", "value", "note"], rows))

    def _report_startup(self, r: Startup) -> None:
        say(f"\nSTART-UP with {r.threads:,} historical threads ({r.sessions:,} sessions)")
        rows = [
            [
                "checkpoint topic",
                f"{r.records:,} records",
                f"{r.topic_mib:.0f} MiB of values (32 recent ids each), written in"
                f" {r.write_s:.1f} s",
            ],
        ]
        for load in r.loads:
            grown = load["rss_after"] - load["rss_before"]
            where = (
                f"sqlite file {load.get('file_bytes', 0) / 2**20:.0f} MiB"
                if load["how"] == "index"
                else "held in the heap"
            )
            rows.append(
                [
                    "read_checkpoints -> CheckpointIndex (the bridge)"
                    if load["how"] == "index"
                    else "load_checkpoints -> dict",
                    f"{load['load_s']:.1f} s",
                    f"{load['records'] / load['load_s']:,.0f} records/s;"
                    f" RSS {load['rss_before'] / 2**20:.0f} -> {load['rss_after'] / 2**20:.0f}"
                    f" MiB (peak {load['hwm'] / 2**20:.0f}), {grown / max(1, load['threads']):,.0f}"
                    f" B per thread; {where}",
                ]
            )
        rows += [
            [
                "bridge: ready / first full listing",
                f"{r.ready_s:.1f} / {r.scan_s:.1f} s",
                f"{r.scan_cpu_s:.1f} s of CPU until then; /livez within {r.loop_stall_s:.2f} s",
            ],
            [
                "  requests the history cost, until steady",
                f"{sum(r.requests.values()):,.0f}",
                f"{sum(r.requests.values()) / r.sessions:.2f} per session, steady after"
                f" {r.steady_s:.0f} s; {_routes(r.requests)}; {r.followed:.0f} threads followed",
            ],
            ["bridge RSS (peak)", f"{r.rss / 2**20:.0f} ({r.hwm / 2**20:.0f}) MiB", ""],
        ]
        say(table(["figure", "value", "note"], rows))

    def _report_h2(self) -> None:
        say("\nHTTP/2 vs HTTP/1.1 (httpx, TLS, hypercorn serving the simulator)")
        rows = []
        by = {(r.mode, r.streams): r for r in self.h2}
        for r in self.h2:
            per_stream = (r.rss_idle - r.rss_base) / 1024 / max(1, r.opened)
            h1 = by.get(("http1.1", r.streams))
            rows.append(
                [
                    f"{r.mode}, {r.streams:,} streams",
                    f"{r.opened:,}",
                    f"{r.connections:,}",
                    fmt(r.opened / max(1, r.connections), ".0f"),
                    fmt(r.open_s, ".1f", " s"),
                    f"{per_stream:.1f} KiB",
                    fmt(r.idle_cpu, ".1f", " %"),
                    fmt(r.cpu_per_event_us, ".0f", " us"),
                    ratio(r.cpu_per_event_us, h1.cpu_per_event_us) if h1 else "",
                    fmt(r.server_cpu_per_event_us, ".0f", " us"),
                ]
            )
        if rows:
            headers = ["run", "open", "connections", "streams/conn", "all open in"]
            headers += ["RSS/idle stream", "idle CPU", "CPU/event", "vs http1.1", "server/event"]
            say(table(headers, rows))
            say("  CPU/event: the client's CPU while 1,000 events/s (~300 B) arrive spread over")
            say("  every stream, divided by the events; idle CPU: % of one core, heartbeats only.")
        for note in self.h2_notes:
            say(f"  {note}")


def _p50_p99_max(values: Sequence[float]) -> str:
    figures = (percentile(values, 50), percentile(values, 99), max(values, default=math.nan))
    return "/".join(fmt(v, ".2f") for v in figures) + " s"


def _routes(requests: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(requests.items(), key=lambda kv: -kv[1]))


def _slope(samples: Sequence[tuple[float, int]]) -> float:
    """Least-squares bytes per second."""
    if len(samples) < 2:
        return math.nan
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    den = sum((t - mx) ** 2 for t, _ in samples)
    return sum((t - mx) * (v - my) for t, v in samples) / den if den else math.nan


async def _all_streaming(bridge: CostBridge, sim: SimChild, result: Soak) -> None:
    """When the simulator first sees a stream open for every running thread."""
    while True:
        st = sim.status()
        if st["thread_streams"] >= st["running_threads"] > 0:
            result.restart_streaming_s = time.time() - bridge.started_at
            return
        await anyio.sleep(0.5)


async def _answer_times(bridge: CostBridge, out: list[float]) -> None:
    """How long /livez takes to answer, every 50 ms: a long one is a blocked event loop."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.http_port}") as client:
        while True:
            began = time.monotonic()
            try:
                await client.get("/livez", timeout=30)
                out.append(time.monotonic() - began)
            except httpx.HTTPError:
                pass  # not listening yet
            await anyio.sleep(0.05)


async def _first_after(
    bootstrap: str,
    topic: str,
    start: dict[int, int],
    first: dict[str, float],
    *,
    task_status: anyio.abc.TaskStatus[None],
) -> None:
    """Per key, the append time (ms) of its first record past ``start``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start[tp.partition])
        task_status.started()
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for r in records:
                    first.setdefault(r.key.decode(), r.timestamp)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await consumer.stop()


async def write_checkpoints(
    bootstrap: str, topic: str, dump: dict[str, Any], threads: int, versions: int
) -> tuple[int, int]:
    """``threads`` checkpoints as the bridge writes them, spread over the dump's sessions (its
    real coordinator first, then made-up children), each session's drained mark its own
    ``updated_at``: a bridge sees every session settled. Returns (records, bytes of values)."""
    from bridge.records import ThreadRef, checkpoint_record  # noqa: PLC0415

    sessions = [(s, t) for s, t, *_ in dump["threads"]]
    updated = dump["sessions"]
    per = math.ceil(threads / len(sessions))
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        compression_type="gzip",
        linger_ms=20,
        max_batch_size=1_048_576,
        max_request_size=4 * 1_048_576,
    )
    await producer.start()
    records = size = 0
    try:
        futures = []
        written = 0
        for session_id, coordinator in sessions:
            for i in range(per):
                if written >= threads:
                    break
                written += 1
                thread_id = coordinator if i == 0 else f"sthr_{uuid.uuid4().hex}"
                for v in range(versions):
                    ids = [f"evt_{uuid.uuid4().hex}" for _ in range(32)]
                    record = checkpoint_record(
                        topic,
                        ThreadRef(session_id, thread_id),
                        ids[-1],
                        updated[session_id] if v == versions - 1 else None,
                        ids,
                    )
                    futures.append(await producer.send(topic, record.value, key=record.key))
                    records += 1
                    size += len(record.value)
                if len(futures) >= 5000:
                    for f in futures:
                        await f
                    futures = []
        for f in futures:
            await f
    finally:
        await producer.stop()
    return records, size


async def load_in_child(bootstrap: str, topic: str, how: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tests.bench_cost", "--load-checkpoints", bootstrap, topic, how]
    done = await anyio.run_process(cmd, check=True)
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))


def load_checkpoints_child(bootstrap: str, topic: str, how: str) -> None:
    """The child: the checkpoint topic read as the bridge reads it at start (``index``:
    ``read_checkpoints`` into a ``CheckpointIndex``, sqlite in TMPDIR) or into a dict
    (``dict``: ``load_checkpoints``), timed, with this process's RSS around it."""
    import gc  # noqa: PLC0415

    from bridge.checkpoint_index import CheckpointIndex  # noqa: PLC0415
    from bridge.checkpoints import load_checkpoints, read_checkpoints  # noqa: PLC0415
    from bridge.config import KafkaSettings  # noqa: PLC0415

    me = os.getpid()

    async def main() -> dict[str, Any]:
        kafka = KafkaSettings(bootstrap_servers=bootstrap, checkpoint_topic=topic)
        index = CheckpointIndex() if how == "index" else None
        gc.collect()
        before = rss(me)
        began = time.monotonic()
        if index is not None:
            records = await read_checkpoints(kafka, index.load, timeout_s=900)
            threads = len(index)
            loaded: Any = index
        else:
            loaded = await load_checkpoints(kafka, timeout_s=900)
            records = threads = len(loaded)
        took = time.monotonic() - began
        gc.collect()
        result = {
            "how": how,
            "records": records,
            "threads": threads,
            "load_s": took,
            "rss_before": before,
            "rss_after": rss(me),
            "hwm": proc_status(me, "VmHWM"),
        }
        if index is not None:
            result["file_bytes"] = sum(f.stat().st_size for f in index.directory.iterdir())
            index.close()
        return result

    print(json.dumps(anyio.run(main)), flush=True)


# -- the HTTP client child (http2 part) ---------------------------------------------------------


def h2_client(args: argparse.Namespace) -> None:
    """Opens a stream per path, as the bridge does, and counts: opened, events, errors."""
    from bridge.sse import decode_frames  # noqa: PLC0415

    paths: list[str] = json.loads(Path(args.paths).read_text())
    tls = ssl.create_default_context(cafile=args.ca)
    h2 = args.mode == "h2"
    counts: dict[str, Any] = {"opened": 0, "events": 0, "errors": Counter()}
    began = time.monotonic()

    def write() -> None:
        data = {**counts, "errors": dict(counts["errors"])}
        tmp = Path(args.status).with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(args.status)

    async def main() -> None:
        shards = max(1, math.ceil(len(paths) / args.per_client))
        limits = httpx.Limits(
            max_connections=1 if h2 else 2 * args.per_client, max_keepalive_connections=16
        )
        clients = [
            httpx.AsyncClient(http1=not h2, http2=h2, verify=tls, limits=limits, trust_env=False)
            for _ in range(shards)
        ]
        timeout = httpx.Timeout(30, read=args.read_timeout, pool=None)
        headers = {
            "Authorization": f"Bearer {TOKEN}",
            "Accept": "text/event-stream",
            "Cache-Control": "no-cache",
        }
        opening = anyio.CapacityLimiter(200)

        async def stream(i: int, path: str) -> None:
            client = clients[i // args.per_client]
            request = client.build_request(
                "GET", args.h2_client + path, headers=headers, timeout=timeout
            )
            try:
                async with opening:
                    response = await client.send(request, stream=True)
                counts["opened"] += 1
                if counts["opened"] == len(paths):
                    counts["all_open_s"] = time.monotonic() - began
                    counts["http_version"] = response.http_version
                try:
                    async for frame in decode_frames(response.aiter_bytes(), 1 << 20):
                        if frame.data:
                            counts["events"] += 1
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                counts["errors"][type(exc).__name__] += 1

        async def report() -> None:
            while True:
                write()
                await anyio.sleep(0.25)

        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                counts["rss_ready"] = rss(os.getpid())
                write()
                tg.start_soon(report)
                for i, path in enumerate(paths):
                    tg.start_soon(stream, i, path)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()
        for client in clients:
            with anyio.move_on_after(2, shield=True):
                await client.aclose()

    anyio.run(main)


def make_cert(workdir: Path) -> tuple[Path, Path]:
    cert, key = workdir / "h2-cert.pem", workdir / "h2-key.pem"
    if not cert.exists():
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
                *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
                *("-addext", "subjectAltName=IP:127.0.0.1"),
            ],
            check=True,
            capture_output=True,
        )
    return cert, key


PARTS: dict[str, Callable[[CostBench], Any]] = {
    "soak": CostBench.run_soak,
    "restart": CostBench.run_restart,
    "startup": CostBench.run_startup,
    "http2": CostBench.run_http2,
}


def main(argv: list[str] | None = None) -> int:
    """The children this module runs (the parts run from ``python -m tests.bench``)."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench_cost")
    parser.add_argument("--serve-simulator", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--status", type=Path)
    parser.add_argument("--server", default="uvicorn", choices=("uvicorn", "hypercorn"))
    parser.add_argument("--tls", nargs=2, type=Path)
    parser.add_argument("--traffic-rate", type=float, default=0.0)
    parser.add_argument("--traffic-s", type=float, default=0.0)
    parser.add_argument("--load-checkpoints", nargs=3, metavar=("BOOTSTRAP", "TOPIC", "HOW"))
    parser.add_argument("--h2-client", metavar="BASE_URL")
    parser.add_argument("--mode", default="http1.1")
    parser.add_argument("--paths")
    parser.add_argument("--per-client", type=int, default=128)
    parser.add_argument("--ca")
    parser.add_argument("--read-timeout", type=float, default=45.0)
    args = parser.parse_args(argv)
    if args.serve_simulator:
        serve_simulator(args)
    elif args.load_checkpoints:
        load_checkpoints_child(*args.load_checkpoints)
    elif args.h2_client:
        h2_client(args)
    else:
        parser.error("the parts run from `python -m tests.bench --parts soak,restart,...`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
