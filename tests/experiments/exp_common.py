"""What the experiments share: a broker to run against, topics, timing, printing.

Every experiment runs against ``$EXP_BOOTSTRAP`` when it is set (a broker you started, e.g.
``KAFKA_PORT=19092 KAFKA_DATA_DIR=/tmp/exp-kafka deploy/local/kafka/kafka.sh start``), or
else starts a throwaway broker of its own (tests/kafka_broker.py) and kills it at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from tests.kafka_broker import KafkaBroker, create_topics, fetch_jars


@contextlib.contextmanager
def bootstrap() -> Iterator[str]:
    external = os.environ.get("EXP_BOOTSTRAP", "").strip()
    if external:
        yield external
        return
    fetch_jars()
    broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="exp-kafka-")))
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.kill()


def unique(label: str) -> str:
    return f"exp.{label}.{uuid.uuid4().hex[:8]}"


async def topic(bootstrap: str, label: str, partitions: int, *, compacted: bool = False) -> str:
    name = unique(label)
    await create_topics(bootstrap, [name], partitions=partitions, compacted=compacted)
    return name


def transactional_producers(servers: str, label: str, count: int) -> list[AIOKafkaProducer]:
    """``count`` transactional producers (not started), ids unique to this run."""
    group = unique(label)
    return [
        AIOKafkaProducer(
            bootstrap_servers=servers,
            transactional_id=f"{group}-{i}",
            enable_idempotence=True,
            acks="all",
        )
        for i in range(count)
    ]


def now() -> float:
    return time.monotonic()


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def summary(values: list[float]) -> dict[str, float]:
    """min / median / p95 / max of a list of milliseconds."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "min": round(ordered[0], 1),
        "median": round(statistics.median(ordered), 1),
        "p95": round(p95, 1),
        "max": round(ordered[-1], 1),
    }


def show(what: str, **fields: Any) -> None:
    print(json.dumps({"what": what, **fields}, default=str), flush=True)
