"""A shard's producer replaced while someone else may own the shard: nothing twice.

The fence between two owners of a shard is the producer epoch of its transactional.id: the
newest producer started wins, every older one is fenced. A publisher that starts a second
producer of its own (after a broker error, a commit whose outcome is unknown) is the newest
again, and would commit what it still holds over whatever the other owner committed since.
These scenarios run against the real broker; a read_committed consumer counts the topic.

Found by CI (tests/test_bridge_chaos.py::test_chaos_broker_killed_twice_exactly_once: one
event twice in 5,400): a broker restart makes the group's next assignment a gap, every shard
is let go and acquired again at once, and the publisher let go was still replacing its
producer while the new one started.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import TransactionalIdAuthorizationFailed

from bridge import publisher as publisher_module
from bridge import sharding
from bridge.checkpoint_index import CheckpointIndex
from bridge.checkpoints import read_checkpoints, settled_record
from bridge.config import Settings
from bridge.cursor import ThreadCursor
from bridge.errors import SinkForbidden, SinkUnavailable
from bridge.health import HealthState
from bridge.ownership import Assignment
from bridge.publisher import Outgoing, Publisher
from bridge.records import Event, ThreadRef, event_record
from bridge.sharding import RELEASE_WITHIN_S, ShardedPublisher, ShardManager
from bridge.shards import shard_of
from tests.bridge_harness import bridge_settings
from tests.kafka_broker import read_topic

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

SHARD = 9


def _session_in(shard: int) -> str:
    n = 0
    while shard_of(f"sess_{n}") != shard:
        n += 1
    return f"sess_{n}"


def _outgoing(settings: Settings, cursor: ThreadCursor, event_id: str) -> Outgoing:
    data = f'{{"id":"{event_id}","type":"message"}}'.encode()
    record = event_record(settings.kafka.topic, cursor.thread, Event(event_id, "message", data, {}))
    cursor.mark_submitted(cursor.epoch, event_id)
    return Outgoing(cursor, cursor.epoch, [record], event_id=event_id, event_type="message")


async def _until(condition, within_s: float) -> None:
    with anyio.fail_after(within_s):
        while not condition():
            await anyio.sleep(0.02)


class BrokenOnce:
    """The first batch of the first publisher (once ``armed``) fails as a broker going away
    makes it fail; that publisher's next producer starts only once ``may_start`` is set (the
    broker is back)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, armed: bool = True) -> None:
        self.armed = armed
        self.first: Publisher | None = None
        self.failed = anyio.Event()
        self.may_start = anyio.Event()
        #: Set by a test that wants the failing batch to hang until then (Kafka not answering).
        self.may_fail: anyio.Event | None = None
        publish, start = Publisher._publish, Publisher._start_producer

        async def broken_publish(publisher: Publisher, batch, **kwargs) -> None:
            if self.first is None:
                self.first = publisher
            if publisher is self.first and self.armed and not self.failed.is_set():
                self.failed.set()
                if self.may_fail is not None:
                    await self.may_fail.wait()
                raise SinkUnavailable("the broker went away (injected)")
            await publish(publisher, batch, **kwargs)

        async def late_start(publisher: Publisher) -> None:
            if publisher is self.first and self.failed.is_set():
                await self.may_start.wait()
            await start(publisher)

        monkeypatch.setattr(Publisher, "_publish", broken_publish)
        monkeypatch.setattr(Publisher, "_start_producer", late_start)


async def _next_owner_commits(
    settings: Settings, publisher: ShardedPublisher, ref: ThreadRef, event_id: str
) -> ThreadCursor:
    """What ShardManager and a pump do: acquire the shard (its producer starts), read the
    shard's checkpoints, and publish the thread's event unless the checkpoint has it."""
    await publisher.acquire(SHARD)
    index = CheckpointIndex()
    await read_checkpoints(settings.kafka, index.load, shards=[SHARD])
    checkpoint = index.get(ref.key)
    cursor = ThreadCursor(ref, checkpoint.last_event_id if checkpoint else None)
    if cursor.committed_id != event_id:
        await publisher.submit(_outgoing(settings, cursor, event_id))
        await _until(lambda: cursor.committed_id == event_id, 20)
    return cursor


@pytest.mark.parametrize("next_owner", ["this member again", "another member"])
async def test_a_shard_let_go_while_its_producer_is_replaced_publishes_each_event_once(
    kafka_bootstrap, kafka_topics, monkeypatch, next_owner
):
    """Scenario: exactly_once; a member owns shard 9, threads a and b of one session in it.
    Kafka goes away: the batch holding a's event fails, and the shard's publisher waits to
    replace its producer, holding b's event (read meanwhile). The broker comes back and the
    shard is let go (detach, the rest in the background, as ShardManager does): either the
    group's assignment is a gap and this member takes the shard again at once, or the group
    gives it to another member. The next owner starts its producer, reads the checkpoints and
    commits b's event; only then could the old publisher's new producer start.

    Expected: b's event is in the topic once. Before the fix, the old publisher started a new
    producer even though its shard was let go: it fenced the next owner's and committed b's
    event a second time."""
    settings = bridge_settings("http://127.0.0.1:9", kafka_bootstrap, kafka_topics)
    await kafka_topics.create(kafka_bootstrap)
    broken = BrokenOnce(monkeypatch)
    session = _session_in(SHARD)
    member = ShardedPublisher(settings, HealthState())
    other = ShardedPublisher(settings, HealthState())
    async with anyio.create_task_group() as tg:
        await tg.start(member.run)
        await tg.start(other.run)
        await member.acquire(SHARD)
        a = ThreadCursor(ThreadRef(session, "sthr_a"))
        await member.submit(_outgoing(settings, a, "evt_a1"))
        with anyio.fail_after(10):
            await broken.failed.wait()
        b = ThreadCursor(ThreadRef(session, "sthr_b"))
        await member.submit(_outgoing(settings, b, "evt_b1"))  # held by the old publisher

        tg.start_soon(member.stop, member.detach(SHARD))
        next_owner_is = member if next_owner == "this member again" else other

        async def next_owner_then_broker_back() -> None:
            await _next_owner_commits(settings, next_owner_is, b.thread, "evt_b1")
            broken.may_start.set()

        tg.start_soon(next_owner_then_broker_back)
        await anyio.sleep(1 + 2 * RELEASE_WITHIN_S)  # past the old publisher's bound
        with anyio.fail_after(20):
            await broken.may_start.wait()
        await anyio.sleep(2)  # what the old publisher does with its new producer, if any
        member.close()
        other.close()
    events = await read_topic(kafka_bootstrap, kafka_topics.events)
    counts = Counter(r.value for r in events)
    assert counts == {b'{"id":"evt_b1","type":"message"}': 1}, counts


@dataclass
class _Members:
    settings: Settings
    session: str
    a: ShardedPublisher
    b: ShardedPublisher
    fenced_a: list[int] = field(default_factory=list)
    fenced_b: list[int] = field(default_factory=list)


@asynccontextmanager
async def _a_owns_then_fails(
    kafka_bootstrap: str, kafka_topics, broken: BrokenOnce
) -> AsyncIterator[_Members]:
    """Members A and B running; A owns shard 9 and has committed evt_z1 (so it knows its
    checkpoint partition); then its batch with evt_a1 goes to ``broken`` (armed now). Both
    members are closed when the block ends."""
    settings = bridge_settings("http://127.0.0.1:9", kafka_bootstrap, kafka_topics)
    await kafka_topics.create(kafka_bootstrap)
    session = _session_in(SHARD)
    members = _Members(
        settings,
        session,
        ShardedPublisher(settings, HealthState()),
        ShardedPublisher(settings, HealthState()),
    )
    members.a.on_fenced = members.fenced_a.append
    members.b.on_fenced = members.fenced_b.append
    async with anyio.create_task_group() as tg:
        await tg.start(members.a.run)
        await tg.start(members.b.run)
        await _next_owner_commits(settings, members.a, ThreadRef(session, "sthr_z"), "evt_z1")
        broken.armed = True
        a = ThreadCursor(ThreadRef(session, "sthr_a"))
        await members.a.submit(_outgoing(settings, a, "evt_a1"))
        yield members
        members.a.close()
        members.b.close()


async def _counts(kafka_bootstrap: str, topic: str) -> Counter[bytes]:
    return Counter(r.value for r in await read_topic(kafka_bootstrap, topic))


def _events(*ids: str) -> dict[bytes, int]:
    return {f'{{"id":"{i}","type":"message"}}'.encode(): 1 for i in ids}


async def test_a_member_that_missed_losing_its_shard_publishes_nothing_over_the_next_owner(
    kafka_bootstrap, kafka_topics, monkeypatch
):
    """Scenario: exactly_once; member A owns shard 9 and holds b's event while its producer
    is replaced (the batch before failed: Kafka away). A does not know yet that it lost the
    shard (paused past the session timeout, partitioned from the group coordinator): member
    B acquired it, read the checkpoints and committed b's event. Then A's new producer starts:
    it is the newest of the transactional.id, so B's fence no longer stops A.

    Expected: b's event is in the topic once; A stops publishing for the shard (as if fenced:
    the group decides who has it). aiokafka cannot tie a transaction to the group generation
    (KIP-447: its TxnOffsetCommit is v0), so the bridge checks who wrote the shard's checkpoint
    partition since its last commit, after its new producer started."""
    broken = BrokenOnce(monkeypatch, armed=False)
    async with _a_owns_then_fails(kafka_bootstrap, kafka_topics, broken) as members:
        with anyio.fail_after(10):
            await broken.failed.wait()
        b = ThreadCursor(ThreadRef(members.session, "sthr_b"))
        await members.a.submit(_outgoing(members.settings, b, "evt_b1"))  # held by A

        await _next_owner_commits(members.settings, members.b, b.thread, "evt_b1")
        broken.may_start.set()
        with anyio.move_on_after(10):
            await _until(lambda: members.fenced_a == [SHARD], 10)
        await anyio.sleep(1)
    counts = await _counts(kafka_bootstrap, kafka_topics.events)
    assert counts == _events("evt_z1", "evt_b1"), counts
    assert members.fenced_a == [SHARD], "A went on publishing for a shard someone else wrote since"


async def test_a_member_that_missed_losing_its_shard_leaves_the_next_owner_undisturbed(
    kafka_bootstrap, kafka_topics, monkeypatch
):
    """Scenario: as above, but member B has committed b's event before A's batch fails (A's
    commit hung while Kafka was away), so A learns it lost the shard before it starts a new
    producer.

    Expected: b's event is in the topic once, A stops publishing for the shard, and B is not
    fenced by A: B's next event is committed too."""
    broken = BrokenOnce(monkeypatch, armed=False)
    broken.may_fail = anyio.Event()
    broken.may_start.set()
    async with _a_owns_then_fails(kafka_bootstrap, kafka_topics, broken) as members:
        with anyio.fail_after(10):
            await broken.failed.wait()  # A's batch hangs
        b = ThreadCursor(ThreadRef(members.session, "sthr_b"))
        await members.a.submit(_outgoing(members.settings, b, "evt_b1"))  # held by A

        b_of_b = await _next_owner_commits(members.settings, members.b, b.thread, "evt_b1")
        broken.may_fail.set()
        with anyio.move_on_after(10):
            await _until(lambda: members.fenced_a == [SHARD], 10)
        await members.b.submit(_outgoing(members.settings, b_of_b, "evt_b2"))
        with anyio.move_on_after(10):
            await _until(lambda: b_of_b.committed_id == "evt_b2" or bool(members.fenced_b), 10)
    counts = await _counts(kafka_bootstrap, kafka_topics.events)
    assert counts == _events("evt_z1", "evt_b1", "evt_b2"), counts
    assert members.fenced_a == [SHARD], "A went on publishing for a shard someone else wrote since"
    assert members.fenced_b == [], "A's new producer fenced the shard's owner"


async def test_a_publisher_whose_producer_is_replaced_alone_goes_on(
    kafka_bootstrap, kafka_topics, monkeypatch
):
    """Scenario: exactly_once, one member; a batch fails after two were committed and the
    shard's publisher replaces its producer. No one else wrote the shard: its own checkpoints
    (and settled marks) are its own, so it goes on, and every event is in the topic once."""
    settings = bridge_settings("http://127.0.0.1:9", kafka_bootstrap, kafka_topics)
    await kafka_topics.create(kafka_bootstrap)
    broken = BrokenOnce(monkeypatch, armed=False)
    broken.may_start.set()
    session = _session_in(SHARD)
    member = ShardedPublisher(settings, HealthState())
    fenced: list[int] = []
    member.on_fenced = fenced.append
    async with anyio.create_task_group() as tg:
        await tg.start(member.run)
        z = await _next_owner_commits(settings, member, ThreadRef(session, "sthr_z"), "evt_z1")
        mark = settled_record(settings.kafka.checkpoint_topic, session, "2026-11-30T00:00:00Z")
        await member.submit(Outgoing(None, 0, [mark], session_id=session))
        await member.submit(_outgoing(settings, z, "evt_z2"))
        await _until(lambda: z.committed_id == "evt_z2", 10)
        broken.armed = True
        await member.submit(_outgoing(settings, z, "evt_z3"))  # fails: read again, as a pump
        await _until(lambda: broken.failed.is_set() and z.epoch == 1, 10)
        await member.submit(_outgoing(settings, z, "evt_z3"))
        await _until(lambda: z.committed_id == "evt_z3", 20)
        member.close()
    events = await read_topic(kafka_bootstrap, kafka_topics.events)
    assert [r.value for r in events] == [
        b'{"id":"evt_z1","type":"message"}',
        b'{"id":"evt_z2","type":"message"}',
        b'{"id":"evt_z3","type":"message"}',
    ]
    assert fenced == []


class _Acquiring:
    """The ShardManager's side of ShardedPublisher: acquisitions that take no time (a shard
    with a publisher is not started again), and a fence the test reports while the shard's
    checkpoints are being read."""

    def __init__(self) -> None:
        self.on_fenced = lambda shard: None
        self.started: list[int] = []
        self.publishers: set[int] = set()

    @property
    def attached(self) -> frozenset[int]:
        return frozenset(self.publishers)

    def fence(self, shard: int) -> None:
        """As ShardedPublisher._run_shard does on ProducerFenced."""
        self.publishers.discard(shard)
        self.on_fenced(shard)

    async def acquire(self, shard: int) -> None:
        if shard not in self.publishers:
            self.publishers.add(shard)
            self.started.append(shard)

    def detach(self, shard: int) -> None:
        self.publishers.discard(shard)

    async def stop(self, state: object) -> None:
        return None

    def checkpoints_read(self, shard: int, end: int) -> None:
        return None


@asynccontextmanager
async def _managing(
    publisher: _Acquiring, manager_class: type[ShardManager] = ShardManager
) -> AsyncIterator[tuple[ShardManager, list[int]]]:
    """A running ShardManager over ``publisher``, and the shards it followed; stopped (as by
    a drain: its task group cancelled) when the block ends."""
    index = CheckpointIndex()
    manager = manager_class(Settings(), publisher, index)  # type: ignore[arg-type]
    followed: list[int] = []
    manager.follow = followed.append
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.run)
            yield manager, followed
            tg.cancel_scope.cancel()
    finally:
        index.close()


@pytest.mark.parametrize("when", ["while they are read", "as the read closes its consumer"])
async def test_a_shard_fenced_while_it_is_acquired_is_not_held_without_a_producer(
    monkeypatch, when
):
    """Scenario: generation 5 gives shard 9; its producer starts, and while its checkpoints
    are read the producer reports it was fenced (another member's producer started, or its
    own was replaced before it knew the checkpoints). Generation 6 gives shard 9 again.

    Expected: the fenced acquisition is not completed (a shard followed by a member with no
    producer for it is followed by no one: every submit is refused); generation 6 acquires
    it with a new producer. Before, the acquisition went on: held and followed without a
    producer, and generation 6 gained nothing (shard 9 was held). Review finding: a fence
    that came while the read stopped its consumer (shielded) was not seen either."""
    reading, read_may_end = anyio.Event(), anyio.Event()

    async def slow_read(kafka, keep, **kwargs) -> int:
        reading.set()
        if when == "while they are read":
            await read_may_end.wait()
        else:  # read_checkpoints stops its consumer shielded: no cancellation is raised there
            with anyio.CancelScope(shield=True):
                await read_may_end.wait()
        return 0

    monkeypatch.setattr(sharding, "read_checkpoints", slow_read)
    publisher = _Acquiring()
    async with _managing(publisher) as (manager, followed):
        manager.assigned(Assignment(frozenset({SHARD}), 5, gap=False))
        with anyio.fail_after(5):
            await reading.wait()
        publisher.fence(SHARD)
        read_may_end.set()
        await anyio.sleep(0.2)
        held_after_fence = set(manager.held)
        reading = anyio.Event()
        manager.assigned(Assignment(frozenset({SHARD}), 6, gap=False))
        with anyio.move_on_after(5):
            while SHARD not in manager.held:
                await anyio.sleep(0.02)
    assert held_after_fence == set(), "held and followed without a producer after a fence"
    assert publisher.started == [SHARD, SHARD] and followed == [SHARD]


async def test_a_shard_let_go_while_its_read_closes_is_not_held(monkeypatch):
    """Scenario: generation 5 gives shard 9; while its checkpoint read stops its consumer
    (shielded), generation 6 gives this member nothing. Expected: shard 9 is not held nor
    followed (another member owns it now). Review finding: the acquisition, cancelled where no
    cancellation could be raised, completed."""
    closing, may_close = anyio.Event(), anyio.Event()

    async def read(kafka, keep, **kwargs) -> int:
        with anyio.CancelScope(shield=True):
            closing.set()
            await may_close.wait()
        return 0

    monkeypatch.setattr(sharding, "read_checkpoints", read)
    async with _managing(_Acquiring()) as (manager, followed):
        manager.assigned(Assignment(frozenset({SHARD}), 5, gap=False))
        with anyio.fail_after(5):
            await closing.wait()
        manager.assigned(Assignment(frozenset(), 6, gap=False))
        await anyio.sleep(0.1)
        may_close.set()
        await anyio.sleep(0.2)
    assert (manager.held, followed) == (set(), [])


async def test_a_fence_after_the_shards_stopped_being_managed_is_not_a_crash():
    """Scenario: SIGTERM: the bridge's readers (ShardManager.run among them) are cancelled
    while the shards' publishers drain; one of them is fenced meanwhile. Expected: the fence
    is recorded and nothing raises (the other shards' last commits go on). Review finding:
    ShardManager._fenced started a task in the task group that had ended: RuntimeError, exit 1."""
    async with _managing(_Acquiring()) as (manager, _):
        await anyio.sleep(0.05)
    manager._fenced(SHARD)
    assert SHARD not in manager.held


async def test_a_transactional_id_the_bridge_may_not_use_is_fatal_with_its_name(
    kafka_bootstrap, kafka_topics, monkeypatch
):
    """Scenario: exactly_once; Kafka refuses the shard's transactional.id by ACL (no Write on
    the TransactionalId). Expected: acquiring the shard fails with SinkForbidden naming the
    transactional.id (the bridge exits with its fatal code and says what to grant). Review
    finding: it was taken for a fence: the shard dropped, a rejoin every 6 s, for ever."""
    settings = bridge_settings("http://127.0.0.1:9", kafka_bootstrap, kafka_topics)
    await kafka_topics.create(kafka_bootstrap)
    start = AIOKafkaProducer.start

    async def refused(producer: AIOKafkaProducer) -> None:
        if producer._txn_manager is not None and producer._txn_manager.transactional_id:
            raise TransactionalIdAuthorizationFailed()
        await start(producer)

    monkeypatch.setattr(AIOKafkaProducer, "start", refused)
    publisher = ShardedPublisher(settings, HealthState())
    fenced: list[int] = []
    publisher.on_fenced = fenced.append
    with pytest.raises(BaseExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            await tg.start(publisher.run)
            with anyio.fail_after(20):
                await publisher.acquire(SHARD)
    forbidden = caught.value.subgroup(SinkForbidden)
    assert forbidden is not None, caught.value
    assert f"transactional.id {settings.kafka.group_id}-{SHARD}" in str(forbidden.exceptions[0])
    assert fenced == []


async def test_a_shard_let_go_while_its_publisher_checks_who_wrote_starts_no_producer(
    kafka_bootstrap, kafka_topics, monkeypatch
):
    """Scenario: exactly_once; member A's batch fails and its shard publisher, before it
    starts a new producer, reads who wrote its checkpoint partition. Meanwhile member B takes
    the shard (its producer starts, nothing committed yet) and A learns it lost it (detach).
    Expected: A starts no producer: B is not fenced and its event is committed once. Review
    finding: the let-go was looked at only before the check and after the producer started,
    so A's producer started in between and fenced B."""
    broken = BrokenOnce(monkeypatch, armed=False)
    broken.may_start.set()
    checking, may_answer = anyio.Event(), anyio.Event()
    original = publisher_module.foreign_checkpoints

    async def slow_check(kafka, shard, start, writer, **kwargs) -> int:
        if broken.first is not None and writer == broken.first._writer[1]:
            checking.set()
            await may_answer.wait()
        return await original(kafka, shard, start, writer, **kwargs)

    monkeypatch.setattr(publisher_module, "foreign_checkpoints", slow_check)
    async with _a_owns_then_fails(kafka_bootstrap, kafka_topics, broken) as members:
        with anyio.fail_after(10):
            await checking.wait()  # A's batch failed; A reads who wrote, before a new producer
        await members.b.acquire(SHARD)
        members.b.checkpoints_read(SHARD, 0)
        members.a.detach(SHARD)  # A learns it lost the shard; its publisher ends by itself
        await anyio.sleep(0.1)
        may_answer.set()
        await anyio.sleep(1)
        b = ThreadCursor(ThreadRef(members.session, "sthr_b"))
        await members.b.submit(_outgoing(members.settings, b, "evt_b1"))
        with anyio.move_on_after(10):
            await _until(lambda: b.committed_id == "evt_b1" or bool(members.fenced_b), 10)
    counts = await _counts(kafka_bootstrap, kafka_topics.events)
    assert counts == _events("evt_z1", "evt_b1"), counts
    assert members.fenced_b == [], "A's producer, started after A let the shard go, fenced B"


async def test_a_publisher_started_by_a_cancelled_acquisition_is_let_go_when_not_wanted(
    monkeypatch,
):
    """Scenario: generation 5 gives shards 3 and 9, acquired together: both producers start,
    then shard 3 is fenced while their checkpoints are read, which cancels the acquisition of
    both; before it is taken up again, generation 6 gives this member nothing. Expected: shard
    9's publisher is let go too (its producer closed; another member owns it now). Second
    review's finding: it stayed, for the life of the process, and a later assignment of shard
    9 reused it without starting a producer (no fence of whoever had it meanwhile)."""
    reading, may_end = anyio.Event(), anyio.Event()

    async def read(kafka, keep, **kwargs) -> int:
        reading.set()
        await may_end.wait()
        return 0

    monkeypatch.setattr(sharding, "read_checkpoints", read)
    generation_6 = Assignment(frozenset(), 6, gap=False)

    class Manager(ShardManager):
        async def _acquire(self, shards: list[int]) -> None:
            await super()._acquire(shards)
            if shards == [3, SHARD]:
                self.assigned(generation_6)  # the group's callback, before the loop wakes

    publisher = _Acquiring()
    async with _managing(publisher, Manager) as (manager, _):
        manager.assigned(Assignment(frozenset({3, SHARD}), 5, gap=False))
        with anyio.fail_after(5):
            await reading.wait()
        publisher.fence(3)
        await anyio.sleep(0.05)
        may_end.set()
        await anyio.sleep(0.2)
    assert (manager.held, publisher.attached) == (set(), frozenset())
