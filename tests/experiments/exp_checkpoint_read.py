"""How long a new owner takes to read one shard's checkpoints (one partition, read_committed).

    .venv/bin/python -m tests.experiments.exp_checkpoint_read [--sizes 1000,10000,100000]

For each size N: a compacted 32-partition topic (the bridge's checkpoint configs), N checkpoint
records of realistic size (32 recent event ids, ~1.4 KiB) written into partition 0 by
transactional producers, ``--per-txn`` records a transaction (every ``--abort-every``-th one
aborted), keys cycling over ``--threads`` threads so the latest value per key is what a reader
keeps. Then, ``--repeat`` times, a fresh read_committed consumer reads partition 0 from the
beginning to its end (what ``bridge.checkpoints.read_checkpoints`` does, for one partition),
timed from before ``start()``. Nothing is compacted yet (the active segment never is): this is
the size a busy shard's partition has until its segment rolls.
"""

from __future__ import annotations

import argparse
import json
import time

import anyio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.experiments.exp_common import bootstrap, ms, show, summary, unique
from tests.kafka_broker import create_topics


def checkpoint_value(thread: int, n: int) -> bytes:
    ids = [f"evt_01JABCDEFGHJKMNPQRS{thread:06d}{i:06d}" for i in range(n, n + 32)]
    return json.dumps(
        {
            "last_event_id": ids[-1],
            "session_id": f"sess_01JABCDEFGHJKMNPQRST{thread // 5:05d}",
            "thread_id": f"sthr_01JABCDEFGHJKMNPQRST{thread:05d}",
            "drained_updated_at": None,
            "recent_ids": ids,
            "idless_after": 0,
            "written_at": "2026-01-01T00:00:00.000000Z",
        },
        separators=(",", ":"),
    ).encode()


async def write(servers: str, name: str, args: argparse.Namespace, records: int) -> float:
    t0 = time.monotonic()
    writers = 4
    per_writer = records // writers

    async def writer(w: int) -> None:
        p = AIOKafkaProducer(
            bootstrap_servers=servers,
            transactional_id=unique(f"ckw{w}"),
            enable_idempotence=True,
            acks="all",
            linger_ms=0,
        )
        await p.start()
        try:
            written, txn = 0, 0
            while written < per_writer:
                txn += 1
                await p.begin_transaction()
                acks = []
                for _ in range(min(args.per_txn, per_writer - written)):
                    thread = (w * per_writer + written) % args.threads
                    key = f"sess_{thread // 5:05d}/sthr_{thread:05d}".encode()
                    acks.append(
                        await p.send(name, checkpoint_value(thread, written), key=key, partition=0)
                    )
                    written += 1
                for ack in acks:
                    await ack
                if args.abort_every and txn % args.abort_every == 0:
                    await p.abort_transaction()
                else:
                    await p.commit_transaction()
        finally:
            await p.stop()

    async with anyio.create_task_group() as tg:
        for w in range(writers):
            tg.start_soon(writer, w)
    return time.monotonic() - t0


async def read_partition(servers: str, name: str) -> tuple[float, int, int]:
    t0 = time.monotonic()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    latest: dict[bytes, bytes] = {}
    count = 0
    try:
        tp = TopicPartition(name, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            batches = await consumer.getmany(tp, timeout_ms=500)
            for r in batches.get(tp, []):
                count += 1
                if r.key is not None and r.value is not None:
                    latest[r.key] = r.value
    finally:
        await consumer.stop()
    return time.monotonic() - t0, count, len(latest)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--per-txn", type=int, default=10)
    parser.add_argument("--abort-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=300, help="distinct keys in the shard")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--segment-bytes", type=int, default=1 << 30, help="Kafka's default: nothing compacted"
    )
    args = parser.parse_args()
    with bootstrap() as servers:
        for size in (int(x) for x in args.sizes.split(",")):
            name = unique("ckpt")
            configs = {
                "min.compaction.lag.ms": "60000",  # the bridge's CHECKPOINT_TOPIC_CONFIGS
                "segment.bytes": str(args.segment_bytes),
            }
            await create_topics(servers, [name], partitions=32, compacted=True, configs=configs)
            write_s = await write(servers, name, args, size)
            reads, counts = [], set()
            for _ in range(args.repeat):
                took, count, keys = await read_partition(servers, name)
                reads.append(ms(took))
                counts.add((count, keys))
            show(
                "checkpoint_partition_read",
                records_written=size,
                per_txn=args.per_txn,
                transactions=size // args.per_txn,
                aborted_every=args.abort_every,
                segment_bytes=args.segment_bytes,
                record_bytes=len(checkpoint_value(1, 1)),
                write_s=round(write_s, 1),
                committed_read_and_distinct_keys=sorted(counts),
                read_ms=summary(reads),
            )


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
