"""Review of the scale-out implementation (issue 10: 469b4c5, 8723a31, 4c8beb3), as an attacker.

Each test is a finding on the code as it stands, marked strict-xfail: it fails today for the
reason it names, and passes once the finding is fixed. Unit tests with fakes: a publisher whose
producer is a model of Kafka's transactional fencing (an init with a transactional.id bumps its
epoch; a commit with an older epoch is fenced), the real ShardedPublisher and ShardManager.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from bridge import sharding
from bridge.checkpoint_index import CheckpointIndex
from bridge.config import DeliverySettings, Settings
from bridge.errors import ProducerFenced
from bridge.health import HealthState
from bridge.ownership import Assignment
from bridge.publisher import Outgoing, Publisher
from bridge.records import Record
from bridge.sharding import ShardedPublisher, ShardManager
from bridge.shards import shard_of

pytestmark = pytest.mark.anyio


def _session_in(shard: int) -> str:
    """A session id whose shard is ``shard``."""
    n = 0
    while shard_of(f"sess_{n}") != shard:
        n += 1
    return f"sess_{n}"


async def _until(condition: Callable[[], bool], within_s: float) -> bool:
    """Whether ``condition`` held within ``within_s`` (polled; the answer is the assertion)."""
    with anyio.move_on_after(within_s):
        while not condition():
            await anyio.sleep(0.01)
        return True
    return False


def _item(session_id: str, size: int) -> Outgoing:
    """A shard's item of about ``size`` bytes (a settled mark's shape: no cursor)."""
    record = Record("events", session_id.encode(), b"x" * size, [], partition=shard_of(session_id))
    return Outgoing(None, 0, [record], session_id=session_id)


# -- finding 1: a released or fenced shard publisher keeps the bytes of what it still held ------


@pytest.mark.parametrize("how", ["fenced", "release_timed_out"])
async def test_finding1_a_shard_let_go_with_work_queued_gives_its_budget_back(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Scenario: exactly_once, a member owns shards 3 and 5; the in-flight budget is 3 units.
    Shard 3's publisher is committing a batch of 1 unit (Kafka is slow) while a pump queues
    2 units more. Then shard 3 goes: either another member's producer fences it (the commit
    answers ProducerFenced), or the group moves it and its release gives up after
    RELEASE_WITHIN_S (the commit never answers). Shard 3's items are read again by the next
    owner from its checkpoint, so nothing of them is in flight any more.

    Expected: a pump of shard 5 (still owned, Kafka fine for it) submits 2 units and is taken.
    Today the 2 queued units stay counted in the budget forever (only the batch being
    committed is given back, in _publish_until_done's finally): shard 5's pump waits forever.
    Every fence or timed-out release with work queued leaks that much; a zombie back from a
    pause during a busy spell leaks up to BRIDGE_MAX_IN_FLIGHT_BYTES at once."""
    unit = 10_000
    size = _item("sess_x", unit).size
    delivery = dataclasses.replace(DeliverySettings(), max_in_flight_bytes=3 * size)
    settings = Settings(delivery=delivery)
    lost, kept = 3, 5
    committing = anyio.Event()
    answer = anyio.Event()
    committed: list[int] = []

    async def connect(self: Publisher) -> None:
        return None

    async def stop_producer(self: Publisher) -> None:
        return None

    async def publish(self: Publisher, batch: list[Outgoing], *, alone: bool = False) -> None:
        if self.shard == lost:
            committing.set()
            await answer.wait()
            if how == "fenced":
                raise ProducerFenced("another bridge started with our transactional.id")
            await anyio.sleep_forever()  # the commit never answers
        committed.extend(len(i.records) for i in batch)

    monkeypatch.setattr(Publisher, "_connect", connect)
    monkeypatch.setattr(Publisher, "_stop_producer", stop_producer)
    monkeypatch.setattr(Publisher, "_publish", publish)
    publisher = ShardedPublisher(settings, HealthState())
    fenced: list[int] = []
    publisher.on_fenced = fenced.append
    taken = False
    async with anyio.create_task_group() as tg:
        await tg.start(publisher.run)
        await publisher.acquire(lost)
        await publisher.acquire(kept)
        s_lost, s_kept = _session_in(lost), _session_in(kept)
        await publisher.submit(_item(s_lost, unit))  # the batch being committed
        with anyio.fail_after(5):
            await committing.wait()
        await publisher.submit(_item(s_lost, 2 * unit))  # queued behind it
        if how == "fenced":
            answer.set()
            assert await _until(lambda: fenced == [lost], 5)
        else:
            await publisher.release(lost)  # gives up after RELEASE_WITHIN_S
        with anyio.move_on_after(3):
            await publisher.submit(_item(s_kept, 2 * unit))
            taken = True
        publisher.close()
        tg.cancel_scope.cancel()
    assert taken, (
        f"shard {kept}'s pump waits forever: {publisher._budget.used} bytes of the shard let go "
        f"are still counted in flight (budget {publisher._budget.limit})"
    )


# -- finding 2: a gap assignment keeps an acquisition started before the gap ----------------


class FencingPublisher:
    """The ShardManager's side of ShardedPublisher, over a model of Kafka's transactional ids:
    each acquire inits the shard's producer (epoch + 1, which fences every older one); a
    commit by a producer whose epoch is older is fenced, as ShardedPublisher reports it."""

    def __init__(self) -> None:
        self.epochs: Counter[int] = Counter()
        self.mine: dict[int, int] = {}
        self.on_fenced: Callable[[int], None] = lambda shard: None

    async def acquire(self, shard: int) -> None:
        if shard in self.mine:
            return
        self.epochs[shard] += 1
        self.mine[shard] = self.epochs[shard]

    async def release(self, shard: int) -> None:
        await self.stop(self.detach(shard))

    # ShardedPublisher's release in two steps since the fix of finding 3: take no more at
    # once (detach), finish with what the publisher holds in the background (stop).
    def detach(self, shard: int) -> int | None:
        return shard if self.mine.pop(shard, None) is not None else None

    async def stop(self, state: int | None) -> None:
        return None

    def checkpoints_read(self, shard: int, end: int) -> None:
        return None

    @property
    def attached(self) -> frozenset[int]:
        return frozenset(self.mine)

    def other_member_inits(self, shard: int) -> None:
        self.epochs[shard] += 1

    def commit(self, shard: int) -> bool:
        """A pump's next transaction on the shard: committed, or fenced (and reported)."""
        epoch = self.mine.get(shard)
        if epoch is None:
            return False
        if epoch < self.epochs[shard]:
            del self.mine[shard]
            self.on_fenced(shard)
            return False
        return True


async def test_finding2_a_shard_acquired_across_a_gap_is_not_orphaned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scenario: generation 5 gives this member shard 7; its producer starts (epoch 1) and the
    checkpoint read begins. The member is then paused past the session timeout (SIGSTOP, GC,
    partition): generation 6 gives shard 7 to member B, whose producer fences ours (epoch 2).
    The member comes back; generation 7 (a gap: 6 was missed) gives shard 7 to it again, and
    B lets it go. The checkpoint read started before the pause ends; the first transaction of
    a pump of shard 7 is fenced (epoch 1 < 2).

    Expected: the member owns shard 7 with a producer started after the gap and commits (the
    gap rule, "every shard it holds may have been owned by someone else meanwhile: acquired
    again", applied to the one it was acquiring). Today the acquisition in flight is kept
    (the gap re-acquires only ``held``), the fence arrives under generation 7, and
    ``_fenced_under[7] == 7`` drops shard 7 for the very assignment that gives it to this
    member; B released it, so no member follows its sessions (1/32 of them) until an
    unrelated rebalance, which in a steady group never comes."""
    shard = 7
    reading = anyio.Event()
    read_may_end = anyio.Event()

    async def read_checkpoints(kafka: Any, keep: Any, **kwargs: Any) -> int:
        reading.set()
        await read_may_end.wait()
        return 0

    monkeypatch.setattr(sharding, "read_checkpoints", read_checkpoints)
    publisher = FencingPublisher()
    index = CheckpointIndex()
    manager = ShardManager(Settings(), publisher, index)  # type: ignore[arg-type]
    followed: list[int] = []
    manager.follow = followed.append
    owns_and_commits = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.run)
            manager.assigned(Assignment(frozenset({shard}), 5, gap=False))
            with anyio.fail_after(5):
                await reading.wait()
            publisher.other_member_inits(shard)  # generation 6: member B owns it
            manager.assigned(Assignment(frozenset({shard}), 7, gap=True))
            await anyio.sleep(0.1)
            read_may_end.set()
            assert await _until(lambda: shard in manager.held, 5)
            publisher.commit(shard)  # the first transaction of one of its pumps

            def settled() -> bool:
                return shard in manager.held and publisher.commit(shard)

            owns_and_commits = await _until(settled, 3)
            tg.cancel_scope.cancel()
    finally:
        index.close()
    assert owns_and_commits, (
        f"shard {shard} is assigned to this member (generation 7) but held={sorted(manager.held)}"
        f", fenced_under={manager._fenced_under}: no member follows its sessions"
    )


# -- finding 3: releases are sequential and hold up the shards gained -------------------------


class SlowReleasePublisher(FencingPublisher):
    """A release that takes its whole budget (a batch whose commit does not answer: Kafka slow
    or restarting), until the test lets it end."""

    def __init__(self) -> None:
        super().__init__()
        self.releasing: set[int] = set()
        self.may_end = anyio.Event()
        self.acquired: list[int] = []

    async def acquire(self, shard: int) -> None:
        self.acquired.append(shard)
        await super().acquire(shard)

    def detach(self, shard: int) -> int | None:
        self.releasing.add(shard)
        return super().detach(shard)

    async def stop(self, state: int | None) -> None:
        # The slow part of a release: the held batch's commit that does not answer.
        await self.may_end.wait()
        if state is not None:
            self.releasing.discard(state)


async def test_finding3_a_gained_shard_does_not_wait_for_the_release_of_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scenario (the issue's schedule: a member killed while another joins, Kafka slow): a
    member holds shards 0-7; the next assignment takes 0-6 away (to the newcomer) and gives it
    shard 20 (the killed member's). Shards 0-6's publishers cannot commit what they hold (a
    broker restarting): each release takes its bound, RELEASE_WITHIN_S to commit then as long
    again to stop, 4 s.

    Expected: shard 20's acquisition (its producer, its checkpoint read) starts at once; it
    does not depend on shards 0-6. Today run() awaits the 7 releases one by one and only then
    acquires: shard 20, whose previous owner is dead, has no owner for up to 7 x 4 s = 28 s,
    past the 15 s p99 failover target; an assignment arriving meanwhile waits as well."""

    async def read_checkpoints(kafka: Any, keep: Any, **kwargs: Any) -> int:
        return 0

    monkeypatch.setattr(sharding, "read_checkpoints", read_checkpoints)
    publisher = SlowReleasePublisher()
    index = CheckpointIndex()
    manager = ShardManager(Settings(), publisher, index)  # type: ignore[arg-type]
    started_while_releasing = False
    pending: list[int] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.run)
            manager.assigned(Assignment(frozenset(range(8)), 1, gap=False))
            assert await _until(lambda: manager.held == set(range(8)), 5)
            manager.assigned(Assignment(frozenset({7, 20}), 2, gap=False))
            assert await _until(lambda: bool(publisher.releasing), 5)
            started_while_releasing = await _until(lambda: 20 in publisher.acquired, 2)
            pending = sorted(publisher.releasing)
            publisher.may_end.set()
            tg.cancel_scope.cancel()
    finally:
        index.close()
    assert started_while_releasing, (
        f"shard 20 was not acquired while shard(s) {pending} were being released (of 0-6, "
        "one after another): a gained shard waits for every lost shard's release"
    )
