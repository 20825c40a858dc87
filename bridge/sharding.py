"""Owning shards: a producer per shard that fences the previous owner, then its checkpoints,
then its sessions; and letting them go within a bound.

:class:`ShardedPublisher` is what the pumps, the supervisor and the alerts submit to. With
``exactly_once`` it routes each item to the publisher of its session's shard: a transactional
producer with ``transactional.id = <BRIDGE_GROUP_ID>-<shard>``, started when the shard is
acquired, which fences whoever wrote the shard before (their open transaction is aborted, their
next send or commit fails with ProducerFenced). Items of no session (the bridge's own alerts)
go through the member's idempotent producer. With ``at_least_once`` there is nothing to fence
with: one idempotent producer carries everything.

:class:`ShardManager` turns the group's assignments (bridge/ownership.py) into that state, in
its own task, never in the group's callbacks:

- **acquire** a shard: start its producer (fencing), forget what this member knew of the
  shard and read its partition of the checkpoint topic ``read_committed`` to the end, then
  let the supervisor follow its sessions;
- **release** a shard: the supervisor stops its sessions' pumps at once (what they read and
  did not commit is read again by the next owner, from the checkpoint), then its publisher
  commits what it already holds or gives up within :data:`RELEASE_WITHIN_S`;
- a shard whose producer was **fenced** (another member took it while this one was paused) is
  dropped at once and taken again only from a later assignment;
- an assignment after **missed rebalances** (a generation gap) acquires every shard again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc
import structlog

from bridge import metrics
from bridge.checkpoint_index import CheckpointIndex
from bridge.checkpoints import read_checkpoints
from bridge.config import Settings
from bridge.errors import ProducerFenced, SinkUnavailable
from bridge.health import HealthState
from bridge.ownership import Assignment
from bridge.publisher import ByteBudget, Outgoing, Publisher, PublisherClosed
from bridge.shards import shard_of, transactional_id

__all__ = ["RELEASE_WITHIN_S", "ShardManager", "ShardedPublisher"]

log = structlog.get_logger("bridge.sharding")

#: A released shard's publisher commits what it holds within this, or is stopped.
RELEASE_WITHIN_S = 2.0
#: A fence with no assignment after it for this long (the group's session timeout): rejoin.
REJOIN_AFTER_FENCE_S = 6.0


@dataclass
class _Shard:
    publisher: Publisher
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


class ShardedPublisher:
    """The publisher the bridge's readers see (module docstring)."""

    def __init__(self, settings: Settings, health: HealthState) -> None:
        self._settings = settings
        self._health = health
        self._transactional = settings.delivery.mode == "exactly_once"
        self._budget = ByteBudget(settings.delivery.max_in_flight_bytes)
        #: The member's own producer: alerts, and everything with at_least_once.
        self.member = Publisher(settings, health, budget=self._budget)
        self._shards: dict[int, _Shard] = {}
        #: Shards let go whose publisher has not stopped yet.
        self._leaving: dict[int, _Shard] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False
        #: Called with a shard whose producer was fenced (set by the ShardManager).
        self.on_fenced: Callable[[int], None] = lambda shard: None
        metrics.CHECKPOINT_AGE.set_function(self._checkpoint_age)

    @property
    def sharded(self) -> bool:
        return self._transactional

    @property
    def drained(self) -> bool:
        """Everything submitted before close() was published, by every publisher still here."""
        return self.member.drained and all(s.publisher.drained for s in self._shards.values())

    def _checkpoint_age(self) -> float:
        last = max(
            [self.member.last_commit, *(s.publisher.last_commit for s in self._shards.values())]
        )
        return time.monotonic() - last

    # -- the readers' side -----------------------------------------------------------------

    def record_limit(self, topic: str) -> int:
        return self.member.record_limit(topic)

    async def submit(self, item: Outgoing) -> None:
        if not self._transactional:
            await self.member.submit(item)
            return
        session = item.cursor.thread.session_id if item.cursor is not None else item.session_id
        if session is None:
            await self.member.submit(item)
            return
        shard = self._shards.get(shard_of(session))
        if shard is None:
            # Released (or fenced) a moment ago: the next owner reads it from the checkpoint.
            raise PublisherClosed(f"shard {shard_of(session)} is not owned by this bridge")
        await shard.publisher.submit(item)

    def close(self) -> None:
        """No more work: every publisher publishes what it holds, then returns."""
        self._closed = True
        for shard in self._shards.values():
            shard.publisher.close()
        self.member.close()

    # -- the manager's side ----------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The member's producer, and the shards' while they are owned; returns once drained."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self.member.run)
            task_status.started()
        self._tg = None

    async def acquire(self, shard: int) -> None:
        """Start the shard's producer: with exactly_once this fences its previous owner.

        A shard let go by this member a moment ago (a gap assignment lets go of every shard and
        takes it again at once) is taken once its last publisher has stopped, committing what
        it held or not (within RELEASE_WITHIN_S): then the new producer is the newest, and the
        checkpoints read after it have whatever the last one committed."""
        if not self._transactional or shard in self._shards or self._closed:
            return
        assert self._tg is not None  # noqa: S101 -- run() is running
        if (leaving := self._leaving.get(shard)) is not None:
            await self.stop(leaving)
            if self._leaving.get(shard) is leaving:
                del self._leaving[shard]
            if shard in self._shards or self._closed:
                return
        group = self._settings.kafka.group_id
        publisher = Publisher(
            self._settings,
            self._health,
            budget=self._budget,
            transactional_id=transactional_id(group, shard),
            shard=shard,
            stop_timeout_s=RELEASE_WITHIN_S,
            topic_limits=self.member.topic_limits,
        )
        state = _Shard(publisher)
        self._shards[shard] = state
        try:
            await self._tg.start(self._run_shard, shard, state)
        except BaseException:
            if self._shards.get(shard) is state:
                del self._shards[shard]
            raise

    async def _run_shard(
        self, shard: int, state: _Shard, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        try:
            with state.scope:
                await state.publisher.run(task_status=task_status)
        except ProducerFenced as exc:
            if self._shards.get(shard) is not state:
                # Released already: the next owner started a moment before this one stopped.
                log.info("bridge.shard.handed_over", shard=shard)
            else:
                del self._shards[shard]
                log.info("bridge.shard.producer_fenced", shard=shard, error=str(exc))
                self.on_fenced(shard)
        finally:
            if self._leaving.get(shard) is state:
                del self._leaving[shard]
            state.done.set()

    @property
    def attached(self) -> frozenset[int]:
        """The shards with a publisher here (acquired, or started by an acquisition that was
        then cancelled)."""
        return frozenset(self._shards)

    def checkpoints_read(self, shard: int, end: int) -> None:
        """The shard's checkpoints were read up to ``end`` since its producer started."""
        state = self._shards.get(shard)
        if state is not None:
            state.publisher.checkpoints_read(end)

    async def release(self, shard: int) -> None:
        """Commit what the shard's publisher holds, or stop it, within RELEASE_WITHIN_S."""
        await self.stop(self.detach(shard))

    def detach(self, shard: int) -> _Shard | None:
        """Take no more for the shard (at once); :meth:`stop` finishes with what it holds."""
        state = self._shards.pop(shard, None)
        if state is not None:
            state.publisher.let_go()
            if not state.done.is_set():
                self._leaving[shard] = state
        return state

    async def stop(self, state: _Shard | None) -> None:
        if state is None:
            return
        with anyio.move_on_after(RELEASE_WITHIN_S):
            await state.done.wait()
        if not state.done.is_set():
            state.scope.cancel()  # an open transaction is aborted by the next owner's start
            with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_WITHIN_S):
                await state.done.wait()


class ShardManager:
    """From assignments to owned shards (module docstring)."""

    def __init__(
        self,
        settings: Settings,
        publisher: ShardedPublisher,
        checkpoints: CheckpointIndex,
    ) -> None:
        self._settings = settings
        self._publisher = publisher
        self._checkpoints = checkpoints
        publisher.on_fenced = self._fenced
        #: Shards acquired and followed.
        self.held: set[int] = set()
        self._latest: Assignment | None = None
        self._changed = anyio.Event()
        #: Set by the bridge: start and stop following a shard's sessions.
        self.follow: Callable[[int], None] = lambda shard: None
        self.unfollow: Callable[[int], None] = lambda shard: None
        #: Ask the group for a new assignment (set by the bridge: the member's consumer).
        self.rejoin: Callable[[], None] = lambda: None
        self._tg: anyio.abc.TaskGroup | None = None
        self._applied: Assignment | None = None
        self._acquiring: dict[int, anyio.CancelScope] = {}
        #: Shards fenced, and the generation of the assignment they were fenced under.
        self._fenced_under: dict[int, int | None] = {}
        #: Fenced since the last assignment: a hand-off or a zombie's, said once it comes.
        self._fence_pending: set[int] = set()
        metrics.SHARDS_OWNED.set_function(lambda: len(self.held))

    def assigned(self, assignment: Assignment) -> None:
        """From the group's callback: record, never wait."""
        # A fence is a hand-off when the shard moved in this very rebalance; one after missed
        # rebalances, or of a shard still ours, means this member was a zombie.
        for shard in sorted(self._fence_pending):
            if assignment.gap or shard in assignment.shards:
                log.error("bridge.shard.fenced", shard=shard, generation=assignment.generation)
                metrics.SHARDS_FENCED.inc()
            else:
                log.info("bridge.shard.handed_over", shard=shard)
        self._fence_pending.clear()
        log.info(
            "bridge.shards.assigned",
            shards=sorted(assignment.shards),
            generation=assignment.generation,
            gained=sorted(assignment.shards - self.held),
            lost=sorted(self.held - assignment.shards),
            gap=assignment.gap,
        )
        self._latest = assignment
        self._changed.set()

    def _fenced(self, shard: int) -> None:
        """Another member's producer fenced the shard: drop it until a new assignment. One
        comes at once when the shard moved in a rebalance; if none comes, ask the group for
        one (the fence may be a late start of a member that lost the shard: waiting for an
        unrelated rebalance could leave it unowned for good)."""
        self._fence_pending.add(shard)
        if self._tg is not None:
            self._tg.start_soon(self._rejoin_unless_assigned, self._latest)
        self._fenced_under[shard] = self._latest.generation if self._latest else None
        if (acquiring := self._acquiring.get(shard)) is not None:
            acquiring.cancel()  # else it would end held, followed, and without a producer
        if shard in self.held:
            self.held.discard(shard)
            self.unfollow(shard)
        self._changed.set()

    async def _rejoin_unless_assigned(self, since: Assignment | None) -> None:
        await anyio.sleep(REJOIN_AFTER_FENCE_S)
        if self._latest is since and self._fence_pending:
            log.info("bridge.shards.rejoin", fenced=sorted(self._fence_pending))
            self.rejoin()

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._apply_assignments(tg)
        finally:
            self._tg = None  # a fence while the shards drain is recorded, nothing started

    async def _apply_assignments(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            await self._changed.wait()
            self._changed = anyio.Event()
            assignment = self._latest
            if assignment is None:
                continue
            wanted = set(assignment.shards)
            # Attached too: a cancelled acquisition of several shards leaves the publishers it
            # started, which nothing else would let go if the shard is not wanted any more.
            ours = self.held | set(self._acquiring) | self._publisher.attached
            lost = ours - wanted
            if assignment.gap and assignment is not self._applied:
                # Maybe someone else's meanwhile (held or being acquired): take it again,
                # with a new producer that fences whoever wrote since. (Once: this loop
                # runs the same assignment again after a cancelled acquisition.)
                lost |= ours & wanted
            self._applied = assignment
            # A fenced shard is taken back only from a later assignment than the one under
            # which it was fenced.
            dropped = {
                shard
                for shard, generation in self._fenced_under.items()
                if generation == assignment.generation
            }
            self._fenced_under = {s: g for s, g in self._fenced_under.items() if s in dropped}
            # Let go of the lost ones at once, and finish with their publishers in the
            # background: a gained shard never waits for another's release.
            for shard in sorted(lost):
                tg.start_soon(self._finish_release, shard, self._release(shard))
            gained = sorted(wanted - self.held - set(self._acquiring) - dropped)
            if gained:
                tg.start_soon(self._acquire, gained)

    def _release(self, shard: int) -> _Shard | None:
        """Stop following the shard and take no more for it, now; its publisher's state."""
        scope = self._acquiring.pop(shard, None)
        if scope is not None:
            scope.cancel()
        if shard in self.held:
            self.held.discard(shard)
            self.unfollow(shard)
        return self._publisher.detach(shard)

    async def _finish_release(self, shard: int, state: _Shard | None) -> None:
        await self._publisher.stop(state)
        log.info("bridge.shard.released", shard=shard)

    async def _acquire(self, shards: list[int]) -> None:
        """Acquire the shards one assignment gained, together: their producers at once, then
        one read of their checkpoint partitions, then follow them."""
        started = anyio.current_time()
        with anyio.CancelScope() as scope:
            for shard in shards:
                self._acquiring[shard] = scope
            try:
                async with anyio.create_task_group() as tg:
                    for shard in shards:
                        tg.start_soon(self._publisher.acquire, shard)  # fences the last owner
                delay = 0.5
                while True:
                    try:
                        for shard in shards:
                            self._checkpoints.forget_shard(shard)
                        ends: dict[int, int] = {}
                        await read_checkpoints(
                            self._settings.kafka, self._checkpoints.load, shards=shards, ends=ends
                        )
                        for shard in shards:
                            self._publisher.checkpoints_read(shard, ends.get(shard, 0))
                        break
                    except SinkUnavailable as exc:
                        log.warning(
                            "bridge.shard.checkpoints_unreadable", shards=shards, error=str(exc)
                        )
                        await anyio.sleep(delay)
                        delay = min(delay * 2, 10.0)
            finally:
                for shard in shards:
                    if self._acquiring.get(shard) is scope:
                        del self._acquiring[shard]
        if scope.cancel_called:
            # One of them was lost (or fenced) meanwhile, maybe where no cancellation could be
            # raised (the read stops its consumer shielded): the others are acquired again.
            self._changed.set()
            return
        took = anyio.current_time() - started
        for shard in shards:
            self.held.add(shard)
            self.follow(shard)
            metrics.SHARD_RESUME.observe(took)
            log.info("bridge.shard.acquired", shard=shard, took_s=round(took, 3))
