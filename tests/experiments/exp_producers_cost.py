"""What one transactional producer per owned shard costs a member: memory, start-up, CPU.

    .venv/bin/python -m tests.experiments.exp_producers_cost [--counts 1,16,32,64]

For each count K, in a fresh child process (so the memory figures are its own): start K
transactional producers at once (InitProducerId each), note the RSS and the time; then for
``--seconds`` let every producer commit one small transaction (one record to its own partition
of an events topic, one checkpoint-sized record to its own partition of a checkpoint topic)
every ``--interval-ms``, the most a busy shard does, and report the CPU the process used and the
transactions committed per second. Idle shards commit nothing, so this is the upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import anyio
from aiokafka import AIOKafkaProducer

from tests.experiments.exp_common import bootstrap, show, topic, transactional_producers


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def child(
    servers: str, events: str, checkpoints: str, count: int, args: argparse.Namespace
) -> None:
    base = rss_mib()
    producers = transactional_producers(servers, "cost", count)
    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        for p in producers:
            tg.start_soon(p.start)
    start_s = time.monotonic() - t0
    started = rss_mib()
    commits = 0
    value = b"x" * 1400

    async def busy(i: int, p: AIOKafkaProducer) -> None:
        nonlocal commits
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            async with p.transaction():
                await p.send(events, b"e", partition=i % args.partitions)
                await p.send(checkpoints, value, key=b"k", partition=i % args.partitions)
            commits += 1
            await anyio.sleep(args.interval_ms / 1000)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t1 = time.monotonic()
    async with anyio.create_task_group() as tg:
        for i, p in enumerate(producers):
            tg.start_soon(busy, i, p)
    wall = time.monotonic() - t1
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    busy_rss = rss_mib()
    for p in producers:
        await p.stop()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(
        json.dumps(
            {
                "producers": count,
                "rss_before_mib": base,
                "rss_started_mib": started,
                "rss_per_producer_kib": round((started - base) * 1024 / count, 1),
                "rss_busy_mib": busy_rss,
                "start_all_ms": round(start_s * 1000, 1),
                "commits_per_s": round(commits / wall, 1),
                "cpu_percent_of_a_core": round(100 * cpu / wall, 1),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="1,16,32,64")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--interval-ms", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=32)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        servers, events, checkpoints, count = args.child.split(",")
        anyio.run(child, servers, events, checkpoints, int(count), args, backend="asyncio")
        return

    async def setup(servers: str) -> tuple[str, str]:
        return (
            await topic(servers, "cost-events", args.partitions),
            await topic(servers, "cost-checkpoints", args.partitions, compacted=True),
        )

    with bootstrap() as servers:
        events, checkpoints = anyio.run(setup, servers, backend="asyncio")
        for count in (int(x) for x in args.counts.split(",")):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests.experiments.exp_producers_cost",
                    "--child",
                    f"{servers},{events},{checkpoints},{count}",
                    "--seconds",
                    str(args.seconds),
                    "--interval-ms",
                    str(args.interval_ms),
                    "--partitions",
                    str(args.partitions),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            show("producers_cost", **json.loads(done.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
