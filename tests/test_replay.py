"""``qoder-bridge replay``: a session's history re-exported into a topic, exactly once per run,
interrupted (kill -9, a cancelled task) and resumed, against the simulator and a real broker.

What a user checks: the topic read read_committed holds every event exactly once, in the API's
order per key, each record byte for byte what the bridge publishes (bridge.records.event_record:
key, value, headers); the bridge's checkpoint topic is untouched; the command says what it did.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from collections import defaultdict
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from structlog.testing import capture_logs

from bridge.config import Settings, load_settings
from bridge.records import Event, event_record
from bridge.replay import Replay, ReplayRequest
from bridge.simulator import Scenario, SessionSpec, ThreadSpec, running_simulator
from bridge.tooling import open_api, session_threads
from tests.bridge_harness import (
    TOKEN,
    bridge_env,
    compare,
    running_bridge,
    simulator_logs,
    wait_for_delivery,
)
from tests.kafka_broker import _partitions as partitions_of
from tests.kafka_broker import read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

CHILDREN = 20
#: One session: a coordinator and 20 children, 400 events in all (scripts and lifecycle),
#: there from the start.
SCENARIO = Scenario(
    name="replay",
    seed=11,
    instant=True,
    sessions=(
        SessionSpec(
            coordinator=ThreadSpec(events=40, rate=0),
            children=tuple(ThreadSpec(events=14, rate=0) for _ in range(CHILDREN)),
        ),
    ),
)


def replay_env(sim: Any, bootstrap: str, topics: Any, **extra: str) -> dict[str, str]:
    return bridge_env(sim.base_url, bootstrap, topics, **extra)


def request_for(settings: Settings, session_id: str, **kw: Any) -> ReplayRequest:
    return ReplayRequest(
        session_id=session_id,
        thread_id=kw.get("thread_id"),
        after=kw.get("after"),
        topic=kw["topic"],
        progress_topic=settings.kafka.checkpoint_topic + ".replay",
        restart=kw.get("restart", False),
    )


async def run_cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "bridge", *argv], env={**os.environ, **env}, check=False
    )


async def expected_records(settings: Settings, topic: str, session_id: str) -> dict[str, list]:
    """Per key, what the bridge's own record builder makes of every event the API lists:
    (value, headers), in the API's order."""
    expected: dict[str, list] = defaultdict(list)
    async with open_api(settings) as api:
        for ref in (await session_threads(api, session_id)).threads:
            async for page in api.thread_events(ref, None):
                for event in page:
                    assert isinstance(event, Event)
                    record = event_record(topic, ref, event)
                    expected[ref.key].append((record.value, [tuple(h) for h in record.headers]))
    return dict(expected)


def by_key(records: list[Any]) -> dict[str, list]:
    found: dict[str, list] = defaultdict(list)
    for r in records:
        found[r.key.decode()].append((r.value, [tuple(h) for h in r.headers]))
    return dict(found)


async def snapshot(bootstrap: str, topic: str) -> list[tuple[int, int, bytes | None, bytes]]:
    """Everything in the topic, aborted records and markers' neighbours included."""
    return [
        (r.partition, r.offset, r.key, r.value)
        for r in await read_topic(bootstrap, topic, isolation_level="read_uncommitted")
    ]


async def test_replay_interrupted_twice_then_resumed_has_every_event_once(
    kafka_bootstrap, kafka_topics, tmp_path
):
    """Scenario: a bridge has published a session of 21 threads (400 events) and stopped. An
    operator replays the session into a new topic; the replay is stopped with Ctrl-C mid-run,
    run again and killed with SIGKILL further on, then run once more to the end. The new
    topic, read_committed, holds every event exactly once, in order per key, each record (key,
    value, headers) byte for byte what the bridge published; the bridge's checkpoint topic is
    exactly as it was."""
    target = kafka_topics.events + ".replayed"
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        (session_id,) = sim.session_ids()
        env = replay_env(sim, kafka_bootstrap, kafka_topics)
        settings = load_settings(env)
        async with running_bridge(settings):
            bridge_records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=60
            )
        assert delivery.lost == 0 and delivery.expected == 400
        checkpoints_before = await snapshot(kafka_bootstrap, kafka_topics.checkpoints)
        assert checkpoints_before

        # Slow enough to be stopped mid-run: about 3 API requests a second, one per thread.
        slow = {**env, "BRIDGE_API_MAX_RPS": "3"}
        argv = ["replay", "--session", session_id, "--topic", target]

        async def interrupted(log_name: str, more_than: int, stop: Any) -> tuple[int, str]:
            """Run the command until more than ``more_than`` records are committed, then
            ``stop`` it; its exit status and output."""
            log = tmp_path / log_name
            with log.open("wb") as sink:
                process = await anyio.open_process(
                    [sys.executable, "-m", "bridge", *argv],
                    env={**os.environ, **slow},
                    stdout=sink,
                    stderr=sink,
                )
                try:
                    with anyio.fail_after(60):
                        while len(await read_topic(kafka_bootstrap, target)) <= more_than:
                            assert process.returncode is None, log.read_text()
                            await anyio.sleep(0.1)
                    stop(process)
                    with anyio.fail_after(30):
                        code = await process.wait()
                finally:
                    if process.returncode is None:
                        process.kill()
                        await process.wait()
            return code, log.read_text()

        # Ctrl-C: the process says how far it got and how to go on.
        code, output = await interrupted("sigint.log", 0, lambda p: p.send_signal(signal.SIGINT))
        first = len(await read_topic(kafka_bootstrap, target))
        assert code == 130, output[-2000:]
        assert "events committed; the same command resumes run" in output
        assert 0 < first < delivery.expected, "the replay was not interrupted mid-run"
        # kill -9, further on.
        code, output = await interrupted("sigkill.log", first, lambda p: p.kill())
        second = len(await read_topic(kafka_bootstrap, target))
        assert code == -signal.SIGKILL
        assert first < second < delivery.expected, "the replay was not interrupted mid-run"

        resumed = await run_cli(env, *argv)
        assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
        out = resumed.stdout.decode()
        assert f"replayed {delivery.expected} events of {CHILDREN + 1} thread(s)" in out

        records = await read_topic(kafka_bootstrap, target)
        result = compare(records, simulator_logs(sim))
        assert (result.lost, result.duplicated, result.misordered) == (0, 0, 0), result.summary()
        assert len(records) == delivery.expected
        expected = await expected_records(settings, target, session_id)
        assert by_key(records) == expected
        # The same bytes the bridge published, key by key (only the topic differs).
        bridge = by_key(bridge_records)
        assert {k: [v for v, _ in vs] for k, vs in bridge.items()} == {
            k: [v for v, _ in vs] for k, vs in expected.items()
        }
        assert {k: [h for _, h in vs] for k, vs in bridge.items()} == {
            k: [h for _, h in vs] for k, vs in expected.items()
        }

        # The resumed process logged plain progress lines (stderr is not a terminal).
        lines = [json.loads(x) for x in resumed.stderr.decode().splitlines() if x.startswith("{")]
        last = [x for x in lines if x.get("event") == "bridge.replay.progress"][-1]
        assert (last["threads_done"], last["threads"]) == (CHILDREN + 1, CHILDREN + 1)
        assert last["events"] == delivery.expected
        assert "\r" not in resumed.stderr.decode()

        assert await snapshot(kafka_bootstrap, kafka_topics.checkpoints) == checkpoints_before

        # Run again: the run is complete, nothing more is written.
        again = await run_cli(env, *argv)
        assert again.returncode == 0
        assert "nothing to do" in again.stdout.decode()
        assert len(await read_topic(kafka_bootstrap, target)) == delivery.expected


async def test_replay_cancelled_and_resumed_in_process_then_restarted(
    kafka_bootstrap, kafka_topics
):
    """Scenario: the replay's task is cancelled (Ctrl-C) after a few commits, then resumed:
    every event once. --restart then runs it again from the start: each event twice (two
    runs), never three times, and a read_uncommitted reader shows the interrupted batch was
    the only thing aborted."""
    target = kafka_topics.events + ".replayed"
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        (session_id,) = sim.session_ids()
        settings = load_settings(
            replay_env(sim, kafka_bootstrap, kafka_topics, BRIDGE_API_MAX_RPS="4")
        )
        total = sum(len(v) for v in simulator_logs(sim).values())
        first = Replay(settings, request_for(settings, session_id, topic=target))
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first.run)
                while first.events == 0:
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
        assert 0 < first.events < total

        fast = load_settings(replay_env(sim, kafka_bootstrap, kafka_topics))
        second = Replay(fast, request_for(fast, session_id, topic=target))
        with anyio.fail_after(60):
            await second.run()
        assert second.resumed and not second.already_complete
        assert second.events == total
        records = await read_topic(kafka_bootstrap, target)
        result = compare(records, simulator_logs(sim))
        assert (result.lost, result.duplicated, result.misordered) == (0, 0, 0), result.summary()

        third = Replay(fast, request_for(fast, session_id, topic=target))
        await third.run()
        assert third.already_complete and third.events == total
        assert "nothing to do" in third.summary()

        restarted = Replay(fast, request_for(fast, session_id, topic=target, restart=True))
        await restarted.run()
        assert not restarted.already_complete and restarted.events == total
        records = await read_topic(kafka_bootstrap, target)
        values = [r.value for r in records]
        assert len(values) == 2 * total
        assert all(values.count(v) == 2 for v in set(values))


async def test_replay_one_thread_after_an_event(kafka_bootstrap, kafka_topics):
    """Scenario: --thread T --after E re-exports only T's events after E, in order."""
    target = kafka_topics.events + ".replayed"
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        session_id, thread_id = sim.all_threads()[3]
        log = sim.thread_log(session_id, thread_id)
        after = json.loads(log[4])["id"]
        settings = load_settings(replay_env(sim, kafka_bootstrap, kafka_topics))
        job = Replay(
            settings,
            request_for(settings, session_id, thread_id=thread_id, after=after, topic=target),
        )
        await job.run()
        records = await read_topic(kafka_bootstrap, target)
        assert [r.value for r in records] == log[5:]
        assert {r.key.decode() for r in records} == {f"{session_id}/{thread_id}"}
        assert job.events == len(log) - 5 and job.threads_done == 1


async def test_replay_refuses_what_looks_wrong(kafka_bootstrap, kafka_topics):
    """Scenario: typos and dangerous targets. An unknown session or thread exits 1 naming it;
    --after without --thread, or the checkpoint topic as target, exits 2 before any write."""
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        env = replay_env(sim, kafka_bootstrap, kafka_topics)
        (session_id,) = sim.session_ids()

        unknown = await run_cli(env, "replay", "--session", "sess_nope", "--topic", "x.y")
        assert unknown.returncode == 1
        assert "session sess_nope not found" in unknown.stderr.decode()

        thread = await run_cli(env, "replay", "--session", session_id, "--thread", "sthr_nope")
        assert thread.returncode == 1
        assert f"thread sthr_nope is not a thread of session {session_id}" in (
            thread.stderr.decode()
        )

        after = await run_cli(env, "replay", "--session", session_id, "--after", "evt_1")
        assert after.returncode == 2 and "--after needs --thread" in after.stderr.decode()

        into_checkpoints = await run_cli(
            env, "replay", "--session", session_id, "--topic", kafka_topics.checkpoints
        )
        assert into_checkpoints.returncode == 2
        assert "BRIDGE_CHECKPOINT_TOPIC" in into_checkpoints.stderr.decode()
    assert await read_topic(kafka_bootstrap, kafka_topics.checkpoints) == []


async def test_replay_on_a_terminal_shows_a_progress_bar(kafka_bootstrap, kafka_topics):
    """Scenario: an operator runs replay in a terminal: stderr shows a bar with the threads
    done out of all, the events, their rate and the time left; no JSON progress lines."""
    target = kafka_topics.events + ".replayed"
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        (session_id,) = sim.session_ids()
        env = {**os.environ, **replay_env(sim, kafka_bootstrap, kafka_topics)}
        argv = [sys.executable, "-m", "bridge", "replay", "--session", session_id]

        def run_on_a_terminal() -> tuple[int, str]:
            controller, terminal = pty.openpty()
            size = struct.pack("HHHH", 40, 160, 0, 0)  # rows, columns: a terminal window
            fcntl.ioctl(terminal, termios.TIOCSWINSZ, size)
            process = subprocess.Popen(
                [*argv, "--topic", target],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=terminal,
                stdin=subprocess.DEVNULL,
            )
            os.close(terminal)
            chunks = []
            while True:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            os.close(controller)
            return process.wait(30), b"".join(chunks).decode(errors="replace")

        code, screen = await anyio.to_thread.run_sync(run_on_a_terminal)
    assert code == 0, screen[-2000:]
    # The bar is redrawn in place (carriage returns); the last drawing is what stays.
    final = [line for line in re.split(r"[\r\n]", screen) if " threads, " in line][-1]
    assert f"{CHILDREN + 1}/{CHILDREN + 1} threads" in final, final
    assert "100%" in final and "400 events" in final and "events/s" in final
    assert "bridge.replay.progress" not in screen


async def test_replay_names_a_thread_it_cannot_read_and_exits_1(kafka_bootstrap, kafka_topics):
    """Scenario: the API lists, among 21 threads, one whose id is '..' (no URL path can name
    it: it would resolve to the session's own path). The replay re-exports the 20 others, every
    event once, names the one it could not read and exits 1: never a silent gap."""
    target = kafka_topics.events + ".replayed"
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        (session,) = sim.world.sessions
        thread = session.threads[1]
        del session.thread_index[thread.id]
        thread.id = ".."
        session.thread_index[".."] = 1
        env = replay_env(sim, kafka_bootstrap, kafka_topics)
        done = await run_cli(env, "replay", "--session", session.id, "--topic", target)
        assert done.returncode == 1, done.stderr.decode()[-2000:]
        assert "1 thread(s) NOT replayed" in done.stdout.decode()
        assert "not replayed" in done.stderr.decode() and "'..'" in done.stderr.decode()
        records = await read_topic(kafka_bootstrap, target)
        logs = {k: v for k, v in simulator_logs(sim).items() if not k.endswith("/..")}
        result = compare(records, logs)
        assert (result.lost, result.duplicated, result.misordered) == (0, 0, 0), result.summary()
        assert len(logs) == CHILDREN and f"{session.id}/.." not in {r.key.decode() for r in records}


async def end_offsets(bootstrap: str, topic: str, isolation_level: str) -> dict[int, int]:
    """The topic's end offsets: its high watermarks read_uncommitted, its last stable offsets
    (short of any transaction still open) read_committed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, isolation_level=isolation_level
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await partitions_of(bootstrap, topic)]
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def test_a_replay_stopped_while_it_commits_holds_nobody_back(
    kafka_bootstrap, kafka_topics, monkeypatch
):
    """Scenario: Ctrl-C reaches a replay while it commits (its records sent, the commit not
    yet through). On its way out it aborts that transaction: read_committed readers of the
    progress topic and of the target are not held back until the transaction's timeout (a
    minute), and another run started at once goes through without waiting for it."""
    target = kafka_topics.events + ".replayed"
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        (session_id,) = sim.session_ids()
        settings = load_settings(replay_env(sim, kafka_bootstrap, kafka_topics))
        stuck = anyio.Event()

        async def commit_never_returns(self: AIOKafkaProducer) -> None:
            stuck.set()
            await anyio.sleep_forever()

        monkeypatch.setattr(AIOKafkaProducer, "commit_transaction", commit_never_returns)
        one = request_for(settings, session_id, thread_id=sim.all_threads()[0][1], topic=target)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(Replay(settings, one).run)
                await stuck.wait()
                tg.cancel_scope.cancel()  # Ctrl-C
        monkeypatch.undo()

        for topic in (one.progress_topic, target):
            assert await end_offsets(kafka_bootstrap, topic, "read_committed") == (
                await end_offsets(kafka_bootstrap, topic, "read_uncommitted")
            ), f"a transaction is still open on {topic}"
        whole = request_for(settings, session_id, topic=target)
        with capture_logs() as logs, anyio.fail_after(60):
            await Replay(settings, whole).run()
        assert not [e for e in logs if e["event"] == "bridge.replay.waiting"]
        result = compare(await read_topic(kafka_bootstrap, target), simulator_logs(sim))
        assert (result.lost, result.duplicated, result.misordered) == (0, 0, 0), result.summary()
