"""Scale-out figures (issue 10): ``python -m tests.bench_failover [--quick] [--parts ...]``.

Two parts, each running bridge processes (``python -m bridge run``) as members of one group
on the broker given, against the simulator in a child process:

failover
    3 members under a steady load (60 threads, 20 sessions of 3, 2 events/s each, exactly_once).
    A member is SIGKILLed (each in turn), the survivors take its shards, it is restarted, and
    again: ``--failover-kills`` times (5; 2 with ``--quick``). For every thread of the killed
    member's shards that had a record after the kill: the time from the kill to that record
    (its CreateTime, read back read_committed), and its parts: session timeout + rejoin (the
    kill -> the survivor's ``bridge.shards.assigned`` gaining the shard), fencing + checkpoint
    read (``bridge.shard.acquired`` ``took_s``), stream reopen (acquired -> the record; with
    how much of it the thread simply had no new event). p50/p99 over every thread of every
    kill, and per kill; the target (issue 10) is p99 <= 15 s.
idle_members
    10,000 idle threads (running, heartbeats only; ``--idle-threads``, 1,000 with ``--quick``)
    across 4 members: once they are all open, RSS per member; then one member is SIGTERMed:
    its drain, the rebalance (SIGTERM -> the 3 survivors own every shard, from their /status),
    the survivors' assignment and acquisition from their logs, and until the survivors have as
    many streams open as the 4 had (``qoder_bridge_open_streams``), and their RSS after.

Not timed tests: figures, printed, with the machine's load. From tests/bench.py, as the other
parts: ``FailoverBench(args, broker.bootstrap, workdir)``, its :data:`PARTS` (name -> method),
``report()`` at the end (``args`` needs only ``quick``; the other options have defaults).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from tests.bench import idle_scenario, say
from tests.bench_cost import SimChild
from tests.bridge_harness import bridge_env
from tests.kafka_broker import KafkaBroker, KafkaTopics, fetch_jars, read_topic
from tests.scale_out_harness import (
    Failover,
    Member,
    failovers,
    p50_p99,
    percentile,
    wait_ready,
    wait_settled,
)

#: Settings every member of these runs gets (the rest: bridge_env's test settings for the
#: failover part, the bridge's defaults for the idle part, except these).
IDLE_SETTINGS = {
    "BRIDGE_API_MAX_RPS": "5000",  # the API is not what is measured
    "BRIDGE_MAX_STREAMS": "12000",  # one member may hold every stream
    "BRIDGE_HTTP_HOST": "127.0.0.1",
    "BRIDGE_LOG_FORMAT": "json",
    "BRIDGE_LOG_LEVEL": "info",
}
STEADY_THREADS = (20, 3)  # sessions x threads
STEADY_RATE = 2.0  # events/s per thread


def steady_scenario(seconds: float) -> dict[str, Any]:
    sessions, threads = STEADY_THREADS
    spec = {"events": int(STEADY_RATE * seconds), "rate": STEADY_RATE}
    return {
        "name": f"failover-steady-{uuid.uuid4().hex[:6]}",
        "seed": 12,
        "heartbeat_interval_s": 1.0,
        "sessions": [{"count": sessions, "coordinator": spec, "children": [spec] * (threads - 1)}],
    }


@dataclass
class IdleRun:
    threads: int
    opened: float = math.nan  # streams open across the members before the leave
    open_s: float = math.nan
    rss_before: dict[str, int] = field(default_factory=dict)
    drain_s: float = math.nan
    exit_code: int | None = None
    settled_s: float = math.nan  # SIGTERM -> the survivors own every shard
    assigned_s: float = math.nan  # SIGTERM -> the last survivor's bridge.shards.assigned
    acquire: list[float] = field(default_factory=list)  # took_s of the shards gained
    reopened_s: float = math.nan  # SIGTERM -> the survivors hold as many streams
    reopened: float = math.nan
    rss_after: dict[str, int] = field(default_factory=dict)
    note: str = ""


class FailoverBench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, workdir: Path) -> None:
        self.args = args
        self.bootstrap = bootstrap
        self.workdir = workdir
        quick = bool(getattr(args, "quick", False))
        self.kills = getattr(args, "failover_kills", None) or (2 if quick else 5)
        self.idle_threads = getattr(args, "idle_threads", None) or (1_000 if quick else 10_000)
        self.failovers: list[Failover] = []
        self.idle: IdleRun | None = None
        self.notes: list[str] = []

    # -- failover ---------------------------------------------------------------------------

    async def run_failover(self) -> None:
        say(f"\nfailover: 3 members, {math.prod(STEADY_THREADS)} threads at {STEADY_RATE:g}/s,"
            f" {self.kills} x SIGKILL")  # fmt: skip
        sim = SimChild(steady_scenario(60 + 45 * self.kills), self.workdir)
        topics = KafkaTopics.unique("bench-failover")
        await sim.started()
        env = bridge_env(
            sim.url, self.bootstrap, topics, BRIDGE_GROUP_ID=f"{topics.transactional_id}.group"
        )
        members = [Member(f"failover-m{i}", env, self.workdir) for i in range(3)]
        kills: list[tuple[Member, float, frozenset[int], float]] = []
        try:
            members[0].start()
            await wait_ready(members[:1], 120)
            for m in members[1:]:
                m.start()
            await wait_ready(members, 120)
            await wait_settled(members, 120)
            for i in range(self.kills):
                await anyio.sleep(5)  # steady flow again
                victim = members[i % len(members)]
                shards = await victim.shards() or frozenset()
                killed_at = victim.kill()
                survivors = [m for m in members if m is not victim]
                settled = await wait_settled(survivors, 120)
                say(f"  kill {i + 1}: {victim.name} ({len(shards)} shards); survivors own every"
                    f" shard {settled.seen_at - killed_at:.1f} s after")  # fmt: skip
                await anyio.sleep(5)  # the streams reopen and flow
                restarted_at = time.time()
                victim.start()
                await wait_ready([victim], 120)
                await wait_settled(members, 120)
                kills.append((victim, killed_at, shards, restarted_at))
            records = await read_topic(self.bootstrap, topics.events, timeout_s=120)
        finally:
            for m in members:
                m.stop()
            await sim.stop()
        for victim, killed_at, shards, restarted_at in kills:
            others = [m for m in members if m is not victim]
            result = failovers(victim.name, killed_at, shards, others, records, until=restarted_at)
            self.failovers.append(result)
            say(result.report())

    # -- idle members -----------------------------------------------------------------------

    async def run_idle_members(self) -> None:
        run = IdleRun(self.idle_threads)
        self.idle = run
        say(f"\nidle_members: {run.threads:,} idle threads across 4 members, then one leaves")
        sim = SimChild(idle_scenario(run.threads), self.workdir)
        topics = KafkaTopics.unique("bench-idle-members")
        await sim.started()
        env = bridge_env(sim.url, self.bootstrap, topics, **IDLE_SETTINGS)
        for name in ("BRIDGE_POLL_INTERVAL_S", "BRIDGE_STALL_TIMEOUT_S", "BRIDGE_BACKOFF_INITIAL_S",
                     "BRIDGE_BACKOFF_MAX_S", "BRIDGE_TOPIC_PARTITIONS"):  # fmt: skip
            env.pop(name)  # the bridge's defaults
        env["BRIDGE_GROUP_ID"] = f"{topics.transactional_id}.group"
        members = [Member(f"idle-m{i}", env, self.workdir) for i in range(4)]
        bound = 600.0 if run.threads > 2_000 else 180.0
        try:
            members[0].start()
            await wait_ready(members[:1], 120)
            for m in members[1:]:
                m.start()
            await wait_ready(members, 180)
            await wait_settled(members, 180)
            began = time.monotonic()
            with anyio.move_on_after(bound):
                while True:
                    run.opened = await _open_streams(members)
                    if run.opened >= run.threads:
                        break
                    await anyio.sleep(1)
            run.open_s = time.monotonic() - began
            if run.opened < run.threads:
                run.note = (
                    f"only {run.opened:,.0f} of {run.threads:,} streams opened in {bound:.0f} s"
                )
            await anyio.sleep(5)  # settle
            run.rss_before = {m.name: m.rss_bytes() for m in members}
            rss = ", ".join(f"{n} {v / 2**20:.0f} MiB" for n, v in run.rss_before.items())
            say(f"  {run.opened:,.0f} streams open after {run.open_s:.0f} s; RSS {rss}")
            leaver, survivors = members[-1], members[:-1]
            sent_at = time.time()
            run.exit_code = await leaver.terminate(120)
            run.drain_s = time.time() - sent_at
            settled = await wait_settled(survivors, bound, steady_s=1.0)
            run.settled_s = settled.seen_at - sent_at
            assigned = [
                line["t"]
                for m in survivors
                for line in m.events("bridge.shards.assigned", since=sent_at)[:1]
            ]
            run.assigned_s = max(assigned) - sent_at if assigned else math.nan
            run.acquire = [
                float(line.get("took_s") or 0)
                for m in survivors
                for line in m.events("bridge.shard.acquired", since=sent_at)
            ]
            with anyio.move_on_after(bound):
                while True:
                    run.reopened = await _open_streams(survivors)
                    if run.reopened >= run.opened:
                        break
                    await anyio.sleep(0.5)
            run.reopened_s = time.time() - sent_at
            run.rss_after = {m.name: m.rss_bytes() for m in survivors}
        finally:
            for m in members:
                m.stop()
            await sim.stop()
        say(self._idle_lines())

    def _idle_lines(self) -> str:
        run = self.idle
        if run is None:
            return ""
        per = [v / 2**20 for v in run.rss_before.values()]
        lines = [
            f"idle members: {run.threads:,} idle threads, 4 members -> 3",
            f"  RSS per member with {run.opened:,.0f} streams open: "
            + ", ".join(f"{v:.0f}" for v in per)
            + f" MiB (mean {sum(per) / max(1, len(per)):.0f})",
            f"  one member SIGTERMed: exit {run.exit_code}, drained in {run.drain_s:.1f} s",
            f"  rebalance: survivors own every shard {run.settled_s:.1f} s after SIGTERM; last "
            f"survivor assigned at {run.assigned_s:.1f} s; shard acquisition took_s "
            f"{p50_p99(run.acquire)}",
            f"  streams back to {run.reopened:,.0f} of {run.opened:,.0f} "
            f"{run.reopened_s:.1f} s after SIGTERM; RSS after: "
            + ", ".join(f"{v / 2**20:.0f}" for v in run.rss_after.values())
            + " MiB",
        ]
        if run.note:
            lines.append(f"  note: {run.note}")
        return "\n".join(lines)

    # -- report -----------------------------------------------------------------------------

    def report(self) -> None:
        if self.failovers:
            threads = [t for f in self.failovers for t in f.threads]
            p99 = percentile([t.total_s for t in threads], 99)
            say(f"\nfailover over {len(self.failovers)} SIGKILLs ({len(threads)} threads):")
            say(f"  total (kill -> next record):        {p50_p99([t.total_s for t in threads])}"
                f"  target p99 <= 15 s: {'met' if p99 <= 15 else 'NOT met'}")  # fmt: skip
            say(f"  session timeout + rejoin:           {p50_p99([t.rejoin_s for t in threads])}")
            say(f"  fencing + checkpoint read (took_s): {p50_p99([t.acquire_s for t in threads])}")
            say(f"  stream reopen (acquired -> record): {p50_p99([t.reopen_s for t in threads])}")
            say(f"    of which no event to send yet:    "
                f"{p50_p99([t.event_wait_s for t in threads])}")  # fmt: skip
            unclaimed = [s for f in self.failovers for s in f.unclaimed]
            if unclaimed:
                say(f"  shards no survivor logged taking after a kill: {unclaimed}")
        if self.idle is not None:
            say("\n" + self._idle_lines())
        for note in self.notes:
            say(note)


async def _open_streams(members: list[Member]) -> float:
    total = 0.0
    for m in members:
        total += await m.metric("qoder_bridge_open_streams") or 0.0
    return total


PARTS: dict[str, Callable[[FailoverBench], Any]] = {
    "failover": FailoverBench.run_failover,
    "idle_members": FailoverBench.run_idle_members,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_failover", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default=",".join(PARTS), type=lambda v: v.split(","))
    parser.add_argument("--failover-kills", type=int)
    parser.add_argument("--idle-threads", type=int)
    parser.add_argument("--logs", type=Path, help="keep the members' logs here")
    args = parser.parse_args(argv)
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    import resource  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="qoder-bench-failover-") as tmp:
        workdir = args.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        say(f"scale-out benchmark: {', '.join(args.parts)}; {os.cpu_count()} cores, load "
            f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")  # fmt: skip
        fetch_jars()
        broker = KafkaBroker(Path(tmp) / "kafka")
        broker.start()
        bench = FailoverBench(args, broker.bootstrap, workdir)

        async def run() -> None:
            for name in args.parts:
                began = time.monotonic()
                await PARTS[name](bench)
                say(f"  ({name} took {time.monotonic() - began:.0f} s)")

        try:
            anyio.run(run)
        finally:
            import tests.bench_cost as bench_cost  # noqa: PLC0415

            for child in bench_cost._CHILDREN:
                if child.poll() is None:
                    child.send_signal(signal.SIGKILL)
                    child.wait(10)
            broker.stop()
        bench.report()
        say(f"load at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
