"""`make run` (deploy/local/demo.sh) and the local broker: it stops only a broker it started,
and its live view shows this run's events, not the topic's history."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from anyio.streams.text import TextReceiveStream

from tests.kafka_broker import KafkaBroker, create_topics

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

REPO = Path(__file__).resolve().parents[1]
DEMO_SH = REPO / "deploy" / "local" / "demo.sh"
EVENT_LINE = re.compile(r"^\s+\d+  \S+/\S+  ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_env(broker: KafkaBroker) -> dict[str, str]:
    """What a user has when they type `make run` with KAFKA_PORT set: no token, no bootstrap."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QODER_", "BRIDGE_", "KAFKA_"))}
    env.update(
        KAFKA_PORT=str(broker.port),
        KAFKA_CONTROLLER_PORT=str(broker.controller_port),
        KAFKA_DATA_DIR=str(broker.data_dir),
        BRIDGE_HTTP_PORT=str(free_port()),
    )
    return env


async def run_demo_until_events(env: dict[str, str], events: int = 3) -> str:
    """Start `make run`'s script, wait for ``events`` event lines, Ctrl-C it, return stdout."""
    output: list[str] = []
    async with await anyio.open_process(
        ["bash", str(DEMO_SH)], env=env, stdin=None, stderr=None
    ) as process:
        assert process.stdout is not None
        try:
            with anyio.fail_after(120):
                buffered = ""
                async for chunk in TextReceiveStream(process.stdout):
                    output.append(chunk)
                    buffered += chunk
                    lines = buffered.splitlines()
                    if sum(1 for line in lines if EVENT_LINE.match(line)) >= events:
                        break
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(90):
                async for chunk in TextReceiveStream(process.stdout):
                    output.append(chunk)
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    assert process.returncode == 0, "".join(output)
    return "".join(output)


async def test_make_run_leaves_a_broker_it_did_not_start_running(kafka_broker_factory: Any) -> None:
    """Scenario: a broker already runs on KAFKA_PORT (an earlier `kafka.sh start`) and its
    events topic holds history. `make run` uses it, shows only this run's events, and on
    Ctrl-C stops the bridge and the simulator but leaves the broker running."""
    broker: KafkaBroker = kafka_broker_factory()
    await create_topics(broker.bootstrap, ["qoder.events"], partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for n in range(5):
            await producer.send_and_wait(
                "qoder.events",
                b'{"type":"history.from_an_earlier_run"}',
                key=b"sess_old/sthr_%d" % n,
            )
    finally:
        await producer.stop()

    output = await run_demo_until_events(demo_env(broker))

    assert f"kafka:  already running on {broker.bootstrap}" in output
    assert "left running on exit" in output
    assert "the 5 earlier records of qoder.events are not shown" in output
    assert "history.from_an_earlier_run" not in output
    assert sum(1 for line in output.splitlines() if EVENT_LINE.match(line)) >= 3
    assert "stopping the Kafka broker" not in output
    assert broker.is_running(), "make run stopped a broker it did not start"


async def test_make_run_stops_the_broker_it_started(kafka_broker_factory: Any) -> None:
    """Scenario: nothing runs on KAFKA_PORT. `make run` starts the broker, shows events, and
    on Ctrl-C stops the broker too."""
    broker: KafkaBroker = kafka_broker_factory(start=False)
    output = await run_demo_until_events(demo_env(broker))
    assert f"kafka:  started on {broker.bootstrap}; stopped on exit" in output
    assert "stopping the Kafka broker this command started" in output
    assert not broker.is_running()
