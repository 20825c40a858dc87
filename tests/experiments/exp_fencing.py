"""Two transactional producers with one transactional.id: what fencing does, seen from both.

    .venv/bin/python -m tests.experiments.exp_fencing [--rounds 5]

The shard hand-off of deploy/design/scale-out.md in miniature. Producer A (the old owner) opens a
transaction and writes events and a checkpoint without committing; producer B (the new owner)
starts with the same transactional.id. Measured and printed:

- how long B's start (InitProducerId) takes with no earlier holder, with a holder whose
  transaction is open, and with a holder that committed and is idle;
- that A's open transaction is aborted: read_uncommitted sees its records, read_committed not;
- that what A committed *before* B started stays visible;
- what A gets afterwards, and when: a send to a partition already in its transaction, a send to a
  partition new to it, commit_transaction, abort_transaction, begin_transaction, stop().
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import anyio
from aiokafka import AIOKafkaProducer

from tests.experiments.exp_common import bootstrap, ms, show, summary, topic, unique
from tests.kafka_broker import read_topic


def producer(servers: str, txn_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=servers,
        transactional_id=txn_id,
        enable_idempotence=True,
        acks="all",
        transaction_timeout_ms=60000,
    )


async def started(p: AIOKafkaProducer) -> float:
    t0 = time.monotonic()
    await p.start()
    return ms(time.monotonic() - t0)


async def outcome(label: str, awaitable: Any, timeout_s: float = 20) -> dict[str, Any]:
    """Run one step of the zombie and say how it ended, and after how long."""
    t0 = time.monotonic()
    try:
        with anyio.fail_after(timeout_s):
            result = await awaitable
            if isinstance(result, asyncio.Future):
                result = await result  # send() -> the broker's acknowledgement
    except BaseException as exc:  # every kind of ending
        return {
            "step": label,
            "ok": False,
            "error": type(exc).__name__,
            "message": str(exc)[:200],
            "after_ms": ms(time.monotonic() - t0),
        }
    return {
        "step": label,
        "ok": True,
        "result": repr(result)[:80],
        "after_ms": ms(time.monotonic() - t0),
    }


async def one_round(servers: str, events: str, checkpoints: str, n: int) -> None:
    txn_id = unique("fence")
    a = producer(servers, txn_id)
    first_ms = await started(a)

    # A commits one transaction (visible for good), then opens another and stalls.
    await a.begin_transaction()
    await (await a.send(events, b"committed-by-A", key=b"s/t", partition=0))
    await a.commit_transaction()
    await a.begin_transaction()
    for i in range(5):
        await (await a.send(events, f"open-by-A-{i}".encode(), key=b"s/t", partition=0))
    await (await a.send(checkpoints, b'{"last_event_id":"open"}', key=b"s/t", partition=0))

    b = producer(servers, txn_id)
    fence_open_ms = await started(b)  # fences A, aborts its open transaction

    # B is the owner now: one committed transaction of its own.
    await b.begin_transaction()
    await (await b.send(events, b"committed-by-B", key=b"s/t", partition=0))
    await b.commit_transaction()

    steps = [
        await outcome(
            "A.send to a partition already in its transaction",
            a.send(events, b"zombie-1", key=b"s/t", partition=0),
        ),
        await outcome(
            "A.send to a partition new to its transaction",
            a.send(events, b"zombie-2", key=b"s/t", partition=1),
        ),
        await outcome("A.commit_transaction", a.commit_transaction()),
        await outcome("A.abort_transaction", a.abort_transaction()),
        await outcome("A.begin_transaction", a.begin_transaction()),
        await outcome("A.stop", a.stop()),
    ]
    await b.stop()

    # A third owner, after a clean hand-off (B committed and is idle): the cost of InitProducerId
    # when nothing is open.
    c = producer(servers, txn_id)
    fence_idle_ms = await started(c)
    await c.stop()

    committed = [r.value for r in await read_topic(servers, events)]
    uncommitted = [
        r.value for r in await read_topic(servers, events, isolation_level="read_uncommitted")
    ]
    mine = [v for v in committed if v is not None]
    show(
        "fencing_round",
        round=n,
        init_first_holder_ms=first_ms,
        init_fencing_open_txn_ms=fence_open_ms,
        init_fencing_idle_holder_ms=fence_idle_ms,
        read_committed=sorted({v.decode() for v in mine}),
        read_uncommitted_has_aborted=sum(
            1 for v in uncommitted if v and v.startswith(b"open-by-A")
        ),
        zombie_records_visible=sum(1 for v in mine if v.startswith(b"zombie")),
        zombie_steps=steps,
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with bootstrap() as servers:
        first, fence_open, fence_idle = [], [], []
        for n in range(args.rounds):
            events = await topic(servers, "fence-events", 2)
            checkpoints = await topic(servers, "fence-checkpoints", 1, compacted=True)
            await one_round(servers, events, checkpoints, n)
        # Timing over more hand-offs, without the zombie's steps.
        events = await topic(servers, "fence-timing", 2)
        for _ in range(10):
            txn_id = unique("fence-t")
            a = producer(servers, txn_id)
            first.append(await started(a))
            await a.begin_transaction()
            await (await a.send(events, b"x", partition=0))
            b = producer(servers, txn_id)
            fence_open.append(await started(b))
            await b.begin_transaction()
            await (await b.send(events, b"y", partition=0))
            await b.commit_transaction()
            c = producer(servers, txn_id)
            fence_idle.append(await started(c))
            for p in (a, b, c):
                with anyio.move_on_after(5):
                    await p.stop()
        show(
            "init_producer_id_ms",
            first_holder=summary(first),
            fencing_an_open_transaction=summary(fence_open),
            fencing_an_idle_holder=summary(fence_idle),
        )


if __name__ == "__main__":
    anyio.run(main, backend="asyncio")
