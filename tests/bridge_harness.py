"""Running the bridge against the simulator and a real broker, and checking what reached Kafka.

What a user checks: the topic holds every event of every thread, byte for byte, in the order
the API served them, under the right key, with the CloudEvents headers, and nothing twice.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from bridge import metrics
from bridge.app import Bridge
from bridge.config import Settings, load_settings
from bridge.logs import configure_logging
from tests.kafka_broker import read_topic

TOKEN = "pt-test-0123456789abcdef"


def bridge_env(sim_url: str, bootstrap: str, topics: Any, **extra: str) -> dict[str, str]:
    env = {
        "QODER_API_URL": sim_url,
        "QODER_ACCESS_TOKEN": TOKEN,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "BRIDGE_TOPIC": topics.events,
        "BRIDGE_ALERTS_TOPIC": topics.alerts,
        "BRIDGE_CHECKPOINT_TOPIC": topics.checkpoints,
        "BRIDGE_DLQ_TOPIC": topics.dlq,
        "BRIDGE_TRANSACTIONAL_ID": topics.transactional_id,
        "BRIDGE_GROUP_ID": topics.group,
        "BRIDGE_HTTP_HOST": "127.0.0.1",
        "BRIDGE_HTTP_PORT": "0",
        "BRIDGE_POLL_INTERVAL_S": "1",
        "BRIDGE_STALL_TIMEOUT_S": "2",
        "BRIDGE_BACKOFF_INITIAL_S": "0.05",
        "BRIDGE_BACKOFF_MAX_S": "1",
        "BRIDGE_API_MAX_RPS": "2000",
        "BRIDGE_DRAIN_TIMEOUT_S": "15",
        "BRIDGE_TOPIC_PARTITIONS": "3",
        "BRIDGE_LOG_FORMAT": "json",
        "BRIDGE_LOG_LEVEL": "info",
    }
    env.update(extra)
    return env


def bridge_settings(sim_url: str, bootstrap: str, topics: Any, **extra: str) -> Settings:
    return load_settings(bridge_env(sim_url, bootstrap, topics, **extra))


@asynccontextmanager
async def running_bridge(settings: Settings) -> AsyncIterator[Bridge]:
    """The bridge in this process; drained (like SIGTERM) when the block ends."""
    configure_logging(settings.log)
    bridge = Bridge(settings)
    result: dict[str, int] = {}

    async def main() -> None:
        result["exit"] = await bridge.run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(main)
        try:
            yield bridge
        finally:
            with anyio.fail_after(settings.shutdown.drain_timeout_s + 10):
                while bridge._outer is None:
                    await anyio.sleep(0.01)
                bridge.drain()
                while "exit" not in result:
                    await anyio.sleep(0.05)
    assert result["exit"] == 0, "the bridge did not drain cleanly"


class BridgeProcess:
    """``python -m bridge run`` as a user runs it: for kill -9 and SIGTERM tests."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.starts += 1
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run"],
            env=self.env,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Delivery:
    """What a read_committed consumer found, compared with what the simulator served."""

    expected: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    misordered: int = 0
    by_key: dict[str, list[bytes]] = field(default_factory=dict)
    #: (key, position in the thread, events in the thread, event id) of a few lost events
    lost_examples: list[tuple[str, int, int, str]] = field(default_factory=list)
    #: (key, event id, the copies' partition:offset) of a few duplicated events
    duplicate_examples: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def summary(self) -> str:
        line = (
            f"expected={self.expected} received={self.received} lost={self.lost} "
            f"duplicated={self.duplicated} misordered={self.misordered}"
        )
        if self.lost_examples:
            line += f" lost_examples={self.lost_examples[:12]}"
        if self.duplicate_examples:
            line += f" duplicate_examples={self.duplicate_examples[:12]}"
        return line


def _event_id(value: bytes) -> str:
    return value.split(b'"id":"', 1)[-1].split(b'"', 1)[0].decode(errors="replace")


def compare(records: list[Any], logs: Mapping[str, list[bytes]]) -> Delivery:
    """Count lost, duplicated and misordered events, per key, by exact value bytes."""
    by_key: dict[str, list[bytes]] = defaultdict(list)
    places: dict[tuple[str, bytes], list[str]] = defaultdict(list)
    for record in records:
        by_key[record.key.decode()].append(record.value)
        places[record.key.decode(), record.value].append(f"{record.partition}:{record.offset}")
    result = Delivery(by_key=dict(by_key))
    for key, expected in logs.items():
        got = by_key.get(key, [])
        result.expected += len(expected)
        result.received += len(got)
        counts = Counter(got)
        wanted = Counter(expected)
        result.lost += sum((wanted - counts).values())
        result.duplicated += sum((counts - wanted).values())
        for i, value in enumerate(expected):
            if value not in counts and len(result.lost_examples) < 50:
                result.lost_examples.append((key, i, len(expected), _event_id(value)))
        for value in counts - wanted:
            if len(result.duplicate_examples) < 50:
                copies = places[key, value]
                result.duplicate_examples.append((key, _event_id(value), copies))
        # Order: the first occurrence of each event must follow the API's order.
        position = {value: i for i, value in enumerate(expected)}
        firsts: list[int] = []
        seen: set[bytes] = set()
        for value in got:
            if value in position and value not in seen:
                seen.add(value)
                firsts.append(position[value])
        result.misordered += sum(1 for a, b in itertools.pairwise(firsts) if b < a)
    for key, got in by_key.items():
        if key not in logs:
            result.received += len(got)
            result.duplicated += len(got)
    return result


def simulator_logs(sim: Any, *, max_event_bytes: int | None = None) -> dict[str, list[bytes]]:
    """Every thread's events as served; with ``max_event_bytes``, only those the bridge
    publishes as events (valid UTF-8, not larger than that): the rest are dead letters."""
    logs = {f"{s}/{t}": list(sim.thread_log(s, t)) for s, t in sim.all_threads()}
    if max_event_bytes is None:
        return logs
    return {k: [e for e in v if _publishable(e, max_event_bytes)] for k, v in logs.items()}


def _publishable(raw: bytes, max_event_bytes: int) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(raw) <= max_event_bytes


def expected_dead_letters(sim: Any, max_event_bytes: int) -> Counter[tuple[str, str]]:
    """(key, reason) of every item the bridge must dead-letter exactly once."""
    expected: Counter[tuple[str, str]] = Counter()
    for s, t in sim.all_threads():
        key = f"{s}/{t}"
        events = set(sim.thread_log(s, t))
        for raw in sim.thread_items(s, t):
            if raw not in events:
                parsed = json.loads(raw)
                reason = "missing_id" if isinstance(parsed, dict) else "not_object"
                expected[key, reason] += 1
            elif not _publishable(raw, max_event_bytes):
                try:
                    raw.decode("utf-8")
                    expected[key, "too_large"] += 1
                except UnicodeDecodeError:
                    expected[key, "invalid_utf8"] += 1
    return expected


async def dead_letters(bootstrap: str, topic: str) -> Counter[tuple[str, str]]:
    return Counter(
        (r.key.decode(), json.loads(r.value)["reason"]) for r in await read_topic(bootstrap, topic)
    )


async def wait_for_delivery(
    bootstrap: str,
    topic: str,
    sim: Any,
    *,
    timeout_s: float,
    isolation_level: str = "read_committed",
    max_event_bytes: int | None = None,
) -> tuple[list[Any], Delivery]:
    """Poll the topic until nothing is missing (or the time is up); returns the last look."""
    with anyio.move_on_after(timeout_s):
        while True:
            records = await read_topic(bootstrap, topic, isolation_level=isolation_level)
            delivery = compare(records, simulator_logs(sim, max_event_bytes=max_event_bytes))
            if delivery.lost == 0 and delivery.expected > 0:
                return records, delivery
            await anyio.sleep(0.5)
    records = await read_topic(bootstrap, topic, isolation_level=isolation_level)
    return records, compare(records, simulator_logs(sim, max_event_bytes=max_event_bytes))


async def deliver_scenario(
    scenario: Any, bootstrap: str, topics: Any, *, idle_timeout_s: float = 60, **env: str
) -> tuple[list[Any], Delivery]:
    """Play the scenario through an in-process bridge; what reached the events topic."""
    from bridge.simulator import running_simulator  # noqa: PLC0415 -- the simulator extra

    async with running_simulator(scenario, token=TOKEN) as sim:
        settings = bridge_settings(sim.base_url, bootstrap, topics, **env)
        async with running_bridge(settings):
            with anyio.fail_after(idle_timeout_s):
                await sim.wait_idle()
            return await wait_for_delivery(bootstrap, topics.events, sim, timeout_s=45)


async def read_json(bootstrap: str, topic: str) -> list[Any]:
    """Every committed record of the topic, its value parsed as JSON (alerts, dead letters)."""
    return [json.loads(r.value) for r in await read_topic(bootstrap, topic)]


def api_requests_counted(route: str | None = None) -> float:
    """``qoder_bridge_api_requests_total`` in this process, every status (of one route, or all)."""
    return sum(
        sample.value
        for family in metrics.API_REQUESTS.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and route in (None, sample.labels["route"])
    )
