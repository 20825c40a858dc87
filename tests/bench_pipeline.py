"""The bridge's data path against what a producer alone costs: ``--parts pipeline``.

Threads of pre-generated (``instant``) events of ~300 bytes, 50 per thread (the coordinators
of the 40-thread sessions have more), read from the simulator and published to Kafka by, in
turn, with the same producer settings (``bridge.kafka_conn.producer_tuning_kwargs`` of the
bridge's defaults, ``acks=all``, idempotent):

- the bridge (``python -m bridge run``, the API budget lifted so that only the pipeline counts);
- the plain producer: a child process that sends the very records the bridge wrote (keys,
  values, headers) with ``AIOKafkaProducer.send`` and waits for every acknowledgement, aiokafka's
  own partitioner; with ``exactly_once`` also a transactional one committing every 100 ms;
- the tutorial script: a child process doing what a tutorial would (httpx-sse on each thread's
  stream, replayed from its first event, ``json.loads`` then ``json.dumps`` of every event,
  ``AIOKafkaProducer.send`` with the same headers, 100 streams at a time).

Each run's rate is counted over its steady part: the bridge from its first acknowledged event
to its last (``qoder_bridge_events_published_total``, sampled every 0.25 s), a child from its
first send to its last acknowledgement; CPU over the same window (``/proc``), in µs per event.
Every run's records are read back (read_committed) and counted. Results also go to
``pipeline.json`` in the results folder, for the charts (tests/bench_charts.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pickle
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from tests.bench import (
    _CHILDREN,
    PUBLISHED,
    Bridge,
    CpuMeter,
    SimulatorChild,
    Stalled,
    cpu_seconds,
    create_events_topic,
    duplicates,
    event_ids,
    fmt,
    ratio,
    read_all,
    say,
    table,
)
from tests.bridge_harness import TOKEN
from tests.kafka_broker import KafkaTopics

THREADS_PER_SESSION = 40
EVENTS_PER_THREAD = 50  # at 1,000 threads; fewer threads have more each, about 50,000 in all
TOTAL_EVENTS = 50_000
TUTORIAL_STREAMS = 100  # streams the tutorial script keeps open at once (httpx's default pool)


@dataclass(frozen=True)
class PipelineSizes:
    threads: tuple[int, ...]  # the sweep; the largest also runs exactly_once and transactional
    modes_at_largest: tuple[str, ...] = ("at_least_once", "exactly_once")


FULL_PIPELINE = PipelineSizes((40, 200, 1000))
QUICK_PIPELINE = PipelineSizes((40, 1000), ("at_least_once",))


def pipeline_scenario(threads: int) -> dict[str, Any]:
    """``threads`` threads in sessions of 40 (a coordinator and 39 children) with about 50,000
    events in all, every one there from the start; a stream without a cursor replays the
    thread from its first event. Sessions end terminated, so a coordinator's last event says
    it is done (a child's is its idle event)."""
    sessions = max(1, threads // THREADS_PER_SESSION)
    events = max(EVENTS_PER_THREAD, TOTAL_EVENTS // threads)
    children = {"count": THREADS_PER_SESSION - 1, "events": events, "rate": 0}
    spec = {
        "count": sessions,
        "coordinator": {"events": events, "rate": 0},
        "children": [children],
        "terminate": True,
    }
    return {
        "name": f"bench-pipeline-{threads}",
        "seed": 12,
        "instant": True,
        "fresh_stream": "replay",
        "sessions": [spec],
    }


@dataclass
class Run:
    who: str  # "bridge at_least_once", "plain producer", ...
    threads: int
    events: int
    seconds: float  # steady window
    cpu_s: float  # of the worker process over the window
    others: dict[str, float] = field(default_factory=dict)  # % of one core: sim, broker, other
    note: str = "all records once"
    requests: float = math.nan  # the bridge's API requests, from its start to the last event

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else math.nan

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.events * 1e6 if self.events else math.nan

    @property
    def cores(self) -> float:
        return self.cpu_s / self.seconds if self.seconds > 0 else math.nan


class PipelineBench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, broker_pid: int, workdir: Path):
        self.args = args
        self.bootstrap = bootstrap
        self.broker_pid = broker_pid
        self.workdir = workdir
        self.sizes = QUICK_PIPELINE if args.quick else FULL_PIPELINE
        self.runs: list[Run] = []

    async def run(self) -> None:
        say(
            "\npipeline: about 50,000 events of ~300 B (50 a thread at 1,000 threads), the bridge"
            " against the plain producer (the same records) and the tutorial script, in turn"
        )
        sweep = self.args.pipeline_threads or self.sizes.threads
        largest = max(sweep)
        for threads in sweep:
            modes = self.sizes.modes_at_largest if threads == largest else ("at_least_once",)
            await self.sweep_point(threads, modes)
        self.save()

    def save(self) -> None:
        out = self.workdir / "pipeline.json"
        out.write_text(json.dumps([asdict(r) for r in self.runs], indent=1))

    async def sweep_point(self, threads: int, modes: tuple[str, ...]) -> None:
        sim = SimulatorChild(pipeline_scenario(threads), self.workdir)
        records: list[Any] = []
        try:
            await sim.started()
            expected = sim.status()["events"]
            say(f"\n{threads:,} threads, {expected:,} events")
            for mode in modes:
                run, got = await self.bridge_run(sim, threads, mode, expected)
                records = got or records
                self._add(run)
            self._add(await self.tutorial_run(sim, threads, expected))
        finally:
            await sim.stop()
        if records:
            self._add(await self.producer_run(records, threads, transactional=False))
            if "exactly_once" in modes:
                self._add(await self.producer_run(records, threads, transactional=True))

    def _add(self, run: Run) -> None:
        self.runs.append(run)
        requests = "" if math.isnan(run.requests) else f", {run.requests:,.0f} API requests"
        say(
            f"  {run.who}: {fmt(run.rate)} events/s, {fmt(run.cpu_us, '.1f')} µs CPU an event,"
            f" {fmt(run.cores, '.2f')} cores{requests} ({run.note})"
        )

    async def bridge_run(
        self, sim: SimulatorChild, threads: int, mode: str, expected: int
    ) -> tuple[Run, list[Any]]:
        topics = KafkaTopics.unique(f"bench-pipeline-{threads}-{mode}")
        await create_events_topic(self.bootstrap, topics.events)
        bridge = Bridge(sim, self.bootstrap, topics, mode, self.workdir)
        samples: list[tuple[float, float, float]] = []  # (time, bridge CPU s, published)
        note = "all records once"
        try:
            bridge.start()
            if self.args.py_spy:
                bridge.profile(self.args.py_spy, self.workdir / f"pipeline-{threads}-{mode}.txt")
            meter: CpuMeter | None = None

            requests = math.nan

            def check(metrics: dict[str, float]) -> bool:
                nonlocal meter, requests
                published = metrics.get(PUBLISHED, 0.0)
                requests = metrics.get("qoder_bridge_api_requests_total", math.nan)
                if published > 0 and meter is None:
                    meter = CpuMeter(
                        {"bridge": bridge.pid, "simulator": sim.proc.pid, "broker": self.broker_pid}
                    )
                if published > 0:
                    samples.append((time.monotonic(), cpu_seconds(bridge.pid), published))
                return published >= expected

            try:
                await bridge.wait_for(f"{expected:,} events published", check, 600)
            except TimeoutError as exc:
                raise Stalled(int(samples[-1][2]) if samples else 0, expected, 600) from exc
            others = meter.read() if meter else {}
            records = await read_all(self.bootstrap, topics.events, expected)
        finally:
            with anyio.CancelScope(shield=True):
                code = await bridge.stop()
        (t0, c0, n0), (t1, c1, n1) = samples[0], samples[-1]
        problems = []
        if len(records) != expected:
            problems.append(f"{len(records):,} records, {expected:,} expected")
        if dups := duplicates(event_ids(records)):
            problems.append(f"{dups} duplicates")
        if code != 0:
            problems.append(f"exit code {code}")
        note = "; ".join(problems) or note
        run = Run(f"bridge {mode}", threads, int(n1 - n0), t1 - t0, c1 - c0, others, note)
        run.requests = requests
        return run, records

    async def _child(self, argv: list[str], pids_extra: dict[str, int]) -> dict[str, Any]:
        """Runs ``python -m tests.bench_pipeline ARGV`` and returns the JSON it prints."""
        cmd = [sys.executable, "-m", "tests.bench_pipeline", *argv]
        log = self.workdir / "pipeline-children.log"
        with log.open("ab") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
            _CHILDREN.append(proc)
            meter = CpuMeter({"worker": proc.pid, **pids_extra})
            # Read while the child lives: once it has exited its /proc entry is gone.
            usage: dict[str, float] = {}
            out = b""

            async def wait() -> None:
                nonlocal out
                out, _ = await anyio.to_thread.run_sync(proc.communicate)

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                while proc.poll() is None:
                    reading = meter.read()
                    if not math.isnan(reading["worker"]):
                        usage = reading
                    await anyio.sleep(0.2)
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        result["others"] = usage
        return result

    async def producer_run(self, records: list[Any], threads: int, *, transactional: bool) -> Run:
        topic = KafkaTopics.unique("bench-pipeline-producer").events
        await create_events_topic(self.bootstrap, topic)
        path = self.workdir / "pipeline-records.pickle"
        path.write_bytes(pickle.dumps([(r.key, r.value, list(r.headers)) for r in records]))
        argv = ["--produce", str(path), "--bootstrap", self.bootstrap, "--topic", topic]
        if transactional:
            argv.append("--transactional")
        result = await self._child(argv, {"broker": self.broker_pid})
        got = await read_all(self.bootstrap, topic, len(records))
        who = "transactional producer" if transactional else "plain producer"
        return self._child_run(who, threads, result, len(records), got)

    async def tutorial_run(self, sim: SimulatorChild, threads: int, expected: int) -> Run:
        topic = KafkaTopics.unique("bench-pipeline-tutorial").events
        await create_events_topic(self.bootstrap, topic)
        argv = ["--tutorial", sim.url, "--bootstrap", self.bootstrap, "--topic", topic]
        pids = {"simulator": sim.proc.pid, "broker": self.broker_pid}
        result = await self._child(argv, pids)
        got = await read_all(self.bootstrap, topic, expected)
        return self._child_run("tutorial script", threads, result, expected, got)

    @staticmethod
    def _child_run(who: str, threads: int, result: dict[str, Any], expected: int, got: Any) -> Run:
        problems = []
        if len(got) != expected:
            problems.append(f"{len(got):,} records, {expected:,} expected")
        if dups := duplicates(event_ids(got)):
            problems.append(f"{dups} duplicates")
        others = {k: v for k, v in result["others"].items() if k != "worker"}
        note = "; ".join(problems) or "all records once"
        return Run(who, threads, result["events"], result["seconds"], result["cpu_s"], others, note)

    # -- the report ------------------------------------------------------------------------------

    def report(self) -> None:
        if not self.runs:
            return
        say("\nPIPELINE: events/s over the steady part, CPU of the worker process an event")
        rows = []
        by_threads: dict[int, dict[str, Run]] = {}
        for r in self.runs:
            by_threads.setdefault(r.threads, {})[r.who] = r
        for threads, runs in by_threads.items():
            plain, tutorial = runs.get("plain producer"), runs.get("tutorial script")
            txn = runs.get("transactional producer")
            for r in runs.values():
                base = txn if r.who == "bridge exactly_once" and txn else plain
                rows.append(
                    [
                        f"{threads:,} threads: {r.who}",
                        f"{r.events:,}",
                        fmt(r.rate, ",.0f", " ev/s"),
                        ratio(r.rate, base.rate) if base else "n/a",
                        ratio(r.rate, tutorial.rate) if tutorial else "n/a",
                        fmt(r.cpu_us, ".1f", " µs"),
                        ratio(base.cpu_us, r.cpu_us) if base else "n/a",
                        fmt(r.cores, ".2f"),
                        *(
                            fmt(r.others.get(k, math.nan), ".0f", " %")
                            for k in ("simulator", "broker", "other")
                        ),
                        r.note,
                    ]
                )
        headers = ["run", "events", "rate", "vs producer", "vs tutorial", "CPU an event"]
        headers += ["producer CPU/this", "cores", "sim", "broker", "other", "check"]
        say(table(headers, rows))
        say("  vs producer: rate / the plain producer's on the same records (bridge")
        say("  exactly_once: / the transactional producer's); producer CPU/this: its CPU an event")
        say("  / this run's (1.00x = as cheap as the producer alone). sim, broker, other: % of")
        say("  one core over the same window (other: anything else on the machine).")


# -- the child processes --------------------------------------------------------------------------


def _producer_kwargs(bootstrap: str) -> dict[str, Any]:
    """The bridge's producer settings, as its defaults make them."""
    from bridge.config import load_settings  # noqa: PLC0415
    from bridge.kafka_conn import producer_tuning_kwargs  # noqa: PLC0415

    settings = load_settings({"QODER_ACCESS_TOKEN": TOKEN, "KAFKA_BOOTSTRAP_SERVERS": bootstrap})
    kwargs = producer_tuning_kwargs(settings.kafka)
    return {"bootstrap_servers": bootstrap, "acks": "all", "enable_idempotence": True, **kwargs}


def _report(events: int, started: tuple[float, float]) -> None:
    seconds = time.monotonic() - started[0]
    cpu = time.process_time() - started[1]
    print(json.dumps({"events": events, "seconds": seconds, "cpu_s": cpu}), flush=True)


def produce_child(path: Path, bootstrap: str, topic: str, *, transactional: bool) -> None:
    from aiokafka import AIOKafkaProducer  # noqa: PLC0415

    messages = pickle.loads(path.read_bytes())  # noqa: S301 -- our own file, just written

    async def main() -> None:
        kwargs = _producer_kwargs(bootstrap)
        if transactional:
            kwargs["transactional_id"] = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
        producer = AIOKafkaProducer(**kwargs)
        await producer.start()
        try:
            started = (time.monotonic(), time.process_time())
            if transactional:
                at = 0
                while at < len(messages):
                    await producer.begin_transaction()
                    deadline = time.monotonic() + 0.1
                    while at < len(messages) and time.monotonic() < deadline:
                        key, value, headers = messages[at]
                        await producer.send(topic, value, key=key, headers=headers)
                        at += 1
                    await producer.commit_transaction()
            else:
                futures = [await producer.send(topic, v, key=k, headers=h) for k, v, h in messages]
                for future in futures:  # in turn: gather() would add a callback to each
                    await future
            _report(len(messages), started)
        finally:
            await producer.stop()

    asyncio.run(main())


def tutorial_child(base_url: str, bootstrap: str, topic: str) -> None:
    """What a tutorial would write: list sessions and threads, read each thread's SSE stream
    with httpx-sse, re-serialise every event and send it; a thread is done at its idle event."""
    import httpx  # noqa: PLC0415
    from aiokafka import AIOKafkaProducer  # noqa: PLC0415
    from httpx_sse import aconnect_sse  # noqa: PLC0415

    headers = {"Authorization": f"Bearer {TOKEN}"}
    done_types = {"session.thread_status_idle", "session.status_terminated"}

    async def pages(client: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            body = (await client.get(base_url + path, params=params, headers=headers)).json()
            items += body["data"]
            if not body.get("has_more"):
                return items
            params = {"limit": 100, "page": body["next_page"]}

    async def main() -> None:
        producer = AIOKafkaProducer(**_producer_kwargs(bootstrap))
        await producer.start()
        futures: list[asyncio.Future[Any]] = []
        started: list[tuple[float, float]] = []
        limit = asyncio.Semaphore(TUTORIAL_STREAMS)
        try:
            async with httpx.AsyncClient(timeout=60) as client:
                sessions = await pages(client, "/sessions")
                threads = []
                for s in sessions:
                    threads += await pages(client, f"/sessions/{s['id']}/threads")

                async def follow(thread: dict[str, Any]) -> None:
                    sid, tid = thread["session_id"], thread["id"]
                    url = f"{base_url}/sessions/{sid}/threads/{tid}/stream"
                    async with limit, aconnect_sse(client, "GET", url, headers=headers) as source:
                        async for sse in source.aiter_sse():
                            if sse.event == "heartbeat" or not sse.data:
                                continue
                            event = json.loads(sse.data)
                            if not started:
                                started.append((time.monotonic(), time.process_time()))
                            ce = [
                                ("ce_specversion", b"1.0"),
                                ("ce_id", event["id"].encode()),
                                ("ce_type", event["type"].encode()),
                                ("ce_source", f"/sessions/{sid}/threads/{tid}".encode()),
                                ("ce_time", event["processed_at"].encode()),
                                ("content-type", b"application/json"),
                                ("qoder_session_id", sid.encode()),
                                ("qoder_thread_id", tid.encode()),
                            ]
                            value = json.dumps(event, separators=(",", ":")).encode()
                            key = f"{sid}/{tid}".encode()
                            futures.append(await producer.send(topic, value, key=key, headers=ce))
                            if event["type"] in done_types:
                                return

                await asyncio.gather(*(follow(t) for t in threads))
            await asyncio.gather(*futures)
            _report(len(futures), started[0])
        finally:
            await producer.stop()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_pipeline")
    parser.add_argument("--produce", type=Path)
    parser.add_argument("--tutorial")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--transactional", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if args.produce:
        produce_child(args.produce, args.bootstrap, args.topic, transactional=args.transactional)
    elif args.tutorial:
        tutorial_child(args.tutorial, args.bootstrap, args.topic)
    else:
        parser.error("--produce or --tutorial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
