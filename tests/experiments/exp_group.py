"""A consumer group of bridge-like members: rebalance times, shard moves, zombies, fencing.

    .venv/bin/python -m tests.experiments.exp_group --assignor sticky --partitions 32 \
        --session-ms 6000 --heartbeat-ms 1500 [--produce] [--static] [--slow-assign-s 8]

Each member is a process of its own (``... exp_group member ...``): an aiokafka consumer in one
group, subscribed to the ownership topic, every assigned partition paused (it carries the
shard, not data to read) and one ``getmany`` always pending so that the member stays in the
group however long it is busy. With ``--produce`` every owned shard also gets what the design
gives it: a transactional producer with ``transactional.id = <group>-<shard>``, started (which
fences the previous owner) when the shard is assigned, committing one record
``{member, shard, incarnation, seq}`` every 100 ms to the shard's partition of an output topic;
fenced, it drops the shard and takes it back only from a later assignment.

The driver (this module without ``member``) runs a seeded schedule on 3 members: SIGKILL one,
a new member joins, SIGSTOP one past the session timeout then SIGCONT, SIGTERM one (graceful
leave). After each step it waits until every shard is owned by exactly one live member of one
generation, and prints: the time that took, split into detection (until the first survivor
saw the rebalance) and the rebalance itself; how many shards moved between survivors (the
assignor's stickiness); what the zombie saw after SIGCONT. With ``--produce`` it finally reads
the output topic read_committed and checks, per shard, that each owner's run of records is
contiguous: a zombie's write after the next owner started would show up as a run resumed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import KafkaError, ProducerFenced

from tests.experiments.exp_common import bootstrap, show, summary, topic, unique
from tests.kafka_broker import KafkaBroker, read_topic

ASSIGNORS = {
    "roundrobin": RoundRobinPartitionAssignor,
    "range": RangePartitionAssignor,
    "sticky": StickyPartitionAssignor,
}


# -- a member -------------------------------------------------------------------------------


def emit(ev: str, **fields: Any) -> None:
    print(json.dumps({"ev": ev, "t": time.time(), **fields}, default=str), flush=True)


class _JsonLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        error = None
        if record.exc_info and record.exc_info[1] is not None:
            error = repr(record.exc_info[1])[:300]
        emit(
            "log",
            logger=record.name,
            level=record.levelname,
            msg=record.getMessage()[:300],
            error=error,
        )


@dataclass
class Shard:
    partition: int
    incarnation: int
    stop: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    fenced: bool = False


class Member(ConsumerRebalanceListener):
    def __init__(self, args: argparse.Namespace, tg: anyio.abc.TaskGroup) -> None:
        self.args = args
        self.tg = tg
        self.consumer: AIOKafkaConsumer | None = None
        self.shards: dict[int, Shard] = {}
        self.incarnations = 0
        #: The generation of the last assignment: one that does not follow it directly means
        #: this member missed rebalances (it was out of the group, a zombie) and every shard it
        #: still runs may have had another owner meanwhile.
        self.last_generation: int | None = None

    def generation(self) -> int:
        assert self.consumer is not None
        return int(self.consumer._coordinator.generation)  # aiokafka internals

    async def on_partitions_revoked(self, revoked: Any) -> None:
        emit("revoked", partitions=sorted(tp.partition for tp in revoked))
        # Eager protocol: everything is revoked on every rebalance. Shards keep running until
        # the new assignment says which ones go (fencing covers the moment in between).

    async def on_partitions_assigned(self, assigned: Any) -> None:
        t0 = time.monotonic()
        assert self.consumer is not None
        self.consumer.pause(*assigned)  # the shard is the point, not the records
        generation = self.generation()
        gap = self.last_generation is not None and generation != self.last_generation + 1
        self.last_generation = generation
        mine = {tp.partition for tp in assigned}
        emit("assigned", generation=generation, partitions=sorted(mine), gap=gap)
        if self.args.slow_assign_s:
            await anyio.sleep(self.args.slow_assign_s)  # what heavy work in here would do
        if not self.args.produce:
            return
        going = [p for p in self.shards if p not in mine or gap]
        async with anyio.create_task_group() as tg:  # released together, within one bound
            for p in going:
                tg.start_soon(self.release, p)
        for p in sorted(mine):
            if p not in self.shards:
                self.start_shard(p)
        emit("assign_callback_done", took_ms=round((time.monotonic() - t0) * 1000, 1))

    def start_shard(self, p: int) -> None:
        self.incarnations += 1
        shard = Shard(p, self.incarnations)
        self.shards[p] = shard
        self.tg.start_soon(self.run_shard, shard)

    async def release(self, p: int) -> None:
        shard = self.shards.pop(p, None)
        if shard is None:
            return  # fenced meanwhile: already gone
        t0 = time.monotonic()
        shard.stop.set()
        with anyio.move_on_after(self.args.revoke_bound_s):
            await shard.done.wait()
        if not shard.done.is_set():
            shard.scope.cancel()  # past the bound: whatever is open is aborted (or fenced)
            await shard.done.wait()
        emit(
            "released",
            partition=p,
            clean=not shard.scope.cancel_called,
            took_ms=round((time.monotonic() - t0) * 1000, 1),
        )

    async def run_shard(self, shard: Shard) -> None:
        with shard.scope:
            await self._run_shard(shard)

    async def _run_shard(self, shard: Shard) -> None:
        p, args = shard.partition, self.args
        producer = AIOKafkaProducer(
            bootstrap_servers=args.bootstrap,
            transactional_id=f"{args.group}-{p}",
            enable_idempotence=True,
            acks="all",
        )
        try:
            t0 = time.monotonic()
            await producer.start()  # InitProducerId: fences the previous owner
            emit(
                "acquired",
                partition=p,
                incarnation=shard.incarnation,
                init_ms=round((time.monotonic() - t0) * 1000, 1),
            )
            seq = 0
            while not shard.stop.is_set():
                try:
                    await producer.begin_transaction()
                    value = {
                        "member": args.name,
                        "pid": os.getpid(),
                        "shard": p,
                        "inc": shard.incarnation,
                        "seq": seq,
                        "t": time.time(),
                    }
                    ack = await producer.send(
                        args.out_topic,
                        json.dumps(value).encode(),
                        key=f"shard-{p}".encode(),
                        partition=p,
                    )
                    await ack
                    await producer.commit_transaction()
                    if seq == 0:
                        emit("first_commit", partition=p, incarnation=shard.incarnation)
                    seq += 1
                except (ProducerFenced, AssertionError) as exc:
                    # AssertionError: aiokafka's state machine after a fatal error.
                    emit(
                        "fenced",
                        partition=p,
                        incarnation=shard.incarnation,
                        seq=seq,
                        error=type(exc).__name__,
                    )
                    shard.fenced = True
                    break
                except KafkaError as exc:
                    emit("txn_error", partition=p, error=repr(exc)[:200])
                    with contextlib.suppress(Exception):
                        await producer.abort_transaction()
                await anyio.sleep(0.1)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await producer.stop()
            shard.done.set()
            if shard.fenced and self.shards.get(p) is shard:
                # Someone else owns it now; only a later assignment gives it back.
                del self.shards[p]

    async def poll(self, scope: anyio.CancelScope) -> None:
        assert self.consumer is not None
        with scope:
            while True:
                # One getmany always pending: aiokafka counts a member idle (and leaves the
                # group after max_poll_interval_ms) only while none is.
                await self.consumer.getmany(timeout_ms=1000)


async def run_member(args: argparse.Namespace) -> None:
    handler = _JsonLog()
    for name, level in (
        ("aiokafka.consumer.group_coordinator", logging.INFO),
        ("aiokafka", logging.WARNING),
    ):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False
    assignor = ASSIGNORS[args.assignor]
    async with anyio.create_task_group() as tg:
        member = Member(args, tg)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=args.bootstrap,
            group_id=args.group,
            client_id=args.name,
            group_instance_id=args.name if args.static else None,
            session_timeout_ms=args.session_ms,
            heartbeat_interval_ms=args.heartbeat_ms,
            rebalance_timeout_ms=args.rebalance_ms or args.session_ms,
            max_poll_interval_ms=args.max_poll_ms,
            partition_assignment_strategy=(assignor,),
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        member.consumer = consumer
        await consumer.start()
        consumer.subscribe([args.own_topic], listener=member)
        emit("started", pid=os.getpid())
        polling = anyio.CancelScope()
        tg.start_soon(member.poll, polling)
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                break
        t0 = time.monotonic()
        for p in list(member.shards):
            await member.release(p)
        polling.cancel()
        await consumer.stop()  # LeaveGroup (dynamic members only)
        emit("stopped", took_ms=round((time.monotonic() - t0) * 1000, 1))
        tg.cancel_scope.cancel()


# -- the driver -----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    process: anyio.abc.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    assignment: tuple[int, frozenset[int]] | None = None
    alive: bool = True
    stopped: bool = False  # SIGSTOPped


class Driver:
    def __init__(self, args: argparse.Namespace, servers: str, own: str, out: str) -> None:
        self.args = args
        self.servers = servers
        self.own = own
        self.out = out
        self.procs: dict[str, Proc] = {}
        self.changed = anyio.Event()
        self.count = 0

    async def spawn(
        self, tg: anyio.abc.TaskGroup, *, slow: bool = False, name: str | None = None
    ) -> Proc:
        if name is None:
            name = f"m{self.count}"
            self.count += 1
        a = self.args
        cmd = [
            sys.executable,
            "-m",
            "tests.experiments.exp_group",
            "member",
            "--bootstrap",
            self.servers,
            "--group",
            a.group,
            "--own-topic",
            self.own,
            "--out-topic",
            self.out,
            "--name",
            name,
            "--assignor",
            a.assignor,
            "--session-ms",
            str(a.session_ms),
            "--heartbeat-ms",
            str(a.heartbeat_ms),
            "--rebalance-ms",
            str(a.rebalance_ms),
            "--max-poll-ms",
            str(a.max_poll_ms),
            "--revoke-bound-s",
            str(a.revoke_bound_s),
        ]
        if a.produce:
            cmd.append("--produce")
        if a.static:
            cmd.append("--static")
        if slow and a.slow_assign_s:
            cmd += ["--slow-assign-s", str(a.slow_assign_s)]
        process = await anyio.open_process(cmd, stderr=None)
        proc = Proc(name, process)
        if name in self.procs:  # a restart under the same name (static membership)
            self.procs[f"{name}-old-{self.count}"] = self.procs.pop(name)
            self.count += 1
        self.procs[name] = proc
        tg.start_soon(self.read, proc)
        return proc

    async def read(self, proc: Proc) -> None:
        assert proc.process.stdout is not None
        buffer = b""
        async for chunk in proc.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                proc.events.append(event)
                if event["ev"] == "assigned":
                    proc.assignment = (event["generation"], frozenset(event["partitions"]))
                elif event["ev"] == "revoked":
                    proc.assignment = None
                self.changed.set()

    def live(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.alive and not p.stopped]

    def stable(self, members: list[Proc]) -> int | None:
        """The generation if ``members`` own every shard, each once, all in that generation."""
        assignments = [p.assignment for p in members]
        if any(a is None for a in assignments):
            return None
        generations = {a[0] for a in assignments if a is not None}
        if len(generations) != 1:
            return None
        owned = [x for a in assignments if a is not None for x in a[1]]
        if len(owned) != len(set(owned)) or set(owned) != set(range(self.args.partitions)):
            return None
        return generations.pop()

    async def wait_stable(self, members: list[Proc], timeout_s: float = 120) -> int:
        with anyio.fail_after(timeout_s):
            while (generation := self.stable(members)) is None:
                self.changed = anyio.Event()
                await self.changed.wait()
        return generation

    def owners(self) -> dict[int, str]:
        """Who owns what now, by the live members' last assignments (a dead or stopped
        member's last assignment is stale)."""
        return {x: p.name for p in self.live() if p.assignment is not None for x in p.assignment[1]}

    def timing(self, members: list[Proc], generation: int, t0: float) -> dict[str, Any]:
        assigned = [
            e["t"]
            for p in members
            for e in p.events
            if e["ev"] == "assigned" and e["generation"] == generation
        ]
        revoked = [
            e["t"] for p in members for e in p.events if e["ev"] == "revoked" and e["t"] >= t0
        ]
        first_revoke = min(revoked) if revoked else None
        done = max(assigned)
        return {
            "stable_after_s": round(done - t0, 2),
            "detection_s": round(first_revoke - t0, 2) if first_revoke else None,
            "rebalance_s": round(done - first_revoke, 2) if first_revoke else None,
        }

    def moves(self, before: dict[int, str], survivors: set[str]) -> dict[str, int]:
        after = self.owners()
        kept_possible = [x for x, owner in before.items() if owner in survivors]
        moved = [x for x in kept_possible if after.get(x) != before[x]]
        return {"survivor_shards": len(kept_possible), "moved_between_survivors": len(moved)}

    def failover(self, t0: float, shards: set[int], members: list[Proc]) -> dict[str, Any]:
        """Per shard the victim owned: when a new owner acquired it and first committed."""
        firsts: dict[int, float] = {}
        acquired: dict[int, float] = {}
        inits: list[float] = []
        for p in members:
            for e in p.events:
                if e["t"] < t0 or e.get("partition") not in shards:
                    continue
                if e["ev"] == "first_commit":
                    firsts.setdefault(e["partition"], e["t"])
                elif e["ev"] == "acquired":
                    acquired.setdefault(e["partition"], e["t"])
                    inits.append(e["init_ms"])
        times = [(firsts[s] - t0) * 1000 for s in shards if s in firsts]
        return {
            "shards": len(shards),
            "resumed": len(times),
            "first_commit_after_ms": summary(times) if times else None,
            "init_producer_ms": summary(inits) if inits else None,
        }

    async def step(
        self, label: str, t0: float, members: list[Proc], before: dict[int, str], lost: set[int]
    ) -> None:
        generation = await self.wait_stable(members)
        await anyio.sleep(1.5 if self.args.produce else 0.2)  # let first commits land
        result: dict[str, Any] = {
            "step": label,
            "generation": generation,
            **self.timing(members, generation, t0),
            **self.moves(before, {p.name for p in members}),
        }
        if self.args.produce and lost:
            result["failover"] = self.failover(t0, lost, members)
        show("step", **result)


async def drive(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    with bootstrap() as servers:
        own = await topic(servers, "own", args.partitions, compacted=True)
        out = await topic(servers, "out", args.partitions)
        args.group = unique("group")
        driver = Driver(args, servers, own, out)
        show("config", **{k: v for k, v in vars(args).items() if k != "command"})
        async with anyio.create_task_group() as tg:
            t0 = time.time()
            for _ in range(3):
                await driver.spawn(tg)
            generation = await driver.wait_stable(driver.live())
            show("start", generation=generation, **driver.timing(driver.live(), generation, t0))
            quiet_gen = generation
            await anyio.sleep(args.quiet_s)
            extra = driver.stable(driver.live())
            show("quiet", seconds=args.quiet_s, generations_meanwhile=(extra or 0) - quiet_gen)

            if args.kill_rounds:
                await kill_rounds(driver, tg, rng)
                tg.cancel_scope.cancel()
                return

            # SIGKILL
            victim = rng.choice(driver.live())
            before, lost = (
                driver.owners(),
                set(victim.assignment[1]) if victim.assignment else set(),
            )
            t0 = time.time()
            victim.process.send_signal(signal.SIGKILL)
            victim.alive = False
            await driver.step("sigkill", t0, driver.live(), before, lost)

            # join (optionally one whose assign callback is slow)
            before = driver.owners()
            t0 = time.time()
            joiner = await driver.spawn(tg, slow=True)
            if args.slow_assign_s:
                # Does the group ever settle, and what does the slow member see?
                with anyio.move_on_after(60):
                    await driver.step("join_slow_assign", t0, driver.live(), before, set())
                await anyio.sleep(30)  # what follows a callback longer than the session?
                show(
                    "slow_member_events",
                    events=[
                        {**e, "t": round(e["t"] - t0, 3)}
                        for e in joiner.events
                        if e["ev"] in ("assigned", "revoked", "log")
                    ][:40],
                )
                show(
                    "generations_seen_by_others",
                    generations=sorted(
                        {
                            e["generation"]
                            for p in driver.live()
                            if p is not joiner
                            for e in p.events
                            if e["ev"] == "assigned" and e["t"] >= t0
                        }
                    ),
                )
                tg.cancel_scope.cancel()
                return
            await driver.step("join", t0, driver.live(), before, set())

            # SIGSTOP past the session timeout, then SIGCONT
            zombie = rng.choice(driver.live())
            before = driver.owners()
            lost = set(zombie.assignment[1]) if zombie.assignment else set()
            t0 = time.time()
            zombie.process.send_signal(signal.SIGSTOP)
            zombie.stopped = True
            await driver.step("sigstop", t0, driver.live(), before, lost)
            await anyio.sleep(
                max(0.0, args.session_ms / 1000 + args.stop_extra_s - (time.time() - t0))
            )
            seen = len(zombie.events)
            before = driver.owners()
            t1 = time.time()
            zombie.process.send_signal(signal.SIGCONT)
            zombie.stopped = False
            await driver.step("sigcont", t1, driver.live(), before, set())
            show(
                "zombie_after_sigcont",
                stopped_s=round(t1 - t0, 2),
                events=[
                    {**e, "t": round(e["t"] - t1, 3)}
                    for e in zombie.events[seen:]
                    if e["ev"] != "first_commit"
                ][:40],
            )

            # SIGTERM: a graceful leave
            leaver = rng.choice(driver.live())
            before = driver.owners()
            lost = set(leaver.assignment[1]) if leaver.assignment else set()
            t0 = time.time()
            leaver.process.send_signal(signal.SIGTERM)
            leaver.alive = False
            await driver.step("sigterm", t0, driver.live(), before, lost)
            show(
                "leaver_events",
                events=[e for e in leaver.events if e["ev"] in ("released", "stopped", "log")][
                    -10:
                ],
            )

            if args.broker_dir:
                # The broker stops cleanly, stays down a few seconds, and comes back.
                port = int(servers.rsplit(":", 1)[1])
                broker = KafkaBroker(Path(args.broker_dir), port, env={"KAFKA_OWNER_PID": ""})
                before = driver.owners()
                t0 = time.time()
                await broker.astop()
                await anyio.sleep(3)
                await broker.astart()
                show("broker_back", after_s=round(time.time() - t0, 2))
                await anyio.sleep(args.session_ms / 1000 + 2)
                await driver.step("broker_restart", t0, driver.live(), before, set())

            # A restart: SIGKILL and start again at once under the same name (what a rolling
            # update or a crash-looping pod does); static membership is made for this.
            bounced = rng.choice(driver.live())
            before = driver.owners()
            lost = set(bounced.assignment[1]) if bounced.assignment else set()
            t0 = time.time()
            bounced.process.send_signal(signal.SIGKILL)
            bounced.alive = False
            await driver.spawn(tg, name=bounced.name)
            # Dynamic members: the new one joins at once, the dead one's shards wait for its
            # session to expire. Either way: settled once nobody dead owns anything.
            await anyio.sleep(args.session_ms / 1000 + 2)
            await driver.step("restart_same_name", t0, driver.live(), before, lost)

            for p in driver.live():
                p.process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(30):
                for p in driver.procs.values():
                    if p.alive:
                        await p.process.wait()
            tg.cancel_scope.cancel()
        if args.events_file:
            with open(args.events_file, "w") as f:
                for p in driver.procs.values():
                    for e in p.events:
                        f.write(json.dumps({"member": p.name, **e}) + "\n")
        if args.produce:
            await verify(servers, out, args.partitions)


async def kill_rounds(driver: Driver, tg: anyio.abc.TaskGroup, rng: random.Random) -> None:
    """SIGKILL a random member at a random moment of its heartbeat cycle, again and again: the
    spread of failover (SIGKILL to the first commit of each shard it owned) and its parts."""
    args = driver.args
    stable, detect, firsts = [], [], []
    for n in range(args.kill_rounds):
        await anyio.sleep(1 + rng.uniform(0, 2 * args.heartbeat_ms / 1000))
        victim = rng.choice(driver.live())
        lost = set(victim.assignment[1]) if victim.assignment else set()
        t0 = time.time()
        victim.process.send_signal(signal.SIGKILL)
        victim.alive = False
        members = driver.live()
        generation = await driver.wait_stable(members)
        await anyio.sleep(1.0)
        timing = driver.timing(members, generation, t0)
        stable.append(timing["stable_after_s"] * 1000)
        detect.append((timing["detection_s"] or 0) * 1000)
        if args.produce:
            for p in members:
                for e in p.events:
                    if e["ev"] == "first_commit" and e["t"] >= t0 and e["partition"] in lost:
                        firsts.append((e["t"] - t0) * 1000)
        show("kill_round", round=n, **timing)
        await driver.spawn(tg)
        await driver.wait_stable(driver.live())
    show(
        "kill_rounds",
        rounds=args.kill_rounds,
        detection_ms=summary(detect),
        all_owned_again_ms=summary(stable),
        shard_first_commit_ms=summary(firsts) if firsts else None,
    )


async def verify(servers: str, out: str, partitions: int) -> None:
    """Per shard, each (member, incarnation)'s records form one contiguous run in order."""
    records = await read_topic(servers, out, timeout_s=120)
    uncommitted = await read_topic(servers, out, isolation_level="read_uncommitted", timeout_s=120)
    runs: dict[int, list[tuple[str, int, int]]] = {p: [] for p in range(partitions)}
    stamps: dict[int, list[float]] = {p: [] for p in range(partitions)}
    last_seq: dict[tuple[str, int, int], int] = {}
    violations: list[str] = []
    for r in records:
        v = json.loads(r.value)
        owner = (v["member"], v["pid"], v["inc"])
        stamps[v["shard"]].append(v["t"])
        shard_runs = runs[v["shard"]]
        if not shard_runs or shard_runs[-1] != owner:
            if owner in shard_runs:
                violations.append(f"shard {v['shard']}: {owner} resumed after another owner")
            shard_runs.append(owner)
        if owner in last_seq and v["seq"] != last_seq[owner] + 1:
            violations.append(f"shard {v['shard']}: {owner} seq {last_seq[owner]} -> {v['seq']}")
        last_seq[owner] = v["seq"]
    show(
        "verify",
        committed_records=len(records),
        aborted_or_open_records=len(uncommitted) - len(records),
        owner_runs_per_shard=summary([float(len(x)) for x in runs.values()]),
        # The longest time each shard went without a committed record (its worst outage).
        longest_gap_ms=summary(
            [
                max((b - a for a, b in itertools.pairwise(t)), default=0) * 1000
                for t in stamps.values()
            ]
        ),
        violations=violations[:20],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", nargs="?", default="drive", choices=["drive", "member"])
    parser.add_argument("--assignor", choices=sorted(ASSIGNORS), default="roundrobin")
    parser.add_argument("--partitions", type=int, default=32)
    parser.add_argument("--session-ms", type=int, default=6000)
    parser.add_argument("--heartbeat-ms", type=int, default=1500)
    parser.add_argument("--rebalance-ms", type=int, default=0, help="0: the session timeout")
    parser.add_argument("--max-poll-ms", type=int, default=10000)
    parser.add_argument("--revoke-bound-s", type=float, default=2.0)
    parser.add_argument("--produce", action="store_true")
    parser.add_argument("--static", action="store_true")
    parser.add_argument("--slow-assign-s", type=float, default=0)
    parser.add_argument("--stop-extra-s", type=float, default=4)
    parser.add_argument("--quiet-s", type=float, default=15)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--broker-dir", default="", help="restart $EXP_BOOTSTRAP's broker too")
    parser.add_argument("--kill-rounds", type=int, default=0, help="only SIGKILLs, this many")
    parser.add_argument("--events-file", default="", help="every member event, as JSON lines")
    # member only
    parser.add_argument("--bootstrap", default="")
    parser.add_argument("--group", default="")
    parser.add_argument("--own-topic", default="")
    parser.add_argument("--out-topic", default="")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    if args.command == "member":
        asyncio.run(run_member(args))
    else:
        anyio.run(drive, args, backend="asyncio")


if __name__ == "__main__":
    main()
