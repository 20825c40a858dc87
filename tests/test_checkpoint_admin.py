"""``qoder-bridge checkpoints list|reset`` as an operator runs them, against the simulator, a real
broker and real bridges: what list prints is what the bridge stored; a dry run writes nothing;
a reset the bridge takes at its next start (it republishes from the new position); a reset is
refused while a bridge is live in the group, unless --force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import anyio
import pytest

from bridge.checkpoint_admin import stored_checkpoints
from bridge.config import KafkaSettings, load_settings
from bridge.membership import live_members, member_client_id
from bridge.simulator import Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.bridge_harness import TOKEN, bridge_env, running_bridge, wait_for_delivery
from tests.kafka_broker import read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

#: Two sessions, there from the start: one of three threads, one of one.
SCENARIO = Scenario(
    name="admin",
    seed=5,
    instant=True,
    sessions=(
        SessionSpec(
            coordinator=ThreadSpec(events=12, rate=0),
            children=(ThreadSpec(events=10, rate=0), ThreadSpec(events=10, rate=0)),
        ),
        SessionSpec(coordinator=ThreadSpec(events=6, rate=0)),
    ),
)


def env_for(sim: Any, bootstrap: str, topics: Any, **extra: str) -> dict[str, str]:
    group = f"{topics.transactional_id}.group"  # no other test's bridges in it
    return bridge_env(sim.base_url, bootstrap, topics, BRIDGE_GROUP_ID=group, **extra)


async def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "bridge", *argv], env={**os.environ, **env}, check=False
    )


def ids(log: list[bytes]) -> list[str]:
    return [json.loads(raw)["id"] for raw in log]


async def settled(bootstrap: str, topic: str, *session_ids: str) -> None:
    """Wait until the bridge has marked these sessions settled (keyed by the session alone)."""
    with anyio.fail_after(30):
        while not {s.encode() for s in session_ids} <= {
            r.key for r in await read_topic(bootstrap, topic)
        }:
            await anyio.sleep(0.2)


async def checkpoint_records(bootstrap: str, topic: str) -> list[tuple[int, bytes | None]]:
    return [
        (r.offset, r.value)
        for r in await read_topic(bootstrap, topic, isolation_level="read_uncommitted")
    ]


async def test_list_shows_what_the_bridge_stored(kafka_bootstrap, kafka_topics):
    """Scenario: after a bridge published two sessions, `checkpoints list --json` shows each
    thread's cursor at its last event, drained, and each session's settled mark; --session
    narrows it; the table names each thread with its cursor, and the settled sessions below."""
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        env = env_for(sim, kafka_bootstrap, kafka_topics)
        first, second = sim.session_ids()
        async with running_bridge(load_settings(env)):
            await wait_for_delivery(kafka_bootstrap, kafka_topics.events, sim, timeout_s=60)
            await settled(kafka_bootstrap, kafka_topics.checkpoints, first, second)

        listed = await cli(env, "checkpoints", "list", "--json")
        assert listed.returncode == 0, listed.stderr.decode()[-2000:]
        doc = json.loads(listed.stdout)
        rows = doc["threads"]
        assert {(r["session_id"], r["thread_id"]) for r in rows} == set(sim.all_threads())
        assert {m["session_id"] for m in doc["settled_sessions"]} == {first, second}
        assert all(m["settled_updated_at"] for m in doc["settled_sessions"])
        for row in rows:
            log = ids(sim.thread_log(row["session_id"], row["thread_id"]))
            assert row["last_event_id"] == log[-1]
            assert row["recent_ids"] == log[-len(row["recent_ids"]) :]
            assert row["drained_updated_at"] is not None and row["written_at"] is not None

        only = json.loads(
            (await cli(env, "checkpoints", "list", "--session", second, "--json")).stdout
        )
        assert [(r["session_id"], r["last_event_id"]) for r in only["threads"]] == [
            (second, ids(sim.thread_log(second, only["threads"][0]["thread_id"]))[-1])
        ]
        assert [m["session_id"] for m in only["settled_sessions"]] == [second]

        table = (await cli(env, "checkpoints", "list", "--session", first)).stdout.decode()
        threads, marks = table.split("\n\n")
        lines = threads.splitlines()
        assert lines[0].split() == [
            "SESSION",
            "THREAD",
            "LAST_EVENT_ID",
            "DRAINED_UPDATED_AT",
            "WRITTEN_AT",
        ]
        assert len(lines) == 4
        for session_id, thread_id in sim.all_threads():
            if session_id == first:
                last = ids(sim.thread_log(session_id, thread_id))[-1]
                assert any(line.split()[1:3] == [thread_id, last] for line in lines[1:])
        assert "1 session(s) settled" in marks
        assert marks.splitlines()[1].split() == ["SESSION", "SETTLED_UPDATED_AT"]
        assert marks.splitlines()[2].split()[0] == first


async def test_reset_dry_run_then_execute_then_the_bridge_republishes_from_there(
    kafka_bootstrap, kafka_topics
):
    """Scenario: after a bridge published a session of three threads and marked it settled
    (a session it need not look at again), an operator moves one thread back to its 4th
    event, another to its start and the third to its latest event. The dry run prints
    before/after and writes nothing. After --execute, a bridge started on a fresh events topic
    publishes exactly the first thread's events after the 4th and the whole second thread,
    nothing of the third (nor of the other session)."""
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        env = env_for(sim, kafka_bootstrap, kafka_topics)
        kafka = load_settings(env).kafka
        session_id = sim.session_ids()[0]
        async with running_bridge(load_settings(env)):
            await wait_for_delivery(kafka_bootstrap, kafka_topics.events, sim, timeout_s=60)
            with anyio.fail_after(30):
                # The session's settled mark (keyed by the session alone): the next start
                # would not look at it again unless the reset clears the mark.
                while not any(
                    r.key == session_id.encode()
                    for r in await read_topic(kafka_bootstrap, kafka_topics.checkpoints)
                ):
                    await anyio.sleep(0.2)
        latest, first, start = [t for s, t in sim.all_threads() if s == session_id]
        first_ids = ids(sim.thread_log(session_id, first))
        before = await checkpoint_records(kafka_bootstrap, kafka_topics.checkpoints)

        argv = ["checkpoints", "reset", "--session", session_id, "--thread", first]
        dry = await cli(env, *argv, "--to", first_ids[3])
        assert dry.returncode == 0, dry.stderr.decode()[-2000:]
        out = dry.stdout.decode()
        assert "dry run" in out and "nothing written" in out
        assert any(
            line.split() == [first, first_ids[-1], first_ids[3]] for line in out.splitlines()
        )
        assert "no bridge is running" in out
        assert await checkpoint_records(kafka_bootstrap, kafka_topics.checkpoints) == before

        done = await cli(env, *argv, "--to", first_ids[3], "--execute")
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert "written: 1 checkpoint(s)" in done.stdout.decode()
        to_start = await cli(
            env, "checkpoints", "reset", "--session", session_id, "--thread", start,
            "--to-start", "--execute",
        )  # fmt: skip
        assert to_start.returncode == 0, to_start.stderr.decode()[-2000:]
        assert "republishes the thread from its first event" in to_start.stdout.decode()
        to_latest = await cli(
            env, "checkpoints", "reset", "--session", session_id, "--thread", latest,
            "--to-latest", "--execute",
        )  # fmt: skip
        assert to_latest.returncode == 0, to_latest.stderr.decode()[-2000:]

        stored = {s.thread_id: s.checkpoint for s in await stored_checkpoints(kafka, session_id)}
        assert stored[first].last_event_id == first_ids[3]
        assert stored[first].recent_ids == tuple(first_ids[:4])
        assert stored[first].drained_updated_at is None
        assert stored[start].last_event_id is None and stored[start].recent_ids == ()
        assert stored[latest].last_event_id == ids(sim.thread_log(session_id, latest))[-1]

        # The next start, publishing to a topic of its own: only what the resets ask for.
        again = {**env, "BRIDGE_TOPIC": kafka_topics.events + ".again"}
        async with running_bridge(load_settings(again)):
            with anyio.fail_after(60):
                while True:
                    now = {
                        s.thread_id: s.checkpoint
                        for s in await stored_checkpoints(kafka, session_id)
                    }
                    if all(now[t].drained_updated_at for t in (first, start, latest)):
                        break  # every reset thread was read again after its new cursor
                    await anyio.sleep(0.2)
        records = await read_topic(kafka_bootstrap, kafka_topics.events + ".again")
        published: dict[str, list[bytes]] = {}
        for r in records:
            published.setdefault(r.key.decode(), []).append(r.value)
        assert published == {
            f"{session_id}/{first}": sim.thread_log(session_id, first)[4:],
            f"{session_id}/{start}": sim.thread_log(session_id, start),
        }


async def test_reset_is_refused_while_a_bridge_is_running_unless_forced(
    kafka_bootstrap, kafka_topics
):
    """Scenario: an operator resets a thread while a bridge runs. --execute is refused (exit 1)
    naming the live member (client id with the bridge's transactional id, host) and nothing is
    written; the dry run says it would be refused; --force writes. Once the bridge has
    stopped, --execute goes through without --force. Typos are named: an unknown session or
    event exits 1, --to without --thread exits 2."""
    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        env = env_for(sim, kafka_bootstrap, kafka_topics)
        settings = load_settings(env)
        kafka: KafkaSettings = settings.kafka
        session_id = sim.session_ids()[0]
        thread_id = next(t for s, t in sim.all_threads() if s == session_id)
        last = ids(sim.thread_log(session_id, thread_id))[-1]
        argv = ["checkpoints", "reset", "--session", session_id, "--thread", thread_id]

        async def cursor() -> str | None:
            rows = await stored_checkpoints(kafka, session_id)
            return next(r.checkpoint.last_event_id for r in rows if r.thread_id == thread_id)

        async with running_bridge(settings):
            await wait_for_delivery(kafka_bootstrap, kafka_topics.events, sim, timeout_s=60)
            with anyio.fail_after(30):
                while not await live_members(kafka):
                    await anyio.sleep(0.2)

            refused = await cli(env, *argv, "--to-start", "--execute")
            assert refused.returncode == 1
            err = refused.stderr.decode()
            assert "refused" in err and member_client_id(settings) in err
            assert "host /127.0.0.1" in err or "host 127.0.0.1" in err
            assert await cursor() == last  # nothing written

            dry = await cli(env, *argv, "--to-start")
            assert dry.returncode == 0
            assert "--execute would be refused" in dry.stdout.decode()
            assert await cursor() == last

            forced = await cli(env, *argv, "--to-start", "--execute", "--force")
            assert forced.returncode == 0, forced.stderr.decode()[-2000:]
            assert await cursor() is None

        after_stop = await cli(env, *argv, "--to-latest", "--execute")
        assert after_stop.returncode == 0, after_stop.stderr.decode()[-2000:]
        assert "no bridge is running" in after_stop.stdout.decode()
        assert await cursor() == last

        unknown = await cli(env, "checkpoints", "reset", "--session", "sess_nope", "--to-start")
        assert unknown.returncode == 1
        assert "session sess_nope not found" in unknown.stderr.decode()
        no_event = await cli(env, *argv, "--to", "evt_nope")
        assert no_event.returncode == 1
        assert f"event evt_nope is not in the list of thread {thread_id}" in (
            no_event.stderr.decode()
        )
        no_thread = await cli(env, "checkpoints", "reset", "--session", session_id, "--to", last)
        assert no_thread.returncode == 2 and "--to needs --thread" in no_thread.stderr.decode()


async def test_reset_to_latest_before_the_first_start_skips_the_history(
    kafka_bootstrap, kafka_topics
):
    """Scenario: before a bridge has ever run (list: no checkpoints), an operator sets one
    session's threads to their latest event (publish from now on, not the history). The
    checkpoint topic is created as
    the bridge creates it (compacted), and the first bridge start publishes the other session
    whole and nothing of that one."""
    from tests.test_checkpoints import topic_configs  # noqa: PLC0415 -- the same look

    async with running_simulator(SCENARIO, token=TOKEN) as sim:
        env = env_for(sim, kafka_bootstrap, kafka_topics)
        kafka = load_settings(env).kafka
        skipped, published = sim.session_ids()
        empty = await cli(env, "checkpoints", "list")
        assert empty.returncode == 0
        assert f"no checkpoints in {kafka_topics.checkpoints}" in empty.stdout.decode()
        reset = await cli(
            env, "checkpoints", "reset", "--session", skipped, "--to-latest", "--execute"
        )
        assert reset.returncode == 0, reset.stderr.decode()[-2000:]
        assert "written: 3 checkpoint(s)" in reset.stdout.decode()
        configs = await topic_configs(kafka_bootstrap, kafka_topics.checkpoints, ["cleanup.policy"])
        assert configs == {"cleanup.policy": "compact"}

        async with running_bridge(load_settings(env)):
            with anyio.fail_after(60):
                while True:
                    rows = await stored_checkpoints(kafka)
                    if len(rows) == 4 and all(r.checkpoint.drained_updated_at for r in rows):
                        break  # every thread read after its cursor and drained
                    await anyio.sleep(0.2)
        records = await read_topic(kafka_bootstrap, kafka_topics.events)
        thread = next(t for s, t in sim.all_threads() if s == published)
        assert {r.key.decode() for r in records} == {f"{published}/{thread}"}
        assert [r.value for r in records] == sim.thread_log(published, thread)


#: One thread that runs for about 10 s: the bridge commits its cursor all along.
RUNNING = Scenario(
    name="running", seed=3, sessions=(SessionSpec(coordinator=ThreadSpec(events=150, rate=15)),)
)


async def test_a_forced_reset_under_a_bridge_outside_the_group_says_it_was_overwritten(
    kafka_bootstrap, kafka_topics
):
    """Scenario: a bridge publishes a running thread, but the operator runs the reset with
    another BRIDGE_GROUP_ID than the bridge's (a misconfiguration: the tool asks a group in
    which no bridge is live). The dry run says the topic was written seconds ago and that
    --execute watches it first. With --force the reset is written; the bridge writes its own
    cursor over it within seconds: the command exits 1 saying the reset was OVERWRITTEN,
    naming the thread, instead of 'written' and exit 0."""
    async with running_simulator(RUNNING, token=TOKEN) as sim:
        env = env_for(sim, kafka_bootstrap, kafka_topics)
        ((session_id, thread_id),) = sim.all_threads()
        argv = ["checkpoints", "reset", "--session", session_id, "--thread", thread_id]
        elsewhere = {**env, "BRIDGE_GROUP_ID": env["BRIDGE_GROUP_ID"] + ".elsewhere"}
        async with running_bridge(load_settings(env)):
            with anyio.fail_after(30):
                while len(await read_topic(kafka_bootstrap, kafka_topics.events)) < 10:
                    await anyio.sleep(0.2)
            dry = await cli(elsewhere, *argv, "--to-start")
            forced = await cli(elsewhere, *argv, "--to-start", "--execute", "--force")
        out = dry.stdout.decode()
        assert dry.returncode == 0 and "no bridge is running" in out
        assert "the checkpoint topic was written" in out and "--execute first watches" in out
        said = forced.stdout.decode() + forced.stderr.decode()
        assert forced.returncode == 1, said
        assert "written: 1 checkpoint(s)" in forced.stdout.decode()
        assert "OVERWRITTEN" in forced.stderr.decode()
        assert f"{session_id}/{thread_id}" in forced.stderr.decode()
