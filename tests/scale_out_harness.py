"""Several bridge processes sharing one consumer group, and what their logs and records say.

Shared by tests/test_scale_out.py (the proof) and tests/bench_failover.py (the figures).

A :class:`Member` is ``python -m bridge run`` with the group's common environment and a port of
its own. Its log is JSON lines; :func:`log_lines` parses them (``timestamp`` ISO UTC -> ``t``,
epoch seconds). :func:`failovers` turns one SIGKILL into per-thread failover times and their
parts, from the survivors' logs (``bridge.shards.assigned``, ``bridge.shard.acquired``) and the
records' own timestamps (the producer's CreateTime: when the new owner sent them).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx

from bridge.shards import SHARDS, shard_of
from tests.bridge_harness import BridgeProcess

ALL_SHARDS = frozenset(range(SHARDS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def epoch(iso: str) -> float:
    """ISO 8601 / RFC 3339 (any fraction digits, ``Z`` or an offset) -> epoch seconds."""
    text = iso.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # fromisoformat takes at most 6 fraction digits
        digits = "".join(c for c in rest if c.isdigit())
        tail = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tail}"
    return datetime.fromisoformat(text).timestamp()


def log_lines(text: str) -> list[dict[str, Any]]:
    """The JSON lines of a bridge's output, each with ``t`` (epoch seconds) added."""
    lines = []
    for raw in text.splitlines():
        if not raw.startswith("{"):
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("timestamp"), str):
            line["t"] = epoch(line["timestamp"])
            lines.append(line)
    return lines


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def p50_p99(values: Sequence[float]) -> str:
    return (
        f"p50 {percentile(values, 50):.2f} s, p99 {percentile(values, 99):.2f} s (n={len(values)})"
    )


class Member:
    """One bridge process of the group: start, SIGKILL, SIGSTOP/SIGCONT, SIGTERM, /status."""

    def __init__(self, name: str, env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.process = BridgeProcess({**env, "BRIDGE_HTTP_PORT": str(self.port)}, self.log_path)
        self.url = f"http://127.0.0.1:{self.port}"
        self.exit_code: int | None = None

    def __repr__(self) -> str:
        return f"Member({self.name}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        proc = self.process.proc
        return proc.pid if proc is not None else None

    @property
    def alive(self) -> bool:
        proc = self.process.proc
        return proc is not None and proc.poll() is None

    def start(self) -> None:
        self.exit_code = None
        self.process.start()

    def kill(self) -> float:
        """SIGKILL; the moment it was sent (epoch seconds)."""
        at = time.time()
        self.process.kill()
        self.exit_code = -signal.SIGKILL
        return at

    def pause(self) -> float:
        assert self.pid is not None
        at = time.time()
        os.kill(self.pid, signal.SIGSTOP)
        return at

    def resume(self) -> float:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGCONT)
        return time.time()

    async def terminate(self, timeout_s: float) -> int:
        """SIGTERM and wait for the exit code."""
        self.exit_code = await anyio.to_thread.run_sync(self.process.terminate, timeout_s)
        return self.exit_code

    def stop(self) -> None:
        """Teardown: whatever state it is in (a stopped process needs SIGCONT to die cleanly)."""
        if self.alive and self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)
        self.process.stop()

    def rss_bytes(self) -> int:
        return self.process.rss_bytes() if self.alive else 0

    def lines(self) -> list[dict[str, Any]]:
        try:
            return log_lines(self.process.log_text())
        except OSError:
            return []

    def events(self, name: str, *, since: float = 0.0) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name and line["t"] >= since]

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            return await client.get(path)

    async def ready(self) -> bool:
        try:
            return (await self.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def shards(self) -> frozenset[int] | None:
        """``member.shards`` of GET /status; None when it does not answer (or says null)."""
        try:
            response = await self.get("/status?limit=1")
            shards = response.json()["member"]["shards"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        return None if shards is None else frozenset(shards)

    async def metric(self, name: str) -> float | None:
        try:
            text = (await self.get("/metrics")).text
        except httpx.HTTPError:
            return None
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        return total if found else None


async def wait_ready(members: Iterable[Member], timeout_s: float) -> None:
    members = list(members)
    with anyio.fail_after(timeout_s):
        while not all([await m.ready() for m in members]):
            for m in members:
                if not m.alive:
                    raise AssertionError(f"{m.name} exited: {m.process.log_text()[-3000:]}")
            await anyio.sleep(0.25)


@dataclass
class Ownership:
    """Each live member's shards as /status says, and what is wrong with them together."""

    by_member: dict[str, frozenset[int] | None]
    #: when (epoch seconds) this ownership was first seen (by wait_settled: the streak began)
    seen_at: float = 0.0

    @property
    def problems(self) -> list[str]:
        problems = []
        seen: dict[int, str] = {}
        for name, shards in self.by_member.items():
            if shards is None:
                problems.append(f"{name}: no shards in /status")
                continue
            for shard in sorted(shards):
                if shard in seen:
                    problems.append(f"shard {shard} owned by {seen[shard]} and {name}")
                seen[shard] = name
        unowned = sorted(ALL_SHARDS - set(seen))
        if unowned:
            problems.append(f"shards owned by nobody: {unowned}")
        return problems

    def __str__(self) -> str:
        return ", ".join(
            f"{n}={sorted(s) if s is not None else None}" for n, s in self.by_member.items()
        )


async def ownership(members: Iterable[Member]) -> Ownership:
    return Ownership({m.name: await m.shards() for m in members})


async def wait_settled(
    members: Sequence[Member], timeout_s: float, *, steady_s: float = 2.0
) -> Ownership:
    """Until the live ``members`` own every shard exactly once, the same for ``steady_s``.

    Raises AssertionError naming what was wrong at the last look."""
    last = Ownership({})
    same_since: float | None = None
    deadline = anyio.current_time() + timeout_s
    while anyio.current_time() < deadline:
        looked_at = time.time()
        now = await ownership(members)
        if not now.problems and now.by_member == last.by_member:
            if same_since is not None and time.time() - same_since >= steady_s:
                now.seen_at = same_since
                return now
        else:
            same_since = looked_at if not now.problems else None
        last = now
        await anyio.sleep(0.25)
    raise AssertionError(
        f"ownership did not settle within {timeout_s:.0f} s among "
        f"{[m.name for m in members]}: {last} -> {last.problems}"
    )


# -- failover, from the logs and the records ---------------------------------------------------


@dataclass
class ThreadFailover:
    key: str
    shard: int
    total_s: float  #: the kill -> the thread's next record (its CreateTime)
    rejoin_s: float  #: the kill -> a survivor's bridge.shards.assigned gaining the shard
    acquire_s: float  #: bridge.shard.acquired took_s: the producer fenced, checkpoints read
    reopen_s: float  #: acquired -> the next record
    event_wait_s: float  #: of reopen_s, the time the thread had no new event to send


@dataclass
class Failover:
    member: str
    killed_at: float
    shards: frozenset[int]
    threads: list[ThreadFailover] = field(default_factory=list)
    #: threads of the killed member's shards that had events after the kill but no record
    missing: list[str] = field(default_factory=list)
    #: shards of the killed member no survivor logged gaining (or acquiring) after the kill
    unclaimed: list[int] = field(default_factory=list)

    def report(self) -> str:
        t = self.threads
        lines = [
            f"failover after SIGKILL of {self.member} ({len(self.shards)} shards, "
            f"{len(t)} threads with events after the kill):",
            f"  total (kill -> next record):        {p50_p99([x.total_s for x in t])}",
            f"  session timeout + rejoin:           {p50_p99([x.rejoin_s for x in t])}",
            f"  fencing + checkpoint read (took_s): {p50_p99([x.acquire_s for x in t])}",
            f"  stream reopen (acquired -> record): {p50_p99([x.reopen_s for x in t])}",
            f"    of which no event to send yet:    {p50_p99([x.event_wait_s for x in t])}",
        ]
        if self.unclaimed:
            lines.append(f"  shards no survivor logged taking: {self.unclaimed}")
        if self.missing:
            lines.append(f"  threads with no record after the kill: {self.missing[:10]}")
        return "\n".join(lines)


def _processed_at(value: bytes) -> float | None:
    try:
        stamp = json.loads(value).get("processed_at")
    except ValueError:
        return None
    return epoch(stamp) if isinstance(stamp, str) else None


def failovers(
    member: str,
    killed_at: float,
    shards: frozenset[int],
    survivors: Iterable[Member],
    records: Iterable[Any],
    *,
    until: float = math.inf,
    active: Iterable[str] = (),
) -> Failover:
    """Per thread of ``shards`` with a record sent after ``killed_at`` (and before ``until``):
    how long until that record, and its parts from the survivors' logs. ``active``: the keys
    that had events to send after the kill; those of ``shards`` without such a record are
    listed as missing."""
    result = Failover(member, killed_at, shards)
    assigned: dict[int, float] = {}  # shard -> when a survivor was given it
    acquired: dict[int, tuple[float, float]] = {}  # shard -> (logged at, took_s)
    for survivor in survivors:
        for line in survivor.lines():
            if not killed_at <= line["t"] < until:
                continue
            if line.get("event") == "bridge.shards.assigned":
                gained = line["gained"] if "gained" in line else line.get("shards", [])
                for shard in gained:
                    if shard in shards and shard not in assigned:
                        assigned[shard] = line["t"]
            elif line.get("event") == "bridge.shard.acquired":
                shard = line.get("shard")
                if shard in shards and shard not in acquired:
                    acquired[shard] = (line["t"], float(line.get("took_s") or 0.0))
    result.unclaimed = sorted(s for s in shards if s not in assigned or s not in acquired)
    first: dict[str, Any] = {}
    for record in records:
        key = record.key.decode()
        sent = record.timestamp / 1000
        if shard_of(key.split("/", 1)[0]) not in shards or not killed_at < sent < until:
            continue
        if key not in first or sent < first[key].timestamp / 1000:
            first[key] = record
    result.missing = sorted(
        k for k in active if shard_of(k.split("/", 1)[0]) in shards and k not in first
    )
    for key, record in sorted(first.items()):
        shard = shard_of(key.split("/", 1)[0])
        sent = record.timestamp / 1000
        if shard not in assigned or shard not in acquired:
            continue
        acquired_at, took_s = acquired[shard]
        made = _processed_at(record.value) or acquired_at
        result.threads.append(
            ThreadFailover(
                key=key,
                shard=shard,
                total_s=sent - killed_at,
                rejoin_s=assigned[shard] - killed_at,
                acquire_s=took_s,
                reopen_s=sent - acquired_at,
                event_wait_s=max(0.0, min(made, sent) - acquired_at),
            )
        )
    return result


# -- transactions, from outside ----------------------------------------------------------------


async def stable_offsets(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition: (last stable offset, high watermark). LSO < HW: a transaction is open
    there, and the LSO is the first offset of the oldest open one."""
    from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: PLC0415

    from tests.kafka_broker import _partitions  # noqa: PLC0415 -- a test helper

    ends: dict[str, dict[int, int]] = {}
    partitions = await _partitions(bootstrap, topic)
    for level in ("read_committed", "read_uncommitted"):
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, isolation_level=level
        )
        try:
            with anyio.fail_after(15):
                await consumer.start()
                offsets = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await consumer.stop()
        ends[level] = {tp.partition: offset for tp, offset in offsets.items()}
    return {p: (ends["read_committed"][p], ends["read_uncommitted"][p]) for p in partitions}


def aborted(uncommitted: Iterable[Any], committed: Iterable[Any]) -> list[Any]:
    """Records a read_uncommitted consumer got that a read_committed one did not: aborted
    transactions' records (both read to the same end after every transaction was settled)."""
    visible = {(r.partition, r.offset) for r in committed}
    return [r for r in uncommitted if (r.partition, r.offset) not in visible]
