"""Are a new transactional producer's first transactions slow without the bridge? aiokafka alone.

    .venv/bin/python -m tests.experiments.exp_txn_warmup [--producers 32] [--seconds 8]

The bench's exactly_once latency runs showed the first two seconds' transactions taking
70-280 ms to send, against 5-10 ms afterwards, with the bridge at 27-45 % of a core. This
reproduces the bridge's shape of work with aiokafka only, on a fresh broker (its heap from
``KAFKA_HEAP_OPTS``, 2 GiB unless set): ``--producers`` transactional producers start at once
(InitProducerId each), then each commits a transaction every 100 ms holding 20 records of
300 B to one partition of an events topic and one record to its own partition of a compacted
checkpoint topic, both created before the start, as the bridge's windows do at 1,000 events/s
over 50 threads. Per half second from the first transaction: the transactions, and the median
and largest time to send (``send_batch`` and its acknowledgement) and to commit. ``--java``
then does the same through the Java client (TxnWarmup.java, the broker's own kafka-clients jar,
a thread a producer, ``flush()`` as the send's end): a new JVM each run, so its own JIT warms up
with it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import anyio
from aiokafka import AIOKafkaProducer

from tests.experiments.exp_common import topic, transactional_producers, unique
from tests.kafka_broker import KafkaBroker, fetch_jars

#: The broker's jars, kafka-clients among them (deploy/local/kafka fetches them here).
LIBS = Path(__file__).resolve().parents[2] / ".cache" / "kafka"


async def run(servers: str, args: argparse.Namespace) -> list[tuple[float, float, float]]:
    events = await topic(servers, "events", 32)
    checkpoints = await topic(servers, "checkpoints", 32, compacted=True)
    producers = transactional_producers(servers, "warm", args.producers)
    async with anyio.create_task_group() as tg:
        for p in producers:
            tg.start_soon(p.start)
    rows: list[tuple[float, float, float]] = []  # (began, send s, commit s)
    began = time.monotonic()
    value = b"x" * 300

    async def shard(i: int, p: AIOKafkaProducer) -> None:
        while time.monotonic() - began < args.seconds:
            start = time.monotonic()
            await p.begin_transaction()
            sends = []
            for name, count in ((events, 20), (checkpoints, 1)):
                batch = p.create_batch()
                for n in range(count):
                    batch.append(key=b"k%d" % n, value=value, timestamp=None)
                batch.close()
                sends.append(await p.send_batch(batch, name, partition=i % 32))
            for future in sends:
                await future
            sent = time.monotonic()
            await p.commit_transaction()
            rows.append((start - began, sent - start, time.monotonic() - sent))
            await anyio.sleep(max(0.0, 0.1 - (time.monotonic() - start)))

    try:
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(producers):
                tg.start_soon(shard, i, p)
    finally:
        for p in producers:
            await p.stop()
    return rows


def report(rows: list[tuple[float, float, float]]) -> None:
    buckets: dict[int, list[tuple[float, float, float]]] = {}
    for row in rows:
        buckets.setdefault(int(row[0] // 0.5), []).append(row)
    for number, bucket in sorted(buckets.items()):
        sends = sorted(r[1] * 1000 for r in bucket)
        commits = sorted(r[2] * 1000 for r in bucket)
        print(
            f"  {number * 0.5:4.1f}-{number * 0.5 + 0.5:.1f} s  {len(bucket):4} transactions"
            f"  send p50 {sends[len(sends) // 2]:6.1f} max {sends[-1]:6.1f} ms"
            f"  commit p50 {commits[len(commits) // 2]:6.1f} max {commits[-1]:6.1f} ms"
        )


def run_java(servers: str, args: argparse.Namespace) -> list[tuple[float, float, float]]:
    """The same transactions through the Java client (TxnWarmup.java, the broker's jars)."""

    async def topics() -> tuple[str, str]:
        return await topic(servers, "events", 32), await topic(
            servers, "checkpoints", 32, compacted=True
        )

    events, checkpoints = anyio.run(topics)
    libs = next(LIBS.glob("*/libs"))
    source = Path(__file__).with_name("TxnWarmup.java")
    cmd = ["java", "-cp", f"{libs}/*", str(source), servers, events, checkpoints]
    cmd += [str(args.producers), str(args.seconds), unique("warm-java")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    return [tuple(float(x) for x in line.split()) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--producers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--java", action="store_true", help="also through the Java client")
    args = parser.parse_args()
    fetch_jars()
    heap = os.environ.get("KAFKA_HEAP_OPTS", "-Xms2g -Xmx2g")
    broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="exp-kafka-")), env={"KAFKA_HEAP_OPTS": heap})
    broker.start()
    try:
        for attempt in (1, 2):
            print(f"run {attempt} on this broker ({heap}): {args.producers} aiokafka producers")
            report(anyio.run(run, broker.bootstrap, args))
        if args.java:
            for attempt in (1, 2):
                print(f"run {attempt} of the Java client ({args.producers} producers)")
                report(run_java(broker.bootstrap, args))
    finally:
        broker.kill()


if __name__ == "__main__":
    main()
