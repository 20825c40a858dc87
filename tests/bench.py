"""Bridge benchmark: ``.venv/bin/python -m tests.bench [--quick] [--parts ...]``.

Starts its own Apache Kafka broker (free loopback port, temporary data dir, stopped at the end,
Ctrl-C included), the Qoder API simulator in a child process (``python -m tests.bench
--serve-simulator``: the simulator plus a status file, so its own counts can be read), and the
bridge as users run it (``python -m bridge run``). Every figure comes with a baseline measured
in the same run, as a ratio. Printed:

0. pipeline (tests/bench_pipeline.py): the bridge's events/s and CPU an event at 40, 200 and
   1,000 threads against the plain producer sending the same records with the same settings,
   and against a tutorial-grade httpx-sse + aiokafka script;
1. throughput: events/s through the bridge for 1 thread and for 1,000 concurrent threads of
   pre-generated (``instant``) ~300-byte events, in ``at_least_once`` and in ``exactly_once``:
   N records, counted from the moment the first one became visible to a read_committed consumer
   (and, separately, from the bridge's start) until all N were visible. Visibility is the last
   stable offset of each partition, sampled every 50 ms, against the offsets the records were
   found at afterwards (every record is read back and counted: none lost, none twice). In full
   mode also 1,000 threads whose backlog is larger than the bridge's in-flight byte budget;
2. baselines: a plain aiokafka producer (idempotent, acks=all, zstd, the bridge's linger and
   batch size) and a transactional one committing every 100 ms, sending the very records the
   bridge wrote (keys, values, headers) to a new topic on the same broker, measured the same way;
3. latency at a live rate (50 threads x 20 events/s: 1,000 events/s): from the event's
   ``processed_at`` (the simulator emitting it) to the broker appending it (the record's
   LogAppendTime timestamp), and to a read_committed consumer in this process receiving it, in
   both delivery modes; counted after a warm-up (``live_warmup_s`` from the moment the bridge
   has every stream open; OpenMessaging Benchmark too measures after a warm-up of the same
   workload), the events left out reported apart with their own figures;
4. memory: the bridge's RSS with 0 threads (the baseline), with 1,000 and with 10,000 open idle
   streams (threads that stay running, heartbeats only), once the bridge's
   ``qoder_bridge_open_streams`` and the simulator's own count both say they are all open (or,
   when they do not all open within a bound, with those that did, said so).

5. what the bridge costs the API and the machine (tests/bench_cost.py): ``soak`` (an account
   of 3,000 sessions: requests/s, connections, RSS over time, new threads' first events, nothing
   missing), ``restart`` (1,000 running threads with checkpoints, the default budget),
   ``startup`` (100,000 checkpoints: load time and memory) and ``http2`` (HTTP/2 against
   HTTP/1.1; needs hypercorn and h2 importable, skipped otherwise).

Everything shares this machine's cores: the figures are for the whole arrangement, which the
output states, with the CPU each process used and the load from anything else on the machine.
``--parts`` picks parts; ``--py-spy EXE`` profiles the bridge during the throughput and
pipeline runs (collapsed stacks in the ``--logs`` directory). At the end the figures are drawn
as PNG charts (tests/bench_charts.py, with matplotlib from the ``bench`` extra) in ``--charts``
(default ``.cache/bench/charts``, ignored by git).
"""

from __future__ import annotations

import argparse
import calendar
import functools
import gc
import json
import logging
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from tests.bridge_harness import TOKEN, BridgeProcess, bridge_env
from tests.kafka_broker import KafkaBroker, KafkaTopics, create_topics, fetch_jars, read_topic

PARTITIONS = 6  # the bridge's default BRIDGE_TOPIC_PARTITIONS
SAMPLE_S = 0.05  # how often the last stable offsets are sampled
LINGER_MS = 0  # the bridge's default KAFKA_LINGER_MS
BATCH_BYTES = 256 * 1024  # the bridge producer's max_batch_size
COMMIT_EVERY_S = 0.1  # the bridge's default BRIDGE_COMMIT_INTERVAL_MS
THREADS_PER_SESSION = 40  # a coordinator and 39 children
STALLED_AFTER_S = 20.0  # no event published for this long: the run is reported as stalled
PUBLISHED = "qoder_bridge_events_published_total"
OPEN_STREAMS = "qoder_bridge_open_streams"
ROOT = Path(__file__).resolve().parents[1]

# The settings a benchmark run changes from the bridge's defaults (the rest are defaults).
BRIDGE_SETTINGS = {
    "BRIDGE_API_MAX_RPS": "5000",  # the API is not what is measured
    "BRIDGE_MAX_STREAMS": "12000",  # room for the 10,000-stream run
    "BRIDGE_TOPIC_PARTITIONS": str(PARTITIONS),
    "BRIDGE_POLL_INTERVAL_S": "15",
    "BRIDGE_STALL_TIMEOUT_S": "45",
    "BRIDGE_BACKOFF_INITIAL_S": "0.5",
    "BRIDGE_BACKOFF_MAX_S": "30",
    "BRIDGE_DRAIN_TIMEOUT_S": "20",
}


@dataclass(frozen=True)
class Sizes:
    one_thread_events: int
    fanout_sessions: int  # x 40 threads
    fanout_events: int  # per thread; all of them fit in the default 32 MiB in-flight budget
    backlog_events: int  # per thread, 0 = no backlog run; they do not fit
    live_threads: int
    live_rate: float  # events/s per thread
    live_s: float
    #: Not counted: from the moment the bridge has every stream open, this long. In the first
    #: 1-2 s the bridge catches up the events emitted while it started; then exactly_once's
    #: p99 a second settles from about 150 to 115 ms over some 10 s, on a broker fresh or warm
    #: from the earlier parts alike. Both are reported apart, and so is the p99 from 1 s after
    #: every stream is open to the end of the run (the previous count's start, over all of it).
    live_warmup_s: float
    idle_streams: tuple[int, ...]
    open_within_s: float  # how long the idle streams may take to open


# Latency at 1,000 events/s: 50 threads x 20 events/s.
FULL = Sizes(100_000, 25, 20, 100, 50, 20.0, 40.0, 10.0, (1_000, 10_000), 90.0)
QUICK = Sizes(20_000, 25, 10, 0, 50, 20.0, 8.0, 2.0, (1_000,), 60.0)


# -- scenarios (JSON, as `--scenario FILE` takes them) ------------------------------------------


def one_thread_scenario(events: int) -> dict[str, Any]:
    return {
        "name": "bench-1-thread",
        "seed": 6,
        "instant": True,
        "sessions": [{"coordinator": {"events": events, "rate": 0}}],
    }


def fanout_scenario(name: str, sessions: int, events: int) -> dict[str, Any]:
    children = {"count": THREADS_PER_SESSION - 1, "events": events, "rate": 0}
    spec = {"count": sessions, "coordinator": {"events": events, "rate": 0}, "children": [children]}
    return {"name": name, "seed": 9, "instant": True, "sessions": [spec]}


def live_scenario(threads: int, rate: float, seconds: float) -> dict[str, Any]:
    spec = {"count": threads, "coordinator": {"events": int(rate * seconds), "rate": rate}}
    return {"name": "bench-live", "seed": 10, "sessions": [spec]}


def idle_scenario(streams: int) -> dict[str, Any]:
    """Threads that stay running without events: children whose next event is hours away, and
    coordinators waiting for them. A heartbeat every 5 s on each stream."""
    sessions = streams // THREADS_PER_SESSION
    children = {"count": THREADS_PER_SESSION - 1, "events": 12, "rate": 0.0002}
    spec = {"count": sessions, "coordinator": {"events": 12, "rate": 0}, "children": [children]}
    return {
        "name": f"bench-idle-{streams}",
        "seed": 11,
        "heartbeat_interval_s": 5.0,
        "sessions": [spec] if sessions else [],
    }


# -- processes --------------------------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[bytes]] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int, field_name: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM) in bytes; 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


#: The bench's broker heap, unless KAFKA_HEAP_OPTS says otherwise.
BROKER_HEAP = "-Xms2g -Xmx2g"


class CpuMeter:
    """CPU each process used over a window, in % of one core; ``other`` is what everything
    else on the machine used (other people's work, the kernel), in % of one core too."""

    def __init__(self, pids: dict[str, int]) -> None:
        ours = os.getpid() in pids.values()
        self.pids = pids if ours else {**pids, "bench": os.getpid()}
        self.began = time.monotonic()
        self.cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.machine = machine_jiffies()

    def read(self) -> dict[str, float]:
        took = time.monotonic() - self.began
        usage = {
            name: (cpu_seconds(pid) - self.cpu[name]) / took * 100
            for name, pid in self.pids.items()
        }
        busy, total = machine_jiffies()
        cores = os.cpu_count() or 1
        machine = (busy - self.machine[0]) / max(1, total - self.machine[1]) * 100 * cores
        usage["other"] = max(0.0, machine - sum(usage.values()))
        return usage


class SimulatorChild:
    """The simulator in a child process; its own counts come through a status file."""

    def __init__(self, scenario: dict[str, Any], workdir: Path, *, freeze_gc: bool = False) -> None:
        """``freeze_gc``: the child freezes what it keeps (see ``serve_simulator``)."""
        name = scenario["name"]
        self.scenario_path = workdir / f"{name}.json"
        self.scenario_path.write_text(json.dumps(scenario))
        self.status_path = workdir / f"{name}.status.json"
        self.status_path.unlink(missing_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api/v1/cloud"
        cmd = [sys.executable, "-m", "tests.bench", "--serve-simulator", str(self.scenario_path)]
        cmd += ["--port", str(self.port), "--status", str(self.status_path)]
        cmd += ["--freeze-gc"] if freeze_gc else []
        log = (workdir / f"{name}.simulator.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        _CHILDREN.append(self.proc)

    async def started(self, timeout_s: float = 120) -> None:
        with anyio.fail_after(timeout_s):
            while not self.status_path.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"simulator exited with {self.proc.returncode}")
                await anyio.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return json.loads(self.status_path.read_text())

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await anyio.to_thread.run_sync(lambda: self.proc.wait(30))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await anyio.to_thread.run_sync(self.proc.wait)


class Stalled(Exception):
    def __init__(self, published: int, expected: int, after_s: float) -> None:
        super().__init__(f"stalled: {published:,} of {expected:,} published after {after_s:.0f} s")
        self.published = published


class Bridge:
    """``python -m bridge run`` (tests.bridge_harness.BridgeProcess) and its /metrics."""

    def __init__(
        self, sim: SimulatorChild, bootstrap: str, topics: KafkaTopics, mode: str, workdir: Path
    ) -> None:
        self.http_port = free_port()
        env = bridge_env(
            sim.url,
            bootstrap,
            topics,
            **BRIDGE_SETTINGS,
            BRIDGE_DELIVERY=mode,
            BRIDGE_HTTP_PORT=str(self.http_port),
        )
        self.log_path = workdir / f"{topics.events}.bridge.log"
        self.process = BridgeProcess(env, self.log_path)
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", timeout=5)
        self.started_at = math.nan
        self.stop_s = math.nan
        self.spy: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def start(self) -> None:
        self.started_at = time.time()
        self.process.start()
        assert self.process.proc is not None
        _CHILDREN.append(self.process.proc)

    def profile(self, py_spy: str, out: Path) -> None:
        cmd = [py_spy, "record", "--pid", str(self.pid), "--rate", "200", "--format", "raw"]
        cmd += ["--output", str(out), "--nonblocking"]
        self.spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    async def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, summed over labels: name -> value (empty while down)."""
        try:
            text = (await self.client.get("/metrics")).text
        except httpx.HTTPError:
            return {}
        totals: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name_labels, _, value = line.rpartition(" ")
                name = name_labels.split("{", 1)[0]
                totals[name] = totals.get(name, 0.0) + float(value)
        return totals

    async def ready(self) -> bool:
        try:
            return (await self.client.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_for(
        self, what: str, predicate: Callable[[dict[str, float]], bool], timeout_s: float
    ) -> dict[str, float]:
        # Four looks a second: /metrics costs the bridge CPU too.
        try:
            with anyio.fail_after(timeout_s):
                while True:
                    if not self.alive():
                        raise RuntimeError(f"the bridge exited while waiting for {what}")
                    metrics = await self.metrics()
                    if metrics and predicate(metrics):
                        return metrics
                    await anyio.sleep(0.25)
        except TimeoutError:
            raise TimeoutError(f"bridge: no {what} after {timeout_s:.0f} s") from None

    async def wait_published(self, expected: int) -> None:
        """Until ``expected`` events are published; Stalled when none is for a while."""
        progress, since = -1.0, time.monotonic()

        def check(metrics: dict[str, float]) -> bool:
            nonlocal progress, since
            published = metrics.get(PUBLISHED, 0.0)
            if published > progress:
                progress, since = published, time.monotonic()
            elif time.monotonic() - since > STALLED_AFTER_S:
                raise Stalled(int(published), expected, time.time() - self.started_at)
            return published >= expected

        await self.wait_for(f"{expected:,} events published", check, 900)

    async def stop(self) -> int | None:
        """SIGTERM (a drain); SIGKILL if it takes longer than 40 s. The exit code, or None."""
        if self.spy is not None and self.spy.poll() is None:
            self.spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        await self.client.aclose()
        code: int | None = None
        began = time.monotonic()
        if self.alive():
            try:
                code = await anyio.to_thread.run_sync(lambda: self.process.terminate(40))
            except subprocess.TimeoutExpired:
                self.process.stop()
            self.stop_s = time.monotonic() - began
        if self.spy is not None:
            await anyio.to_thread.run_sync(lambda: self.spy.wait(30) if self.spy else None)
        return code

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.process.log_text().splitlines()[-lines:])
        except OSError:
            return ""


# -- watching the topic -------------------------------------------------------------------------


class StableOffsets:
    """Samples, every 50 ms, each partition's last stable offset: what read_committed can see."""

    def __init__(self, bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
        self.bootstrap = bootstrap
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.samples: list[tuple[float, tuple[int, ...]]] = []

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            # Never assigned: a fetch long-poll would hold up ListOffsets on the connection.
            task_status.started()
            while True:
                ends = await consumer.end_offsets(self.tps)
                self.samples.append((time.time(), tuple(ends[tp] for tp in self.tps)))
                await anyio.sleep(SAMPLE_S)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await consumer.stop()

    def first_visible(self) -> float:
        return next((t for t, offsets in self.samples if any(offsets)), math.nan)

    def all_visible(self, ends: Sequence[int]) -> float:
        """When every partition's stable offset had passed the last of our records."""
        return next(
            (
                t
                for t, offsets in self.samples
                if all(o >= e for o, e in zip(offsets, ends, strict=True))
            ),
            math.nan,
        )

    async def wait_all_visible(self, ends: Sequence[int], timeout_s: float = 30) -> None:
        with anyio.move_on_after(timeout_s):
            while math.isnan(self.all_visible(ends)):
                await anyio.sleep(SAMPLE_S)


def record_ends(records: Sequence[Any], partitions: int = PARTITIONS) -> list[int]:
    ends = [0] * partitions
    for r in records:
        ends[r.partition] = max(ends[r.partition], r.offset + 1)
    return ends


async def create_events_topic(bootstrap: str, topic: str) -> None:
    # LogAppendTime: each record's timestamp is the moment the broker appended it.
    configs = {"message.timestamp.type": "LogAppendTime"}
    await create_topics(bootstrap, [topic], partitions=PARTITIONS, configs=configs)


async def read_all(bootstrap: str, topic: str, count: int, timeout_s: float = 120) -> list[Any]:
    """read_committed, from the start, until at least ``count`` records are there."""
    records: list[Any] = []
    with anyio.move_on_after(timeout_s):
        while len(records := await read_topic(bootstrap, topic, timeout_s=timeout_s)) < count:
            await anyio.sleep(0.2)
    return records


def duplicates(ids: Sequence[Any]) -> int:
    return sum(n - 1 for n in Counter(ids).values())


def event_ids(records: Sequence[Any]) -> list[tuple[bytes, bytes | None]]:
    return [(r.key, dict(r.headers).get("ce_id")) for r in records]


# -- results ------------------------------------------------------------------------------------

CLEAN = "all records once, clean stop"


@dataclass
class Throughput:
    label: str
    records: int
    start: float  # bridge start, or the first send
    first: float  # first record visible to read_committed
    last: float  # all records visible
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, see CpuMeter
    peak_rss: int = 0
    note: str = CLEAN

    @property
    def steady_rate(self) -> float:
        return self.records / (self.last - self.first) if self.last > self.first else math.nan

    @property
    def overall_rate(self) -> float:
        return self.records / (self.last - self.start) if self.last > self.start else math.nan


@dataclass
class Latency:
    mode: str
    append_ms: list[float] = field(default_factory=list)  # processed_at -> LogAppendTime
    receive_ms: list[float] = field(default_factory=list)  # processed_at -> consumer has it
    excluded: int = 0
    total: int = 0
    note: str = ""
    #: processed_at -> consumer has it, of the events left out: emitted while the bridge was
    #: starting (before it had every stream open), and during the warm-up after that; and of
    #: every event from 1 s after every stream was open to the end (where the count started
    #: before the warm-up, which then ran 20 s).
    starting_ms: list[float] = field(default_factory=list)
    warmup_ms: list[float] = field(default_factory=list)
    from_open_ms: list[float] = field(default_factory=list)

    def count(
        self,
        seen: list[tuple[int, float, str, str]],
        open_at: float,
        steady_from: float,
        expected: int,
    ) -> None:
        """Sort what the consumer saw (append ms, received at, ce_time, ce_id) into the sets
        above, and note whether every one of the ``expected`` events came, once."""
        self.total = len(seen)
        for append_ms, received, ce_time, _ in seen:
            emitted = _epoch(ce_time)
            if emitted >= open_at + 1:
                self.from_open_ms.append((received - emitted) * 1000)
            if emitted < steady_from:
                self.excluded += 1
                left_out = self.starting_ms if emitted < open_at else self.warmup_ms
                left_out.append((received - emitted) * 1000)
                continue
            self.append_ms.append(append_ms - emitted * 1000)
            self.receive_ms.append((received - emitted) * 1000)
        dups = duplicates([x[3] for x in seen])
        self.note = "all events once" if (len(seen), dups) == (expected, 0) else "MISMATCH"
        if self.note == "MISMATCH":
            self.note = f"{len(seen)} of {expected} events received, {dups} duplicates"


@dataclass
class Memory:
    threads: int
    open_bridge: int
    open_simulator: int
    open_s: float  # nan: not all open within the bound
    rss: int
    reconnects: float
    idle_cpu: float  # % of one core over 6 s once open
    stop_s: float = math.nan
    exit_code: int | None = None


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _latency_row(label: str, values: Sequence[float]) -> list[str]:
    """A latency table's row: the label, how many, p50, p90, p99 and the largest."""
    return [
        label,
        f"{len(values):,}",
        *(fmt(percentile(values, q), ".1f", " ms") for q in (50, 90, 99)),
        fmt(max(values, default=math.nan), ".1f", " ms"),
    ]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  " + "  ".join([first, *rest])

    rule = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fmt(value: float, spec: str = ",.0f", unit: str = "") -> str:
    return "n/a" if math.isnan(value) else f"{value:{spec}}{unit}"


def ratio(a: float, b: float) -> str:
    return "n/a" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}x"


def say(text: str = "") -> None:
    print(text, flush=True)


class Bench:
    def __init__(
        self, args: argparse.Namespace, bootstrap: str, broker_pid: int, workdir: Path
    ) -> None:
        self.args = args
        self.broker_pid = broker_pid
        self.sizes: Sizes = QUICK if args.quick else FULL
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.throughput: dict[str, list[Throughput]] = {}
        self.latency: list[Latency] = []
        self.latency_baseline: Latency | None = None
        self.memory: list[Memory] = []
        self.failures: list[str] = []

    # -- 1, 2 and 5: throughput and its baselines -----------------------------------------------

    async def bridge_run(
        self, sim: SimulatorChild, workload: str, mode: str, expected: int
    ) -> tuple[Throughput, list[Any]]:
        topics = KafkaTopics.unique(f"bench-{workload}-{mode}")
        await create_events_topic(self.bootstrap, topics.events)
        offsets = StableOffsets(self.bootstrap, topics.events)
        bridge = Bridge(sim, self.bootstrap, topics, mode, self.workdir)
        records: list[Any] = []
        stalled: Stalled | None = None
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(offsets.run)
                bridge.start()
                meter = CpuMeter(
                    {"bridge": bridge.pid, "simulator": sim.proc.pid, "broker": self.broker_pid}
                )
                if self.args.py_spy:
                    bridge.profile(self.args.py_spy, self.workdir / f"{workload}-{mode}.pyspy.txt")
                try:
                    await bridge.wait_published(expected)
                except Stalled as exc:
                    stalled = exc
                cpu, peak = meter.read(), proc_status(bridge.pid, "VmHWM")
                if stalled is None:
                    # Read back while the offsets are still sampled: they must pass these.
                    records = await read_all(self.bootstrap, topics.events, expected)
                    await offsets.wait_all_visible(record_ends(records))
                tg.cancel_scope.cancel()
        except Exception:
            say(f"  bridge log ({bridge.log_path}):\n{bridge.log_tail()}")
            raise
        finally:
            with anyio.CancelScope(shield=True):
                code = await bridge.stop()
        if stalled is not None:
            result = Throughput(
                f"bridge {mode}", stalled.published, bridge.started_at, *[math.nan] * 2
            )
            result.cpu, result.peak_rss = cpu, peak
            result.note = f"{stalled}; stopping took {bridge.stop_s:.0f} s, exit code {code}"
            return result, []
        result = Throughput(
            f"bridge {mode}",
            len(records),
            bridge.started_at,
            offsets.first_visible(),
            offsets.all_visible(record_ends(records)),
            cpu,
            peak,
        )
        problems = []
        if len(records) != expected:
            problems.append(f"{len(records):,} records, {expected:,} expected")
        if dups := duplicates(event_ids(records)):
            problems.append(f"{dups} duplicates")
        if code != 0:
            problems.append(f"exit code {code} after SIGTERM")
        result.note = "; ".join(problems) or CLEAN
        return result, records

    async def baseline_run(self, records: Sequence[Any], *, transactional: bool) -> Throughput:
        topic = KafkaTopics.unique("bench-baseline").events
        await create_events_topic(self.bootstrap, topic)
        offsets = StableOffsets(self.bootstrap, topic)
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "acks": "all",
            "enable_idempotence": True,
            "compression_type": "zstd",  # the bridge's default
            "linger_ms": LINGER_MS,
            "max_batch_size": BATCH_BYTES,
            "max_request_size": 1_048_576,
        }
        if transactional:
            kwargs["transactional_id"] = f"bench-baseline-{uuid.uuid4().hex[:8]}"
        messages = [(r.key, r.value, list(r.headers)) for r in records]
        producer = AIOKafkaProducer(**kwargs)
        await producer.start()
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(offsets.run)
                meter = CpuMeter({"producer": os.getpid(), "broker": self.broker_pid})
                started = time.time()
                if transactional:
                    await _send_in_transactions(producer, topic, messages)
                else:
                    await _send_all(producer, topic, messages)
                cpu = meter.read()
                got = await read_all(self.bootstrap, topic, len(messages))
                await offsets.wait_all_visible(record_ends(got))
                tg.cancel_scope.cancel()
        finally:
            await producer.stop()
        label = "transactional producer" if transactional else "plain producer"
        return Throughput(
            label,
            len(messages),
            started,
            offsets.first_visible(),
            offsets.all_visible(record_ends(got)),
            cpu,
            note=CLEAN if len(got) == len(messages) else f"{len(got):,} records read back",
        )

    async def workload(
        self,
        description: str,
        scenario: dict[str, Any],
        modes: Sequence[str] = ("at_least_once", "exactly_once"),
        *,
        baselines: bool = True,
    ) -> None:
        sim = SimulatorChild(scenario, self.workdir)
        results: list[Throughput] = []
        self.throughput[description] = results
        records: list[Any] = []
        try:
            await sim.started()
            status = sim.status()
            expected = status["events"]
            threads = f"{status['threads']:,} thread" + ("s" if status["threads"] != 1 else "")
            say(f"\n{description}: {threads}, {expected:,} events (instant)")
            for mode in modes:
                result, got = await self.bridge_run(sim, scenario["name"], mode, expected)
                records = got or records
                results.append(result)
                say(f"  bridge {mode}: {fmt(result.steady_rate)} events/s ({result.note})")
        finally:
            await sim.stop()
        if not (baselines and records):
            return
        values = sum(len(r.value) for r in records) / len(records)
        say(f"  records: {values:.0f} bytes of value on average; baselines send the same records")
        for transactional in (False, True):
            result = await self.baseline_run(records, transactional=transactional)
            results.append(result)
            say(f"  {result.label}: {fmt(result.steady_rate)} events/s ({result.note})")

    async def run_throughput(self) -> None:
        s = self.sizes
        await self.workload("1 thread", one_thread_scenario(s.one_thread_events))
        threads = s.fanout_sessions * THREADS_PER_SESSION
        await self.workload(
            f"{threads:,} threads",
            fanout_scenario("bench-fanout", s.fanout_sessions, s.fanout_events),
        )
        if s.backlog_events:
            # More than BRIDGE_MAX_IN_FLIGHT_BYTES (32 MiB) read at once: backpressure engages.
            await self.workload(
                f"{threads:,} threads, backlog > in-flight budget",
                fanout_scenario("bench-backlog", s.fanout_sessions, s.backlog_events),
                ("exactly_once",),
                baselines=False,
            )

    # -- 3: latency -----------------------------------------------------------------------------

    async def latency_run(self, mode: str) -> Latency:
        s = self.sizes
        seconds = s.live_s + s.live_warmup_s
        scenario = live_scenario(s.live_threads, s.live_rate, seconds)
        sim = SimulatorChild(scenario, self.workdir, freeze_gc=True)
        topics = KafkaTopics.unique(f"bench-live-{mode}")
        await create_events_topic(self.bootstrap, topics.events)
        seen: list[tuple[int, float, str, str]] = []  # (append ms, received at, ce_time, ce_id)
        result = Latency(mode)
        bridge: Bridge | None = None
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(_consume, self.bootstrap, topics.events, seen)
                await sim.started()
                bridge = Bridge(sim, self.bootstrap, topics, mode, self.workdir)
                bridge.start()
                threads = s.live_threads
                await bridge.wait_for(
                    f"{threads} open streams", lambda m: m.get(OPEN_STREAMS, 0) >= threads, 60
                )
                # Events the bridge read through the list while starting are not live ones, and
                # the warm-up's are not steady ones.
                open_at = time.time()
                steady_from = open_at + s.live_warmup_s
                with anyio.fail_after(seconds + 60):
                    while not (status := sim.status())["idle"] or len(seen) < status["events"]:
                        await anyio.sleep(0.2)
                await anyio.sleep(0.5)  # anything late, or twice
                tg.cancel_scope.cancel()
        except Exception:
            if bridge is not None:
                say(f"  bridge log ({bridge.log_path}):\n{bridge.log_tail()}")
            raise
        finally:
            if bridge is not None:
                await bridge.stop()
            await sim.stop()
        # Each event's times, for a look at where the tail comes from (in --logs; see
        # tests/experiments/exp_latency_over_time.py).
        times = [[_epoch(ce), ms / 1000, received] for ms, received, ce, _ in seen]
        dump = {"open_at": open_at, "steady_from": steady_from, "events": times}
        (self.workdir / f"latency-{mode}.json").write_text(json.dumps(dump))
        result.count(seen, open_at, steady_from, status["events"])
        return result

    async def latency_baseline_run(self) -> Latency:
        """exactly_once's shape with aiokafka alone, on the same broker at the same rate: the
        bench emits the live run's events itself (50 threads x 20/s, ~300 B, a ce_time header),
        and ``BASELINE_SHARDS`` transactional producers, a thread's events always to the same
        one, each commit a window 100 ms after its first event was made, holding the events
        and one record a thread to a compacted 32-partition topic (the bridge's checkpoints).
        Counted as the bridge's runs are: from ``live_warmup_s`` after the start."""
        s = self.sizes
        seconds = s.live_s + s.live_warmup_s
        topics = KafkaTopics.unique("bench-live-baseline")
        await create_events_topic(self.bootstrap, topics.events)
        await create_topics(self.bootstrap, [topics.checkpoints], partitions=32, compacted=True)
        seen: list[tuple[int, float, str, str]] = []
        result = Latency("aiokafka alone, transactional")
        run = uuid.uuid4().hex[:8]
        producers = [
            AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                compression_type="zstd",  # the bridge's default
                transactional_id=f"bench-live-baseline-{run}-{i}",
            )
            for i in range(BASELINE_SHARDS)
        ]
        streams = [anyio.create_memory_object_stream[_Made](math.inf) for _ in producers]
        try:
            for producer in producers:
                await producer.start()
            async with anyio.create_task_group() as tg:
                await tg.start(_consume, self.bootstrap, topics.events, seen)
                for shard, producer in enumerate(producers):
                    tg.start_soon(_baseline_shard, producer, streams[shard][1], topics, shard)
                open_at = time.time()
                steady_from = open_at + s.live_warmup_s
                made = await _baseline_emit([send for send, _ in streams], s, seconds)
                with anyio.fail_after(60):
                    while len(seen) < made:
                        await anyio.sleep(0.2)
                await anyio.sleep(0.5)  # anything late, or twice
                tg.cancel_scope.cancel()
        finally:
            for producer in producers:
                await producer.stop()
        result.count(seen, open_at, steady_from, made)
        return result

    async def run_latency(self) -> None:
        s = self.sizes
        say(
            f"\nlive rate: {s.live_threads} threads x {s.live_rate:g} events/s for"
            f" {s.live_s + s.live_warmup_s:g} s (the simulator emits them as it goes); counted from"
            f" {s.live_warmup_s:g} s after the bridge has every stream open"
        )
        # Both modes through the bridge, then the same exactly_once shape without it: what the
        # broker and this machine give exactly_once at this rate.
        runs: list[tuple[str, Callable[[], Awaitable[Latency]]]] = [
            (mode, functools.partial(self.latency_run, mode))
            for mode in ("at_least_once", "exactly_once")
        ]
        runs.append(("baseline", self.latency_baseline_run))
        for label, run in runs:
            # The broker's own work before the run (compacting and cleaning what earlier parts
            # wrote) competes with this run's: say how much there was.
            meter = CpuMeter({"broker": self.broker_pid})
            await anyio.sleep(2)
            say(f"  {label}: the broker used {meter.read()['broker']:.0f} % of a core before it")
            # What this process holds is not walked by a collection during the run: a pause
            # here would delay the consumer's receipts.
            gc.collect()
            gc.freeze()
            try:
                result = await run()
            finally:
                gc.unfreeze()
            if label == "baseline":
                self.latency_baseline = result
            else:
                self.latency.append(result)
            say(
                f"  {result.mode}: consumer p50 {fmt(percentile(result.receive_ms, 50), '.1f')}"
                f" ms, p99 {fmt(percentile(result.receive_ms, 99), '.1f')} ms ({result.note})"
            )

    # -- 4: memory ------------------------------------------------------------------------------

    async def memory_run(self, threads: int) -> Memory:
        sim = SimulatorChild(idle_scenario(threads), self.workdir)
        topics = KafkaTopics.unique(f"bench-idle-{threads}")
        bridge: Bridge | None = None
        try:
            await sim.started()
            bridge = Bridge(sim, self.bootstrap, topics, "exactly_once", self.workdir)
            bridge.start()
            with anyio.fail_after(60):
                while not await bridge.ready():
                    await anyio.sleep(0.1)
            opened = math.nan
            with anyio.move_on_after(self.sizes.open_within_s - (time.time() - bridge.started_at)):
                await bridge.wait_for(
                    f"{threads:,} open streams", lambda m: m.get(OPEN_STREAMS, 0) >= threads, 900
                )
                while sim.status()["thread_streams"] < threads:
                    await anyio.sleep(0.1)
                opened = time.time() - bridge.started_at
            meter = CpuMeter({"bridge": bridge.pid})
            await anyio.sleep(6)  # every open stream has had a heartbeat (5 s) meanwhile
            idle_cpu = meter.read()["bridge"]
            metrics = await bridge.metrics()
            result = Memory(
                threads,
                int(metrics.get(OPEN_STREAMS, -1)),
                int(sim.status()["thread_streams"]),
                opened,
                bridge.process.rss_bytes(),
                metrics.get("qoder_bridge_reconnects_total", math.nan),
                idle_cpu,
            )
        except Exception:
            if bridge is not None:
                say(f"  bridge log ({bridge.log_path}):\n{bridge.log_tail()}")
            raise
        finally:
            if bridge is not None:
                with anyio.CancelScope(shield=True):
                    code = await bridge.stop()
            await sim.stop()
        result.stop_s, result.exit_code = bridge.stop_s, code
        return result

    async def run_memory(self) -> None:
        say("\nidle streams: threads that stay running, no events, a heartbeat every 5 s")
        for threads in (0, *self.sizes.idle_streams):
            m = await self.memory_run(threads)
            self.memory.append(m)
            say(
                f"  {threads:,} threads: RSS {m.rss / 2**20:.1f} MiB, streams open: bridge"
                f" {m.open_bridge:,}, simulator {m.open_simulator:,}"
                + (
                    f", all after {m.open_s:.1f} s"
                    if not math.isnan(m.open_s)
                    else f", NOT all within {self.sizes.open_within_s:.0f} s"
                )
            )

    # -- the report -----------------------------------------------------------------------------

    def report(self) -> None:
        say("\n" + "=" * 100)
        if self.throughput:
            self._report_throughput()
        if self.latency:
            self._report_latency()
        if self.memory:
            self._report_memory()
        for failure in self.failures:
            say(f"\nFAILED: {failure}")

    def _report_throughput(self) -> None:
        say("\nTHROUGHPUT, events/s: steady = from the first record visible to a read_committed")
        say("consumer until all are; from start = from the bridge's start (the first send)")
        rows = []
        for workload, results in self.throughput.items():
            plain = next((r for r in results if r.label == "plain producer"), None)
            base = plain.steady_rate if plain else math.nan
            for r in results:
                worker = r.cpu.get("bridge", r.cpu.get("producer", math.nan))
                rows.append(
                    [
                        f"{workload}: {r.label}",
                        f"{r.records:,}",
                        fmt(r.steady_rate, ",.0f", " ev/s"),
                        fmt(r.overall_rate, ",.0f", " ev/s"),
                        fmt(r.last - r.start, ".2f", " s"),
                        ratio(r.steady_rate, base),
                        fmt(worker, ".0f", " %"),
                        *(
                            fmt(r.cpu.get(name, math.nan), ".0f", " %")
                            for name in ("simulator", "broker", "bench", "other")
                        ),
                        f"{r.peak_rss / 2**20:.0f} MiB" if r.peak_rss else "",
                    ]
                )
        headers = ["run", "records", "steady", "from start", "took", "vs plain", "CPU"]
        headers += ["sim", "broker", "bench", "other", "peak RSS"]
        say(table(headers, rows))
        say("  vs plain: steady rate / the plain producer's steady rate on the same records.")
        say("  CPU, in % of one core, from the start until the last acknowledgement: of the")
        say("  bridge (for a producer row: of this process, which runs it), the simulator, the")
        say("  broker, this process (watching the topic), and anything else on the machine.")
        rows = []
        for workload, results in self.throughput.items():
            by = {r.label: r for r in results}
            alo, eos = by.get("bridge at_least_once"), by.get("bridge exactly_once")
            txn, plain = by.get("transactional producer"), by.get("plain producer")
            if alo and eos and txn and plain:
                rows.append(
                    [
                        workload,
                        ratio(eos.steady_rate, alo.steady_rate),
                        ratio(txn.steady_rate, plain.steady_rate),
                        ratio(alo.steady_rate, plain.steady_rate),
                        ratio(eos.steady_rate, txn.steady_rate),
                    ]
                )
        if rows:
            say("")
            headers = ["ratios of steady rates", "bridge EOS/ALO", "producer txn/plain"]
            headers += ["bridge ALO/plain", "bridge EOS/txn"]
            say(table(headers, rows))
        for workload, results in self.throughput.items():
            for r in results:
                if r.note != CLEAN:
                    say(f"  ! {workload}, {r.label}: {r.note}")

    def _report_latency(self) -> None:
        say("\nLATENCY at a live rate, from the event's processed_at (the simulator emitting it)")
        say("  to append  = to the broker appending it (the record's LogAppendTime; ms resolution)")
        say("  to receive = to a read_committed consumer (in this process) receiving it")
        base = self.latency_baseline
        runs = [*self.latency, *([base] if base is not None else [])]
        rows = [
            _latency_row(f"{r.mode}, to {what}", values)
            for r in runs
            for what, values in (("append", r.append_ms), ("receive", r.receive_ms))
        ]
        say(table(["mode", "events", "p50", "p90", "p99", "max"], rows))
        by_mode = {r.mode: r for r in self.latency}
        if {"at_least_once", "exactly_once"} <= by_mode.keys():
            alo, eos = by_mode["at_least_once"], by_mode["exactly_once"]
            parts = []
            for what in ("append_ms", "receive_ms"):
                for q in (50, 99):
                    e, a = getattr(eos, what), getattr(alo, what)
                    parts.append(f"{what[:-3]} p{q} {ratio(percentile(e, q), percentile(a, q))}")
            say(f"  EOS/ALO: {', '.join(parts)}")
            if base is not None:
                parts = [
                    f"{what[:-3]} p{q} "
                    + ratio(percentile(getattr(eos, what), q), percentile(getattr(base, what), q))
                    for what in ("append_ms", "receive_ms")
                    for q in (50, 99)
                ]
                say(f"  bridge EOS / aiokafka alone, transactional: {', '.join(parts)}")
        warmup = self.sizes.live_warmup_s
        rows = [
            _latency_row(f"{r.mode}, {what}", values)
            for r in runs
            for what, values in (
                ("starting (left out)", r.starting_ms),
                (f"warm-up, {warmup:g} s (left out)", r.warmup_ms),
                ("from open + 1 s", r.from_open_ms),
            )
            if values or r is not base  # (the baseline has no start to leave out)
        ]
        say("\n  to receive, of the events left out and of all from 1 s after every stream opened:")
        say(table(["mode, events", "events", "p50", "p90", "p99", "max"], rows))
        for r in self.latency:
            say(
                f"  {r.mode}: {r.note}; {r.excluded:,} of {r.total:,} left out: emitted before the"
                f" bridge had every stream open, or in the {warmup:g} s of warm-up after that"
            )
        if base is not None:
            say(
                f"  {base.mode}: {base.note}; {base.excluded:,} of {base.total:,} left out (its"
                f" first {warmup:g} s); {BASELINE_SHARDS} transactional producers, the bridge's"
                " shape (see latency_baseline_run)"
            )
        if self.sizes is QUICK:
            say("  (--quick: too short a warm-up and run to check a latency target with)")

    def _report_memory(self) -> None:
        say("\nMEMORY of the bridge process (VmRSS), exactly_once, idle streams")
        base = next((m.rss for m in self.memory if m.threads == 0), 0)
        rows = []
        for m in self.memory:
            per = (m.rss - base) / 1024 / m.threads if m.threads and base else math.nan
            rows.append(
                [
                    f"{m.threads:,} threads",
                    f"{m.open_bridge:,}",
                    f"{m.open_simulator:,}",
                    fmt(m.open_s, ".1f", " s") if m.threads else "",
                    f"{m.rss / 2**20:.1f} MiB",
                    ratio(m.rss, base) if m.threads else "baseline",
                    fmt(per, ".1f", " KiB"),
                    fmt(m.reconnects, ".0f"),
                    fmt(m.idle_cpu, ".1f", " %"),
                    f"{fmt(m.stop_s, '.1f', ' s')} ({m.exit_code})",
                ]
            )
        headers = ["run", "open (bridge)", "open (sim)", "all open after", "RSS"]
        headers += ["vs 0 threads", "per thread", "reconnects", "CPU idle", "SIGTERM (exit)"]
        say(table(headers, rows))
        say("  open: thread streams open by the bridge's qoder_bridge_open_streams and by the")
        say("  simulator's own count; n/a: not all within the bound. per thread: (RSS - RSS")
        say("  with 0 threads) / threads, a stream each when all are open. CPU idle: the")
        say("  bridge's, % of one core, over the 6 s after that (or after the bound).")
        say("  SIGTERM: how long the drain took, and the exit code (None: killed after 40 s).")


async def _send_all(producer: AIOKafkaProducer, topic: str, messages: list[Any]) -> None:
    futures = [await producer.send(topic, v, key=k, headers=h) for k, v, h in messages]
    for future in futures:
        await future


async def _send_in_transactions(
    producer: AIOKafkaProducer, topic: str, messages: list[Any]
) -> None:
    at = 0
    while at < len(messages):
        await producer.begin_transaction()
        deadline = time.monotonic() + COMMIT_EVERY_S
        while at < len(messages) and time.monotonic() < deadline:
            key, value, headers = messages[at]
            await producer.send(topic, value, key=key, headers=headers)
            at += 1
        await producer.commit_transaction()


#: The latency baseline's transactional producers: about as many as the bridge's shards with
#: events in the live run (50 sessions over 32 shards: 26-27).
BASELINE_SHARDS = 26
#: (key, value, headers, made at: the loop's clock) of one baseline event.
_Made = tuple[bytes, bytes, list[tuple[str, bytes]], float]


async def _baseline_emit(
    sends: list[anyio.abc.ObjectSendStream[_Made]], s: Sizes, seconds: float
) -> int:
    """The live run's events, made here: each thread every 1/rate s (phases spread), its
    events to one producer; returns how many were made."""
    threads, period = s.live_threads, 1 / s.live_rate
    padding = "x" * 220  # ~300 B a value, as the simulator's events
    start = anyio.current_time()
    due = [start + period * i / threads for i in range(threads)]
    made = 0
    while (now := anyio.current_time()) < start + seconds:
        for i in range(threads):
            if due[i] <= now:
                due[i] += period
                stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                event_id = f"bevt_{i}_{made}"
                value = json.dumps({"id": event_id, "processed_at": stamp, "p": padding})
                headers = [("ce_time", stamp.encode()), ("ce_id", event_id.encode())]
                key = f"sess_{i:03}/sthr_1".encode()
                sends[i % len(sends)].send_nowait((key, value.encode(), headers, now))
                made += 1
        await anyio.sleep(max(0.0, min(due) - anyio.current_time()))
    for send in sends:
        send.close()
    return made


async def _baseline_shard(
    producer: AIOKafkaProducer,
    receive: anyio.abc.ObjectReceiveStream[_Made],
    topics: KafkaTopics,
    shard: int,
) -> None:
    """One shard: a transaction a window, committed 100 ms after its first event was made."""
    async for first in receive:
        window, deadline = [first], first[3] + 0.1
        while True:
            try:
                window.append(receive.receive_nowait())
                continue
            except anyio.WouldBlock:
                if (left := deadline - anyio.current_time()) <= 0:
                    break
                await anyio.sleep(left)
            except anyio.EndOfStream:
                break
        await producer.begin_transaction()
        groups: dict[tuple[str, int], list[tuple[bytes, bytes, list[tuple[str, bytes]]]]] = {}
        for key, value, headers, _ in window:
            partition = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
            groups.setdefault((topics.events, partition), []).append((key, value, headers))
        for key in dict.fromkeys(k for k, _, _, _ in window):  # a checkpoint a thread
            groups.setdefault((topics.checkpoints, shard), []).append((key, b"{}" * 200, []))
        acks = []
        for (topic, partition), records in groups.items():
            batch = producer.create_batch()
            for key, value, headers in records:
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    batch.close()  # full: send it, and start the next
                    acks.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
            batch.close()
            acks.append(await producer.send_batch(batch, topic, partition=partition))
        for ack in acks:
            await ack
        await producer.commit_transaction()


async def _consume(
    bootstrap: str,
    topic: str,
    seen: list[tuple[int, float, str, str]],
    *,
    task_status: anyio.abc.TaskStatus[None],
) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        task_status.started()
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for records in batches.values():
                for r in records:
                    headers = dict(r.headers)
                    seen.append(
                        (r.timestamp, now, headers["ce_time"].decode(), headers["ce_id"].decode())
                    )
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await consumer.stop()


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")


def _epoch(stamp: str) -> float:
    """Seconds since the epoch for ``2026-01-02T03:04:05.123456789Z`` (nanosecond digits)."""
    match = _RFC3339.fullmatch(stamp)
    if match is None:
        return math.nan
    whole = calendar.timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    return whole + float("0" + (match.group(2) or ".0"))


# -- the simulator child -------------------------------------------------------------------------


def serve_simulator(
    scenario_path: Path, port: int, status_path: Path, *, freeze_gc: bool = False
) -> None:
    from bridge.simulator import Scenario, running_simulator  # noqa: PLC0415 -- child only

    async def main() -> None:
        scenario = Scenario.from_file(scenario_path)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with (
                running_simulator(scenario, token=TOKEN, port=port) as sim,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(report, sim)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()

    async def report(sim: Any) -> None:
        while True:
            if freeze_gc:
                # The simulator keeps every event it emitted (the API's history). A full
                # collection walked all of them, 68-72 ms at 24 s into a latency run, and held
                # back every stream meanwhile: the latency runs' p99 rose by that. What has been
                # kept is never walked again (nor freed: the child lives for one run).
                gc.freeze()
            threads = [t for s in sim.world.sessions for t in s.threads]
            status = {
                "events": sum(len(t.log) for t in threads),
                "threads": len(threads),
                "running": sum(1 for t in threads if t.status == "running"),
                "thread_streams": sum(1 for c in sim.app.open if c.thread_id),
                "streams": len(sim.app.open),
                "idle": sim.driver.idle.is_set(),
            }
            tmp = status_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(status))
            tmp.replace(status_path)
            await anyio.sleep(0.2)

    anyio.run(main)


# -- main ---------------------------------------------------------------------------------------


class _NewTopicNoise(logging.Filter):
    """For a few milliseconds after a topic is created the broker answers ListOffsets with
    NOT_LEADER_OR_FOLLOWER; aiokafka retries, but logs an error each time."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "NotLeaderForPartitionError" not in record.getMessage()


def _kafka_version() -> str:
    pom = (ROOT / "deploy" / "local" / "kafka" / "pom.xml").read_text()
    match = re.search(r"<kafka.version>(.*?)</kafka.version>", pom)
    return match.group(1) if match else "?"


def _raise_fd_limit() -> None:
    # 10,000 streams: a socket each in the bridge and in the simulator (children inherit this).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main(args: argparse.Namespace, broker: KafkaBroker, workdir: Path) -> int:
    assert broker.pid is not None
    bench = Bench(args, broker.bootstrap, broker.pid, workdir)
    import tests.bench_cost as bench_cost  # noqa: PLC0415 -- it imports this module

    # Run as __main__, this module is not the tests.bench that bench_cost imported: one list
    # of children, so that every child is stopped on the way out.
    bench_cost._CHILDREN = _CHILDREN  # type: ignore[attr-defined]
    cost_parts, cost_bench = bench_cost.PARTS, bench_cost.CostBench
    cost = cost_bench(args, broker.bootstrap, broker.pid, workdir)
    import tests.bench_pipeline as bench_pipeline  # noqa: PLC0415 -- it imports this module

    bench_pipeline._CHILDREN = _CHILDREN  # type: ignore[attr-defined]
    pipeline = bench_pipeline.PipelineBench(args, broker.bootstrap, broker.pid, workdir)
    import tests.bench_failover as bench_failover  # noqa: PLC0415 -- scale-out, issue 10

    failover = bench_failover.FailoverBench(args, broker.bootstrap, workdir)
    parts: dict[str, Callable[[], Any]] = {
        "pipeline": pipeline.run,
        "throughput": bench.run_throughput,
        "latency": bench.run_latency,
        "memory": bench.run_memory,
        **{name: (lambda run=run: run(cost)) for name, run in cost_parts.items()},
        **{name: (lambda run=run: run(failover)) for name, run in bench_failover.PARTS.items()},
    }
    interrupted = False

    async def until_signal(scope: anyio.CancelScope) -> None:
        # Ctrl-C (or SIGTERM) stops the run: the children (which get Ctrl-C too) and the
        # broker are stopped on the way out. asyncio's own SIGINT handling would cancel the
        # main task in a way a cancel scope of the run may take for its own, and go on.
        nonlocal interrupted
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                say(f"\n{signal.Signals(signum).name}: stopping")
                interrupted = True
                scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(until_signal, tg.cancel_scope)
        for name in args.parts:
            started = time.monotonic()
            try:
                await parts[name]()
            except Exception as exc:
                bench.failures.append(f"{name}: {exc!r}")
                traceback.print_exc()
            say(f"  ({name} took {time.monotonic() - started:.0f} s)")
        tg.cancel_scope.cancel()
    if interrupted:
        return 130
    pipeline.report()
    bench.report()
    cost.report()
    failover.report()
    draw_charts(args, pipeline, bench)
    return 1 if bench.failures else 0


def draw_charts(args: argparse.Namespace, pipeline: Any, bench: Bench) -> None:
    """The figures of this run as PNG charts (tests/bench_charts.py), when matplotlib is there."""
    from dataclasses import asdict  # noqa: PLC0415

    try:
        import matplotlib  # noqa: F401, PLC0415

        from tests.bench_charts import draw  # noqa: PLC0415
    except ImportError:
        say("\ncharts: matplotlib is not installed (the bench extra): none drawn")
        return
    s = bench.sizes
    figures = {
        "caption": (
            f"python -m tests.bench {' '.join(sys.argv[1:])}  |  {os.cpu_count()} cores,"
            f" Python {sys.version.split()[0]}, Apache Kafka {_kafka_version()},"
            f" {time.strftime('%Y-%m-%d')}"
        ),
        "pipeline": [asdict(r) for r in pipeline.runs],
        "latency": [asdict(r) for r in bench.latency],
        "latency_rate": f"{s.live_threads * s.live_rate:,.0f} events/s"
        f" ({s.live_threads} threads x {s.live_rate:g}/s)",
        "latency_warmup": (
            f"from {s.live_warmup_s:g} s after every stream was open (dotted: the warm-up)"
        ),
        "memory": [asdict(m) for m in bench.memory],
    }
    written = draw(figures, args.charts)
    say(f"\ncharts: {', '.join(str(p) for p in written)}")


PARTS = (
    "pipeline",
    "throughput",
    "latency",
    "memory",
    "soak",
    "restart",
    "startup",
    "http2",
    "failover",
    "idle_members",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true", help="smaller runs, about 2 minutes")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
        help="comma list of: throughput (with the producer baselines), latency, memory; soak"
        " (an account of 3,000 sessions), restart (1,000 running threads), startup (100,000"
        " checkpoints), http2 (HTTP/2 vs HTTP/1.1): see tests/bench_cost.py; failover (SIGKILL"
        " of one of 3 members), idle_members (10,000 idle threads over 4 members): see"
        " tests/bench_failover.py",
    )
    parser.add_argument(
        "--soak-s",
        type=float,
        default=0.0,
        help="how long the soak part watches the bridge (default 150 s, --quick 60 s; or"
        " $BRIDGE_BENCH_SOAK_S: 1800 for the 30-minute soak)",
    )
    parser.add_argument(
        "--checkpoint-versions",
        type=int,
        default=1,
        help="startup part: checkpoint records per thread (> 1: a topic not compacted yet)",
    )
    parser.add_argument(
        "--pipeline-threads",
        type=lambda v: tuple(int(t) for t in v.split(",")),
        help="pipeline part: the thread counts of the sweep (default 40,200,1000)",
    )
    parser.add_argument(
        "--charts",
        type=Path,
        default=ROOT / ".cache" / "bench" / "charts",
        help="where the PNG charts and their figures go (default .cache/bench/charts)",
    )
    parser.add_argument("--logs", type=Path, help="keep the logs (bridge, simulator) here")
    parser.add_argument("--py-spy", help="py-spy executable: profile the bridge's throughput runs")
    parser.add_argument("--serve-simulator", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--freeze-gc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_simulator:
        serve_simulator(args.serve_simulator, args.port, args.status, freeze_gc=args.freeze_gc)
        return 0
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    _raise_fd_limit()
    logging.getLogger("aiokafka.consumer.fetcher").addFilter(_NewTopicNoise())
    logging.getLogger("aiokafka.producer.sender").addFilter(_NewTopicNoise())
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qoder-bench-") as tmp:
        workdir = args.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cores = os.cpu_count()
        say(f"bridge benchmark ({'quick' if args.quick else 'full'}): {', '.join(args.parts)}")
        say(
            f"machine: {cores} cores, Python {sys.version.split()[0]}, Apache Kafka"
            f" {_kafka_version()} (one local broker, KRaft, on loopback)"
        )
        say(
            "arrangement: the broker (JVM), the simulator (a child process), the bridge (a child"
            " process, `python -m bridge run`) and this process (topic watcher, consumer,"
            f" baseline producers) share these {cores} cores; each figure's CPU columns say who"
            " used what"
        )
        say(
            "bridge settings, others default: "
            + " ".join(f"{k}={v}" for k, v in BRIDGE_SETTINGS.items())
        )
        meter = CpuMeter({})
        time.sleep(2)
        load = meter.read()["other"]
        warning = "; the figures will be disturbed by it" if load > 20 else ""
        say(f"load from other processes before the start: {load:.0f} % of one core{warning}")
        fetch_jars()
        # The local broker's default heap (768 MiB, enough for the tests) is under GC pressure
        # once the pipeline part has gone through it: exactly_once's latency p99 after it was
        # 460-670 ms with 768 MiB and 118-217 ms with 2 GiB (Kafka's own scripts default to 1
        # GiB; production brokers have more).
        heap = os.environ.get("KAFKA_HEAP_OPTS", BROKER_HEAP)
        broker = KafkaBroker(Path(tmp) / "kafka", env={"KAFKA_HEAP_OPTS": heap})
        say(f"broker heap: {heap} (KAFKA_HEAP_OPTS)")
        started = time.monotonic()
        broker.start()
        say(f"broker {broker.bootstrap} up in {time.monotonic() - started:.1f} s")
        try:
            code = anyio.run(_main, args, broker, workdir, backend="asyncio")
        finally:
            for child in _CHILDREN:
                if child.poll() is None:
                    child.kill()
                    child.wait(10)
            try:
                broker.stop()
            except Exception:
                broker.kill()
        where = f"; logs in {args.logs}" if args.logs else ""
        say(f"\ntotal {time.monotonic() - began:.0f} s{where}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
