"""Adversarial review of issue 12 items 2 and 3 (`qoder-bridge replay`, `qoder-bridge
checkpoints list|reset`) and the membership they rely on. Each test is one finding, against the
simulator and the real broker; each is marked xfail(strict) with the finding's number, and the
fix removes the mark."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from structlog.testing import capture_logs

from bridge.checkpoint_admin import stored_checkpoints
from bridge.config import load_settings
from bridge.membership import live_members
from bridge.replay import Replay, ReplayRequest
from bridge.replay_store import RunStore
from bridge.simulator import Faults, Scenario, SessionSpec, ThreadSpec, running_simulator
from tests.bridge_harness import (
    TOKEN,
    bridge_env,
    compare,
    running_bridge,
    simulator_logs,
    wait_for_delivery,
)
from tests.kafka_broker import KafkaTopics, read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

UNCOMMITTED = "read_uncommitted"
WAITING = "bridge.replay.waiting"

CHILDREN = 20
#: One session: a coordinator and 20 children, 400 events, there from the start.
SESSION = SessionSpec(
    coordinator=ThreadSpec(events=40, rate=0),
    children=tuple(ThreadSpec(events=14, rate=0) for _ in range(CHILDREN)),
)


def scenario(name: str, **kw: Any) -> Scenario:
    return Scenario(name=name, seed=11, instant=True, sessions=(SESSION,), **kw)


async def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "bridge", *argv], env={**os.environ, **env}, check=False
    )


# -- finding 1: one transient API error throws the whole attempt away -------------------------


async def test_replay_completes_under_api_faults_the_bridge_delivers_through(
    kafka_bootstrap, kafka_topics
):
    """Scenario: the gateway answers 30 % of requests with 429 (Retry-After: 1), 503 or a
    connection reset (qoder-api.md 8.3: burst suppression). A bridge at the default request
    budget (50/s) delivers a session of 21 threads (400 events) through it; then an operator
    replays that session with the same settings. Expected: the replay completes too (exit 0),
    every event once. Found: the session lookup gives up after 4 tries ("the API did not
    answer for session ..."), and past it a single failed request ends the whole attempt (the
    uncommitted batch is dropped, topics, producer and progress are set up again, its own
    backoff of 1, 2, 4 ... 15 s ignores Retry-After); 8 attempts in a row that commit nothing
    and it gives up: exit 1, "gave up after 8 failures in a row"."""
    target = kafka_topics.events + ".replayed"
    faults = Faults(error_rate=0.3, retry_after_s=1)
    async with running_simulator(scenario("faults", faults=faults), token=TOKEN) as sim:
        (session_id,) = sim.session_ids()
        env = bridge_env(sim.base_url, kafka_bootstrap, kafka_topics, BRIDGE_API_MAX_RPS="50")
        async with running_bridge(load_settings(env)):
            _, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=90
            )
        assert (delivery.lost, delivery.duplicated) == (0, 0), delivery.summary()

        done = await cli(env, "replay", "--session", session_id, "--topic", target)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        records = await read_topic(kafka_bootstrap, target)
        result = compare(records, simulator_logs(sim))
        assert (result.lost, result.duplicated, result.misordered) == (0, 0, 0), result.summary()


# -- finding 2: another run's open transaction hides this run's progress ----------------------


def replay_request(settings: Any, session_id: str, topic: str, thread_id: str | None = None):
    return ReplayRequest(
        session_id, thread_id, None, topic, settings.kafka.checkpoint_topic + ".replay"
    )


async def test_a_killed_replay_of_another_run_does_not_make_this_one_export_twice(
    kafka_bootstrap, kafka_topics
):
    """Scenario: an operator replays one thread of a session and kills it (kill -9, or Ctrl-C
    during a commit: the producer is stopped, never aborted); its transaction stays open on the
    shared progress topic until the transaction timeout (60 s). Within that minute the operator
    replays the whole session into the same topic, interrupts it (Ctrl-C) and runs it again.
    Expected: the second process resumes the run, and a read_committed consumer of the target
    sees each event once. Found: the progress is read to the end offsets read_committed, that
    is to the other run's open transaction (the last stable offset): the records this run
    committed after it are not seen, the run starts a new attempt and exports again what was
    already committed.

    (As fixed, no read_committed reader can get past that transaction before it ends: the
    second process waits for it, naming the run, and exports nothing meanwhile; the test ends
    the transaction, as its timeout would, once the process says it is waiting.)"""
    target = kafka_topics.events + ".replayed"
    async with running_simulator(scenario("lso"), token=TOKEN) as sim:
        (session_id,) = sim.session_ids()
        one_thread = sim.all_threads()[0][1]
        env = bridge_env(sim.base_url, kafka_bootstrap, kafka_topics)
        fast, slow = load_settings(env), load_settings({**env, "BRIDGE_API_MAX_RPS": "4"})
        ours = replay_request(fast, session_id, target)
        other = replay_request(fast, session_id, target, thread_id=one_thread)
        assert other.run_id != ours.run_id and other.progress_topic == ours.progress_topic

        # The other run as its killed process left it: topics made, a transaction open.
        store = RunStore(fast, other)
        await store.open()
        await store.close()
        killed = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap,
            transactional_id=other.transactional_id,
            enable_idempotence=True,
            acks="all",
            transaction_timeout_ms=fast.delivery.transaction_timeout_ms,
        )
        await killed.start()
        try:
            await killed.begin_transaction()
            progress = b'{"run_id":"%s","thread_id":"%s","last_event_id":null,"events":0}' % (
                other.run_id.encode(),
                one_thread.encode(),
            )
            key = f"{other.run_id}/{one_thread}".encode()
            await (await killed.send(other.progress_topic, progress, key=key))

            first = Replay(slow, ours)
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(first.run)
                    while first.events == 0:
                        await anyio.sleep(0.02)
                    tg.cancel_scope.cancel()  # Ctrl-C
            assert first.events > 0

            written = len(await read_topic(kafka_bootstrap, target, isolation_level=UNCOMMITTED))
            with capture_logs() as logs, anyio.fail_after(60):
                second = Replay(fast, ours)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(second.run)
                    # It does not go on from a read that stopped at the other run's open
                    # transaction: it waits for it to end, and says whose it is.
                    while not (waits := [e for e in logs if e["event"] == WAITING]):
                        await anyio.sleep(0.05)
                    assert waits[0]["blocking_run"] == other.run_id, waits
                    assert written == len(
                        await read_topic(kafka_bootstrap, target, isolation_level=UNCOMMITTED)
                    ), "exported more before its progress was read whole"
                    # The other run's transaction ends, as at its timeout: the run goes on.
                    await killed.abort_transaction()
        finally:
            await killed.stop()
        records = await read_topic(kafka_bootstrap, target)
        result = compare(records, simulator_logs(sim))
        assert (result.lost, result.duplicated, result.misordered) == (0, 0, 0), result.summary()
        assert second.resumed, "the run's own committed progress was not read back"


# -- finding 3: the tools' idea of an id is narrower than the bridge's -----------------------


def rename_thread(sim: Any, index: int, new_id: str) -> tuple[str, str]:
    """Give the session's ``index``-th thread another id (as the API would serve it)."""
    (session,) = sim.world.sessions
    thread = session.threads[index]
    del session.thread_index[thread.id]
    thread.id = new_id
    session.thread_index[new_id] = index
    return session.id, new_id


async def test_replay_and_reset_cover_every_thread_the_bridge_follows(
    kafka_bootstrap, kafka_topics
):
    """Scenario: the API serves a thread whose id has a '.' or ':' (the bridge's supervisor
    takes ids of letters, digits, '_', '-', '.' and ':', _SAFE_ID) and the bridge publishes it
    like any other. An operator replays the session, then asks for a reset of the session.
    Expected: the replay re-exports every thread the bridge published (or fails naming the one
    it cannot), and the reset's dry run lists it. Found: bridge.tooling drops every thread whose
    id is not [A-Za-z0-9_-] without a word: "replayed 386 events of 20 thread(s)", exit 0, that
    thread's history missing from the target; the reset says "20 thread(s)" and would leave its
    cursor as it is; `--thread` or `--session` with such an id exits 2 ("is not an id")."""
    target = kafka_topics.events + ".replayed"
    async with running_simulator(scenario("ids"), token=TOKEN) as sim:
        session_id, odd = rename_thread(sim, 1, "sthr.01:" + sim.all_threads()[1][1][5:])
        env = bridge_env(sim.base_url, kafka_bootstrap, kafka_topics)
        async with running_bridge(load_settings(env)):
            bridge_records, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=60
            )
        assert delivery.lost == 0, delivery.summary()
        assert f"{session_id}/{odd}".encode() in {r.key for r in bridge_records}

        done = await cli(env, "replay", "--session", session_id, "--topic", target)
        records = await read_topic(kafka_bootstrap, target)
        keys = {r.key.decode() for r in records}
        assert done.returncode != 0 or f"{session_id}/{odd}" in keys, done.stdout.decode()
        dry = await cli(env, "checkpoints", "reset", "--session", session_id, "--to-start")
        assert odd in dry.stdout.decode(), dry.stdout.decode()


# -- finding 4: a bridge that is not in the group is "no bridge is running" -------------------


def admin_env(sim: Any, bootstrap: str, topics: Any, **extra: str) -> dict[str, str]:
    """A group of the test's own: no other test's bridges in it."""
    group = f"{topics.transactional_id}.group"
    return bridge_env(sim.base_url, bootstrap, topics, BRIDGE_GROUP_ID=group, **extra)


#: One thread that runs for about 10 s: the bridge commits its cursor all along.
RUNNING = Scenario(
    name="running",
    seed=3,
    sessions=(SessionSpec(coordinator=ThreadSpec(events=150, rate=15)),),
)


async def test_reset_is_not_lost_under_a_bridge_that_runs_outside_the_group(
    kafka_bootstrap, kafka_topics
):
    """Scenario: a bridge runs and publishes a thread that is running, but the group the
    operator's reset asks is not the bridge's (BRIDGE_GROUP_ID differs between the two: a
    misconfiguration; before scale-out, also a bridge whose membership had failed, which now
    owns no shard and publishes nothing). An operator resets that thread --to-start with
    --execute. Expected: refused (exit 1), or else the reset holds. Found: the group is the
    only evidence asked; empty, the reset prints "no bridge is running", writes and exits 0,
    and the running bridge overwrites the checkpoint with its next commit: once it has
    stopped, the stored cursor is the thread's last event, the reset silently lost."""
    async with running_simulator(RUNNING, token=TOKEN) as sim:
        env = admin_env(sim, kafka_bootstrap, kafka_topics)
        elsewhere = {**env, "BRIDGE_GROUP_ID": env["BRIDGE_GROUP_ID"] + ".elsewhere"}
        kafka = load_settings(env).kafka
        ((session_id, thread_id),) = sim.all_threads()
        async with running_bridge(load_settings(env)):
            with anyio.fail_after(30):
                while len(await read_topic(kafka_bootstrap, kafka_topics.events)) < 10:
                    await anyio.sleep(0.2)
            reset = await cli(
                elsewhere, "checkpoints", "reset", "--session", session_id, "--thread", thread_id,
                "--to-start", "--execute",
            )  # fmt: skip
            with anyio.fail_after(60):
                await sim.wait_idle()
            _, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=60
            )
            assert delivery.lost == 0, delivery.summary()
        (row,) = await stored_checkpoints(kafka, session_id)
        said = reset.stdout.decode() + reset.stderr.decode()
        assert reset.returncode == 1 or row.checkpoint.last_event_id is None, (
            f"the reset said:\n{said}\nthe stored cursor now: {row.checkpoint.last_event_id}"
        )


# -- finding 5: another deployment in the same group blocks the reset ------------------------


async def test_a_bridge_of_another_deployment_in_the_group_does_not_block_a_reset(
    kafka_bootstrap, kafka_topics
):
    """Scenario: two deployments share a Kafka cluster and leave BRIDGE_GROUP_ID at its
    default (qoder-kafka-bridge): each has its own topics and checkpoint topic. Deployment A is
    stopped for maintenance; B runs. The operator resets one of A's threads with --execute.
    Expected: it is written (nothing owns A's checkpoints: B's member is subscribed to B's
    checkpoint topic, which the group's member metadata says). Found: refused, exit 1, naming
    B's bridge; the only way on is --force, which also silences the check for A's own bridge."""
    group = f"{kafka_topics.transactional_id}.shared-group"
    other = KafkaTopics.unique("other-deployment")
    async with running_simulator(scenario("groups"), token=TOKEN) as sim:
        env_a = bridge_env(sim.base_url, kafka_bootstrap, kafka_topics, BRIDGE_GROUP_ID=group)
        env_b = bridge_env(sim.base_url, kafka_bootstrap, other, BRIDGE_GROUP_ID=group)
        session_id, thread_id = sim.all_threads()[0]
        async with running_bridge(load_settings(env_a)):
            _, delivery = await wait_for_delivery(
                kafka_bootstrap, kafka_topics.events, sim, timeout_s=60
            )
            assert delivery.lost == 0, delivery.summary()
        b = load_settings(env_b)
        async with running_bridge(b):
            with anyio.fail_after(30):
                while not await live_members(b.kafka):
                    await anyio.sleep(0.2)
            reset = await cli(
                env_a, "checkpoints", "reset", "--session", session_id, "--thread", thread_id,
                "--to-start", "--execute",
            )  # fmt: skip
        assert reset.returncode == 0, reset.stdout.decode() + reset.stderr.decode()[-2000:]
        (row,) = [
            r
            for r in await stored_checkpoints(load_settings(env_a).kafka, session_id)
            if r.thread_id == thread_id
        ]
        assert row.checkpoint.last_event_id is None


# -- finding 6: list hides the settled marks ----------------------------------------------------


async def test_list_shows_that_the_bridge_will_not_look_at_a_settled_session(
    kafka_bootstrap, kafka_topics
):
    """Scenario: a bridge published a session and marked it settled (the record keyed by the
    session alone, CONTRACT "Checkpoints"): it will not look at it again until its updated_at
    moves, across restarts. An operator asks why the bridge ignores the session: `checkpoints
    list --session S` (table, then --json). Expected: the mark is there (its
    settled_updated_at), as it is the one stored fact that decides it; after a reset it is gone.
    Found: list reads the topic and drops every key without a '/': neither output says the
    session is settled, and nothing shows that a reset cleared the mark."""
    async with running_simulator(scenario("settled"), token=TOKEN) as sim:
        env = admin_env(sim, kafka_bootstrap, kafka_topics)
        (session_id,) = sim.session_ids()
        async with running_bridge(load_settings(env)):
            await wait_for_delivery(kafka_bootstrap, kafka_topics.events, sim, timeout_s=60)
            with anyio.fail_after(30):
                while not (
                    marks := [
                        r
                        for r in await read_topic(kafka_bootstrap, kafka_topics.checkpoints)
                        if r.key == session_id.encode()
                    ]
                ):
                    await anyio.sleep(0.2)
        settled_at = json.loads(marks[-1].value)["settled_updated_at"]
        table = await cli(env, "checkpoints", "list", "--session", session_id)
        listed = await cli(env, "checkpoints", "list", "--session", session_id, "--json")
        assert table.returncode == listed.returncode == 0
        for out in (table.stdout.decode(), listed.stdout.decode()):
            # (The session's updated_at can equal a thread's drain mark: the word must be there.)
            assert "settled" in out.lower() and settled_at in out, out


# -- finding 7: log lines are written into the bar -----------------------------------------------


def on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal of 160 columns; its exit status and the screen."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=terminal, stdin=subprocess.DEVNULL
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


async def test_the_bar_and_the_log_lines_do_not_share_a_line(kafka_bootstrap, kafka_topics):
    """Scenario: an operator replays, in a terminal with the default log format (console on a
    TTY), a session whose lists hold items that cannot be events (no id, not an object): each
    is skipped with a bridge.replay.skipped warning on stderr, where the bar is drawn. Expected:
    each warning on a line of its own and the bar below them (tqdm.write, or the log routed
    through tqdm). Found: the first warning is written straight after the bar, on the bar's
    line (no newline before it), the bar then redrawn further down."""
    target = kafka_topics.events + ".replayed"
    faults = Faults(malformed_item_rate=0.05)
    async with running_simulator(scenario("terminal", faults=faults), token=TOKEN) as sim:
        (session_id,) = sim.session_ids()
        env = {**os.environ, **bridge_env(sim.base_url, kafka_bootstrap, kafka_topics)}
        del env["BRIDGE_LOG_FORMAT"]  # the default: console on a terminal
        argv = [sys.executable, "-m", "bridge", "replay", "--session", session_id]
        code, screen = await anyio.to_thread.run_sync(
            on_a_terminal, [*argv, "--topic", target], env
        )
    assert code == 0, screen[-2000:]
    assert "bridge.replay.skipped" in screen
    mixed = [
        line
        for line in re.split(r"[\r\n]", screen)
        if " threads, " in line and "bridge.replay." in line
    ]
    assert not mixed, mixed[:3]
