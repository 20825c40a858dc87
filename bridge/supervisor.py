"""Keeps one pump per running thread of every followed session.

The thread list (GET) is the truth; the session event stream is a hint that makes the
supervisor look again within a second when a thread is created or changes status, and polling
every ``poll_interval_s`` is the safety net. A thread that is no longer running is drained: its
pump reads what is left through the list and stops. A thread that ran while nobody was looking
(``updated_at`` newer than what was last drained) gets a catch-up pass through the list.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeGuard

import anyio
import anyio.abc
import structlog

from bridge import metrics
from bridge.alerts import BridgeAlerts
from bridge.api import BACKGROUND, QoderApi
from bridge.checkpoint_index import CheckpointIndex
from bridge.checkpoints import Checkpoint, settled_record
from bridge.config import Settings
from bridge.cursor import ThreadCursor
from bridge.errors import ApiError, ApiRequestRejected, AuthRejected, BadCursor, NotFound
from bridge.publisher import Outgoing, PublisherClosed, Sink
from bridge.pump import Backoff, Pump, PumpLimits, PumpState
from bridge.records import ThreadRef
from bridge.shards import SHARDS, shard_of
from bridge.slots import StreamSlots
from bridge.sse import Frame

log = structlog.get_logger("bridge.supervisor")

ACTIVE_THREAD_STATUSES = frozenset({"running", "rescheduling", "blocked"})
#: Session statuses with work going on (G1/G2 said "processing").
LIVE_SESSION_STATUSES = ("running", "rescheduling", "processing")
HINT_EVENT_PREFIXES = ("session.thread_", "session.status_", "session.deleted", "terminated")
#: Hints that name a thread that runs: its pump starts at once, without a look (no request).
THREAD_RUNNING_HINTS = frozenset({"session.thread_created", "session.thread_status_running"})
#: Hints that the session is over: the next look asks for the session, not the listing's copy.
SESSION_OVER_HINT_PREFIXES = ("session.status_terminated", "session.deleted", "terminated")
#: A session's own status change; with discovery, the running listing's diff makes the look.
SESSION_STATUS_HINT_PREFIX = "session.status_"
#: A thread-running hint is acted on at once only when this fresh (processed_at, against
#: our clock): a stream that replays old lifecycle events makes a look, not a pump per thread.
HINT_FRESH_S = 30.0
#: A thread announced by a hint may answer 404 for this long before it is taken as gone.
NEW_THREAD_GRACE_S = 10.0
#: A session stream that lasted this long was healthy: its next reconnect starts the backoff
#: afresh (one that closes at once backs off like any failure).
HINTS_HEALTHY_AFTER_S = 5.0
COALESCE_S = 0.05
#: A look a thread's lifecycle hint asks for waits this long for the rest of the burst (a turn
#: ends with several): it only drains, a thread that starts is followed without a look.
HINT_COALESCE_S = 1.0
#: A running session whose hint stream stayed up is looked at every this many poll intervals
#: (the safety net for a hint the server never sent); every poll interval otherwise.
HEALTHY_HINTS_POLL_FACTOR = 4
#: A session's first safety-net wait is this share of its interval, drawn at random: sessions
#: followed together (at a start, from one listing) then do not all look again at the same
#: moment, every interval. 50 such looks together held back every stream for a moment (issue
#: 11's latency bench: the second 14 s after the start, p99 131-158 ms against 106-128 around).
#: Never more than the interval: no look comes later than it did.
FIRST_WAIT_SHARE = (0.5, 1.0)
#: Running sessions are listed at least this often (one request), whatever the poll interval:
#: a new session's coordinator reaches Kafka within about this long.
RUNNING_LIST_INTERVAL_S = 2.0
#: A shard acquired: its history is listed this much later, so that a burst of acquisitions
#: (a start, a rebalance) makes one full listing, not one a shard.
FOLLOW_SCAN_DELAY_S = 1.0
#: What an id must look like to be put in a URL path (sess_..., sthr_...: letters, digits, _).
_SAFE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
#: Bad ids remembered (warned once each), at most this many.
_BAD_IDS_KEPT = 1000


def _newer(updated_at: str | None, drained: str | None) -> bool:
    if drained is None:
        return True
    if updated_at is None:
        return False
    try:
        return _ts(updated_at) > _ts(drained)
    except ValueError:
        return updated_at != drained


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _session_over(session: Mapping[str, Any]) -> bool:
    return session.get("status") in {"terminated", "deleted"} or bool(session.get("archived_at"))


def _session_live(session: Mapping[str, Any]) -> bool:
    return session.get("status") in LIVE_SESSION_STATUSES and not _session_over(session)


def _hinted_thread(fields: Mapping[str, Any]) -> str | None:
    """The thread a lifecycle event names: ``session_thread_id``, top level or under ``data``."""
    value = fields.get("session_thread_id")
    if value is None and isinstance(fields.get("data"), dict):
        value = fields["data"].get("session_thread_id")
    return value if isinstance(value, str) else None


def _fresh(fields: Mapping[str, Any]) -> bool:
    """Whether a lifecycle event is recent (``processed_at`` within HINT_FRESH_S of now)."""
    value = fields.get("processed_at")
    if not isinstance(value, str):
        return False
    try:
        moment = _ts(value)
    except ValueError:
        return False
    if moment.tzinfo is None:
        return False
    return abs(time.time() - moment.timestamp()) <= HINT_FRESH_S


def _updated_at(item: Mapping[str, Any]) -> str | None:
    value = item.get("updated_at")
    return value if isinstance(value, str) else None


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        api: QoderApi,
        publisher: Sink,
        alerts: BridgeAlerts,
        checkpoints: CheckpointIndex | Mapping[str, Checkpoint],
    ) -> None:
        self._settings = settings
        self._api = api
        self._publisher = publisher
        self._alerts = alerts
        if not isinstance(checkpoints, CheckpointIndex):
            index = CheckpointIndex()
            index.update(checkpoints)
            checkpoints = index
        #: Every thread's checkpoint and every settled session, on disk, not in memory.
        self._checkpoints = checkpoints
        self._limits = PumpLimits(
            StreamSlots(settings.api.max_streams), settings.api.list_poll_interval_s
        )
        self._cursors: dict[ThreadRef, ThreadCursor] = {}
        self._pumps: dict[ThreadRef, Pump] = {}
        #: The threads of _pumps by session: asked at every pump's end and every look.
        self._pumps_of: dict[str, set[ThreadRef]] = {}
        self._active: dict[ThreadRef, bool] = {}
        self._watched: set[str] = set()
        #: Configured sessions that are over: never looked at again.
        self._finished: set[str] = set()
        #: Whether the server takes ``statuses`` on the session list (learnt on a 400).
        self._statuses_filter = True
        self._bad_ids: set[str] = set()
        #: Sessions the API has shown us at least once (a later 404 means deleted, not a typo).
        self._seen: set[str] = set()
        self._triggers: dict[str, anyio.Event] = {}
        #: The last listing's running sessions and when it answered: a look at a session that
        #: is in it takes its status from there (one request a look, the thread list).
        self._running: dict[str, dict[str, Any]] = {}
        self._running_at = float("-inf")
        #: Sessions whose own status changed since the listing (a session hint): asked for.
        self._ask: set[str] = set()
        #: Sessions whose pending look should not wait for a burst to end (it starts threads).
        self._soon: set[str] = set()
        #: Watched sessions seen running (they wait a poll of quiet before they are let go).
        self._seen_live: set[str] = set()
        #: Since when each running session's hint stream has been up (absent while it is not).
        self._hints_up: dict[str, float] = {}
        #: Threads whose pump crashed and has not been started again: their session does not
        #: settle until a look has started them again (and they drained).
        self._dirty: set[ThreadRef] = set()
        #: Finished sessions as the full listing showed them, for their first look (the
        #: listing already answered what a session request would: one request saved each).
        self._listed: dict[str, dict[str, Any]] = {}
        #: The shards whose sessions this bridge follows (bridge/sharding.py); None: all of
        #: them (a bridge without a group, as in the unit tests).
        self._owned: set[int] | None = None
        #: Set when the owned shards change: discovery lists again soon.
        self._owned_changed = anyio.Event()
        self._scan_wakeup = anyio.Event()
        self._full_due = float("-inf")
        #: Each watched session's and each pump's scope: a released shard cancels them.
        self._session_scopes: dict[str, anyio.CancelScope] = {}
        self._pump_scopes: dict[ThreadRef, anyio.CancelScope] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def pumps(self) -> Mapping[ThreadRef, Pump]:
        return self._pumps

    @property
    def sessions(self) -> frozenset[str]:
        """The sessions being looked at now (running, or not yet settled)."""
        return frozenset(self._watched)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            if self._owned is not None:
                # A member: shards come and go, and their sessions with them.
                tg.start_soon(anyio.sleep_forever)
            if self._settings.api.sessions:
                for session_id in self._settings.api.sessions:
                    self._watch(session_id)
            else:
                tg.start_soon(self._discover)

    # -- ownership: the shards this member follows --------------------------------------------

    def owns(self, session_id: str) -> bool:
        return self._owned is None or shard_of(session_id) in self._owned

    def own_nothing(self) -> None:
        """From now on only the shards given by :meth:`follow` (a member of a group)."""
        if self._owned is None:
            self._owned = set()

    def follow(self, shard: int) -> None:
        """The shard is this member's now (its checkpoints are loaded): follow its sessions.
        Its running sessions come with the next running listing; a full listing, a second
        from now so that a burst of acquired shards makes one, finds its history."""
        if self._owned is None or shard in self._owned:
            return
        self._owned.add(shard)
        self._full_due = min(self._full_due, anyio.current_time() + FOLLOW_SCAN_DELAY_S)
        self._owned_changed.set()
        self._scan_wakeup.set()
        for session_id in self._settings.api.sessions:
            if shard_of(session_id) == shard:
                self._watch(session_id)

    def unfollow(self, shard: int) -> None:
        """The shard is not this member's any more: stop its sessions' pumps and watchers now.
        What they read and did not commit, the next owner reads again from the checkpoint."""
        if self._owned is None:
            self._owned = set(range(SHARDS))
        self._owned.discard(shard)
        for ref in [r for r in self._pump_scopes if shard_of(r.session_id) == shard]:
            self._pump_scopes.pop(ref).cancel()
        for session_id in [s for s in self._session_scopes if shard_of(s) == shard]:
            self._session_scopes.pop(session_id).cancel()
            self._let_go(session_id)
        for ref in [r for r in self._cursors if shard_of(r.session_id) == shard]:
            del self._cursors[ref]
            self._active.pop(ref, None)
        self._owned_changed.set()

    def _watch(self, session_id: str, *, listed: dict[str, Any] | None = None) -> None:
        if session_id in self._watched or session_id in self._finished:
            return
        if not self.owns(session_id):
            return
        assert self._tg is not None  # noqa: S101 -- run() set it
        history = listed is not None and not _session_live(listed)
        if history and listed is not None:
            self._listed[session_id] = listed
        self._watched.add(session_id)
        self._triggers[session_id] = anyio.Event()
        scope = self._session_scopes[session_id] = anyio.CancelScope()
        self._tg.start_soon(
            self._watch_scoped, scope, session_id, history, name=f"session {session_id}"
        )

    async def _watch_scoped(self, scope: anyio.CancelScope, session_id: str, history: bool) -> None:
        try:
            with scope:
                await self._watch_session(session_id, history)
        finally:
            if self._session_scopes.get(session_id) is scope:
                del self._session_scopes[session_id]

    async def _discover(self) -> None:
        """Follow the sessions with work going on; the rest of the history costs nothing.

        Every poll lists only running sessions (the ``statuses`` filter; a server that refuses
        it gets the full list, filtered here). The full history, archived sessions included,
        is listed at start and every ``full_scan_interval_s``: a session that changed since it
        last settled (it ran while nobody looked) gets one look, the others none. A failed
        listing is retried with the streams' backoff, not a whole poll later.
        """
        api = self._settings.api
        backoff = Backoff(api.backoff_initial_s, api.backoff_max_s)
        self._full_due = anyio.current_time()
        while True:
            if self._owned is not None and not self._owned:
                # A member with no shard yet (or any more): nothing of the account is its own.
                self._owned_changed = anyio.Event()
                await self._owned_changed.wait()
                continue
            started = anyio.current_time()
            # One request finds new and revived sessions: worth doing more often than the
            # per-session safety net, so a new session's first event is not a poll away.
            delay: float | None = None  # the listing's own pace, unless it failed
            full = started >= self._full_due
            try:
                sessions = await self._list(full=full)
                running, self._running = (
                    self._running,
                    {
                        s["id"]: s
                        for s in sessions
                        if _session_live(s) and isinstance(s.get("id"), str)
                    },
                )
                self._running_at = anyio.current_time()
                for changed in self._running.keys() ^ running.keys():
                    self._trigger(changed)  # followed, and running again or stopped: look now
                for session in sessions:
                    session_id = session.get("id")
                    if self._usable_id(session_id) and self._worth_a_look(session_id, session):
                        self._watch(session_id, listed=session)
                self._alerts.token_accepted(started)
                self._alerts.discovered()
                backoff.reset()
                if full:
                    self._full_due = started + self._full_scan_interval()
                    metrics.FULL_SCANS.inc()
            except AuthRejected as exc:
                await self._alerts.token_rejected(str(exc))
            except ApiError as exc:
                self._alerts.discovery_failed(f"listing sessions failed: {exc}")
                delay = backoff.next_delay(getattr(exc, "retry_after_s", None) or 0.0)
                log.warning(
                    "bridge.supervisor.list_sessions_failed",
                    error=str(exc),
                    retry_in_s=round(delay, 3),
                )
            if delay is None:
                # Without the statuses filter the "running" listing is the whole (non-archived)
                # history: at the poll interval then, not every 2 s.
                delay = (
                    min(api.poll_interval_s, RUNNING_LIST_INTERVAL_S)
                    if self._statuses_filter
                    else api.poll_interval_s
                )
            with anyio.move_on_after(delay):
                await self._scan_wakeup.wait()
                # A shard was acquired: its full listing is due a moment later.
                await anyio.sleep(max(0.0, self._full_due - anyio.current_time()))
            self._scan_wakeup = anyio.Event()

    def _full_scan_interval(self) -> float:
        """BRIDGE_FULL_SCAN_INTERVAL_S for the deployment as a whole: a member that owns a
        quarter of the shards lists the whole history a quarter as often, so N members cost
        what one bridge costs. (What comes back to life is running: the running listing, every
        poll at every member, finds it; a full listing is for short turns between two polls.)
        The listing that follows a shard's acquisition is not spread: it is the catch-up."""
        interval = self._settings.api.full_scan_interval_s
        if self._owned is None or not self._owned:
            return interval
        return interval * SHARDS / len(self._owned)

    async def _list(self, *, full: bool) -> list[dict[str, Any]]:
        if full:
            return await self._api.list_sessions(include_archived=True)
        if self._statuses_filter:
            try:
                sessions = await self._api.list_sessions(
                    include_archived=False, statuses=LIVE_SESSION_STATUSES
                )
            except ApiRequestRejected as exc:
                # Forward-style validation refuses what it does not know: list everything.
                log.info("bridge.supervisor.statuses_filter_refused", error=str(exc))
                self._statuses_filter = False
            else:
                return [s for s in sessions if _session_live(s)]
        return await self._api.list_sessions(include_archived=False)

    def _usable_id(self, value: object, session_id: str | None = None) -> TypeGuard[str]:
        """An id that can go in a URL; any other is skipped, with one warning, never a crash."""
        if isinstance(value, str) and _SAFE_ID.fullmatch(value) and value not in (".", ".."):
            return True  # ("." and ".." would be resolved away in a URL path)
        text = repr(value)[:120]
        if text not in self._bad_ids and len(self._bad_ids) < _BAD_IDS_KEPT:
            self._bad_ids.add(text)
            what = "thread" if session_id else "session"
            log.warning(f"bridge.supervisor.bad_{what}_id", id=text, session_id=session_id)
        return False

    def _worth_a_look(self, session_id: str, session: Mapping[str, Any]) -> bool:
        if _session_live(session):
            return True
        settled = self._settled_at(session_id)
        updated = _updated_at(session)
        return settled is None or updated is None or _newer(updated, settled)

    def _settled_at(self, session_id: str) -> str | None:
        """The session's ``updated_at`` when this bridge last saw it settled: nothing running,
        every thread drained. Listed again with nothing newer, it costs nothing. (Not derived
        from its threads' checkpoints: one thread drained says nothing of the others.)"""
        return self._checkpoints.settled_at(session_id)

    async def _watch_session(self, session_id: str, history: bool = False) -> None:
        """Look at a session until it has settled: nothing running, every thread drained.

        Its event stream (the hints) is open only while it runs. A settled session is let go:
        the running-session listing brings it back when it runs again.
        """
        slog = log.bind(session_id=session_id)
        slog.info("bridge.session.following")
        # A look at history (a session that is not running) waits behind live threads.
        BACKGROUND.set(history)
        configured = bool(self._settings.api.sessions)
        hints: anyio.CancelScope | None = None
        quiet_since: float | None = None
        seen_live = False
        grace_s = self._settings.api.poll_interval_s
        share = random.uniform(*FIRST_WAIT_SHARE)  # noqa: S311 -- a spread, not a secret
        async with anyio.create_task_group() as tg:
            backoff = Backoff(
                self._settings.api.backoff_initial_s, self._settings.api.backoff_max_s
            )
            #: History whose look found it not running and started catch-up passes: once they
            #: are all stored, it settles as of that look, with no look more (if it ran since,
            #: its updated_at moved past the mark and the next full listing brings it back).
            settle_when_drained: str | None = None
            triggered = False
            while True:
                dirty = self._has_dirty(session_id)
                if settle_when_drained is not None and not dirty:
                    pumps = self._session_pumps(session_id)
                    if not pumps:
                        slog.info("bridge.session.settled", over=False, caught_up=True)
                        await self._settle(session_id, settle_when_drained)
                        self._let_go(session_id)
                        tg.cancel_scope.cancel()
                        return
                    if not triggered and not any(p.following for p in pumps):
                        # Its catch-up is still queued behind the budget: a look now would
                        # only queue behind it too (and, every poll, lengthen the queue). The
                        # running listing or the last pump's end wakes it. (A thread found
                        # running keeps the poll's safety net.)
                        triggered = await self._wait_trigger(session_id)
                        continue
                settle_when_drained = None
                started = anyio.current_time()
                live = True  # until the API says otherwise
                if session_id in self._running:
                    # Running again (the listing woke it): its look goes before the history's.
                    BACKGROUND.set(False)
                try:
                    session = await self._reconcile(session_id)
                    over, live = _session_over(session), _session_live(session)
                    BACKGROUND.set(not live)
                    self._alerts.token_accepted(started)
                    self._alerts.discovered()
                    backoff.reset()
                except NotFound as exc:
                    # A 404 is an answer: the token is good, the session is not there.
                    self._alerts.token_accepted(started)
                    self._alerts.discovered()
                    session, over, live = {}, True, False
                    if session_id in self._settings.api.sessions and session_id not in self._seen:
                        # Configured and never seen: a typo, or another account's session. The
                        # bridge stays up, not ready, naming it; it looks again every poll.
                        over = False
                        if self._alerts.session_missing(session_id):
                            slog.warning("bridge.session.not_found", error=str(exc))
                            await self._alerts.send(
                                "bridge.session_not_found",
                                "not_found",
                                None,
                                {"session_id": session_id, "error": str(exc)},
                            )
                    else:
                        slog.info("bridge.session.deleted", error=str(exc))
                    await self._drain_session(session_id)
                except AuthRejected as exc:
                    await self._alerts.token_rejected(str(exc))
                    session, over = {}, False
                except ApiError as exc:
                    slog.warning("bridge.session.reconcile_failed", error=str(exc))
                    await anyio.sleep(backoff.next_delay())
                    continue
                except Exception:
                    # A bug never takes the other sessions down: report, wait, look again.
                    slog.exception("bridge.session.crashed")
                    await self._alerts.send(
                        "bridge.session_crashed", "internal_error", None, {"session_id": session_id}
                    )
                    await anyio.sleep(self._settings.api.backoff_max_s)
                    continue
                if live and hints is None:
                    hints = await tg.start(self._hints_scope, session_id)
                elif not live and hints is not None:
                    hints.cancel()
                    hints = None
                # Let go once quiet for a poll interval: a turn that follows soon after (a
                # reply) is found by the next look, not by a full scan minutes later.
                quiet = (
                    not live
                    and not self._session_pumps(session_id)
                    and not self._has_dirty(session_id)
                )
                seen_live = seen_live or live
                if live:
                    self._seen_live.add(session_id)
                quiet_since = (quiet_since or started) if quiet else None
                # History (never seen running here) has no reply to wait for.
                waited = quiet_since is not None and (
                    not seen_live or started - quiet_since >= grace_s
                )
                if quiet and (over or waited) and (over or not configured):
                    slog.info("bridge.session.settled", over=over)
                    if configured:
                        self._finished.add(session_id)
                    elif (updated := _updated_at(session)) is not None:
                        await self._settle(session_id, updated)
                    self._let_go(session_id)
                    tg.cancel_scope.cancel()
                    return
                if not live and not seen_live and not configured and session:
                    settle_when_drained = _updated_at(session)
                # Its hint stream up since before this look: lifecycle changes come as hints,
                # and the safety net can be slower.
                up = self._hints_up.get(session_id)
                triggered = await self._wait_trigger(
                    session_id, healthy=up is not None and up <= started and live, share=share
                )
                share = 1.0

    def _let_go(self, session_id: str) -> None:
        self._watched.discard(session_id)
        self._triggers.pop(session_id, None)
        self._soon.discard(session_id)
        self._ask.discard(session_id)
        self._seen_live.discard(session_id)
        self._dirty = {ref for ref in self._dirty if ref.session_id != session_id}
        self._listed.pop(session_id, None)

    async def _settle(self, session_id: str, updated_at: str) -> None:
        """Remember that the session settled, here and in the checkpoint topic: listed again
        with nothing newer, it costs no request, after a restart too."""
        if self._checkpoints.settled_at(session_id) == updated_at:
            return
        self._checkpoints.settle(session_id, updated_at)
        topic = self._settings.kafka.checkpoint_topic
        # Stopping: the next start looks at the session once more, that is all.
        with contextlib.suppress(PublisherClosed):
            await self._publisher.submit(
                Outgoing(
                    None, 0, [settled_record(topic, session_id, updated_at)], session_id=session_id
                )
            )

    async def _hints_scope(
        self, session_id: str, *, task_status: anyio.abc.TaskStatus[anyio.CancelScope]
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            await self._hints(session_id)

    async def _wait_trigger(
        self, session_id: str, *, healthy: bool = False, share: float = 1.0
    ) -> bool:
        """Until something calls for a look, or the poll's safety net (``share`` of it);
        whether it was called."""
        poll = self._settings.api.poll_interval_s
        trigger = self._triggers[session_id]
        with anyio.move_on_after((poll * HEALTHY_HINTS_POLL_FACTOR if healthy else poll) * share):
            await trigger.wait()
            # A burst of lifecycle events: one look.
            soon = session_id in self._soon
            await anyio.sleep(COALESCE_S if soon else HINT_COALESCE_S)
        self._soon.discard(session_id)
        self._triggers[session_id] = anyio.Event()
        return trigger.is_set()

    def _trigger(self, session_id: str, *, soon: bool = True) -> None:
        trigger = self._triggers.get(session_id)
        if trigger is not None:
            if soon:
                self._soon.add(session_id)
            trigger.set()

    def _has_dirty(self, session_id: str) -> bool:
        return any(ref.session_id == session_id for ref in self._dirty)

    def _session_pumps(self, session_id: str) -> list[Pump]:
        return [self._pumps[ref] for ref in self._pumps_of.get(session_id, ())]

    async def _session(self, session_id: str) -> dict[str, Any]:
        """The session: from the last listing of running sessions while it is in it, fresh and
        no session hint came since (no request); asked for otherwise (it stopped running, or
        it is configured, or the listing is late)."""
        listed = self._listed.pop(session_id, None)
        if listed is not None and session_id not in self._ask:
            # The full listing that brought it: its threads, listed next, say if it runs now.
            return listed
        fresh = anyio.current_time() - self._running_at < 2 * RUNNING_LIST_INTERVAL_S
        listed = self._running.get(session_id)
        if fresh and listed is not None and session_id not in self._ask:
            return listed
        session = await self._api.get_session(session_id)
        self._ask.discard(session_id)  # only once answered: a failure asks again
        if not _session_live(session):
            self._running.pop(session_id, None)  # newer than the listing
        return session

    async def _reconcile(self, session_id: str) -> dict[str, Any]:
        """Start, drain or catch up the session's threads; the session as the API gave it."""
        looked_at = anyio.current_time()
        session = await self._session(session_id)
        if session_id in self._settings.api.sessions:
            self._seen.add(session_id)  # configured ones only: bounded by the configuration
        self._alerts.session_found(session_id)
        over = _session_over(session)
        threads = await self._api.list_threads(session_id)
        for thread in threads:
            thread_id = thread.get("id")
            if not self._usable_id(thread_id, session_id):
                continue
            ref = ThreadRef(session_id, thread_id)
            active = not over and thread.get("status") in ACTIVE_THREAD_STATUSES
            updated_at = _updated_at(thread)
            pump = self._pumps.get(ref)
            if not active and pump is None and ref not in self._cursors:
                checkpoint = self._checkpoints.get(ref.key)
                drained = checkpoint.drained_updated_at if checkpoint else None
                if not _newer(updated_at, drained):
                    continue  # settled and drained: no state held for it
            self._active[ref] = active
            cursor = self._cursor(ref)
            if active:
                if pump is None:
                    self._start(cursor, follow=True)
                else:
                    pump.follow()
            elif pump is not None and pump.hinted_at >= looked_at:
                # The list was read before the hint said it runs: ask again, not drain.
                self._active[ref] = True
                self._trigger(session_id)
            elif pump is not None:
                pump.drain(updated_at)
            elif _newer(updated_at, cursor.pending_drained_updated_at or cursor.drained_updated_at):
                self._start(cursor, follow=False).drain(updated_at)
        # A crashed pump this look did not start again has nothing left to read (or its
        # thread is gone); one still waiting out its crash keeps the session unsettled.
        self._dirty = {r for r in self._dirty if r.session_id != session_id or r in self._pumps}
        metrics.THREADS_FOLLOWED.set(len(self._pumps))
        return session

    async def _drain_session(self, session_id: str) -> None:
        for ref, pump in list(self._pumps.items()):
            if ref.session_id == session_id:
                self._active[ref] = False
                pump.drain(None)

    def _cursor(self, ref: ThreadRef) -> ThreadCursor:
        cursor = self._cursors.get(ref)
        if cursor is None:
            checkpoint = self._checkpoints.get(ref.key)
            cursor = ThreadCursor(
                ref,
                checkpoint.last_event_id if checkpoint else None,
                checkpoint.drained_updated_at if checkpoint else None,
                checkpoint.recent_ids if checkpoint else (),
                checkpoint.idless_after if checkpoint else 0,
            )
            self._cursors[ref] = cursor
        return cursor

    def _start(self, cursor: ThreadCursor, *, follow: bool) -> Pump:
        assert self._tg is not None  # noqa: S101 -- run() set it
        pump = Pump(
            cursor,
            self._api,
            self._publisher,
            self._alerts,
            self._settings,
            self._limits,
            follow=follow,
        )
        self._pumps[cursor.thread] = pump
        self._pumps_of.setdefault(cursor.thread.session_id, set()).add(cursor.thread)
        self._dirty.discard(cursor.thread)
        scope = self._pump_scopes[cursor.thread] = anyio.CancelScope()
        self._tg.start_soon(self._run_pump, pump, scope, name=f"pump {cursor.thread.key}")
        return pump

    async def _run_pump(self, pump: Pump, scope: anyio.CancelScope) -> None:
        ref = pump.thread
        crashed = False
        try:
            with scope:
                await pump.run()
            if scope.cancelled_caught:
                return  # its shard was released: the next owner goes on from the checkpoint
        except Exception as exc:
            # One failing thread never disturbs the others; the next look restarts it.
            pump.log.exception("bridge.pump.crashed")
            pump.last_error = f"crashed: {type(exc).__name__}"
            self._dirty.add(ref)
            crashed = True
            pump.state = PumpState.BACKOFF  # what GET /status shows until it starts again
            await self._alerts.send("bridge.pump_crashed", "internal_error", ref)
            await anyio.sleep(self._settings.api.backoff_max_s)
        else:
            if not self._active.get(ref) or pump.gone:
                self._forget(pump.cursor)
        finally:
            if self._pumps.get(ref) is pump:
                del self._pumps[ref]
                refs = self._pumps_of.get(ref.session_id)
                if refs is not None:
                    refs.discard(ref)
                    if not refs:
                        del self._pumps_of[ref.session_id]
            if self._pump_scopes.get(ref) is scope:
                del self._pump_scopes[ref]
            metrics.THREADS_FOLLOWED.set(len(self._pumps))
        if crashed or (self._active.get(ref) and not pump.gone):
            self._trigger(ref.session_id)  # it runs again, or must be started again: look now
        elif ref.session_id not in self._seen_live and not self._session_pumps(ref.session_id):
            # History caught up: the look that lets it go (and marks it settled) comes now,
            # not a poll later. (A session seen running waits its poll of quiet.)
            self._trigger(ref.session_id)

    def _forget(self, cursor: ThreadCursor) -> None:
        """A drained thread leaves memory; what it needs if it runs again is its checkpoint,
        kept here as Kafka has it (the drain waited for the commit)."""
        ref = cursor.thread
        if self._cursors.get(ref) is not cursor:
            return
        del self._cursors[ref]
        self._active.pop(ref, None)
        self._checkpoints[ref.key] = Checkpoint(
            cursor.committed_id,
            cursor.drained_updated_at,
            tuple(cursor.committed_ids),
            cursor.committed_idless,
        )

    def _hint(self, session_id: str, frame: Frame) -> None:
        """A thread that starts running is followed at once (the thread list would say the
        same a request later); any other lifecycle event makes the session looked at."""
        kind, fields = frame.event, None
        if kind in ("", "message") or kind in THREAD_RUNNING_HINTS:
            # The type is the event: line (qoder-api.md 5.1), or else the data's own.
            try:
                fields = json.loads(frame.data)
            except ValueError:
                return
            if not isinstance(fields, dict):
                return
            if kind in ("", "message"):
                own = fields.get("type")
                kind = own if isinstance(own, str) else ""
        if not kind.startswith(HINT_EVENT_PREFIXES):
            return
        if kind in THREAD_RUNNING_HINTS and fields is not None and _fresh(fields):
            thread_id = _hinted_thread(fields)
            if thread_id is not None and self._usable_id(thread_id, session_id):
                self._thread_runs(ThreadRef(session_id, thread_id))
                return
        if kind.startswith(SESSION_OVER_HINT_PREFIXES):
            self._ask.add(session_id)  # over: the listing would never say so
        elif kind.startswith(SESSION_STATUS_HINT_PREFIX) and not self._settings.api.sessions:
            return  # running or not: the running listing tells within 2 s, at no extra cost
        self._trigger(session_id, soon=False)

    def _thread_runs(self, ref: ThreadRef) -> None:
        if ref.session_id not in self._watched:
            return  # the session was let go meanwhile: the running listing brings it back
        self._active[ref] = True
        pump = self._pumps.get(ref)
        if pump is None:
            pump = self._start(self._cursor(ref), follow=True)
        else:
            pump.follow()
        now = anyio.current_time()
        pump.hinted_at, pump.new_until = now, now + NEW_THREAD_GRACE_S
        metrics.THREADS_FOLLOWED.set(len(self._pumps))

    async def _hints(self, session_id: str) -> None:
        """React to the session stream's thread lifecycle events within a second."""
        backoff = Backoff(self._settings.api.backoff_initial_s, self._settings.api.backoff_max_s)
        cursor: str | None = None
        while True:
            opened = anyio.current_time()
            try:
                # No cursor at first: no request to learn the latest id. A server that replays
                # the history on a fresh connection sends old lifecycle events, which are not
                # fresh: one look for the burst, no pump each (see _hint).
                async with self._api.stream_session(session_id, cursor) as frames:
                    self._hints_up[session_id] = anyio.current_time()
                    try:
                        async for frame in frames:
                            if frame.id:
                                cursor = frame.id
                            self._hint(session_id, frame)
                    finally:
                        self._hints_up.pop(session_id, None)
                if anyio.current_time() - opened >= HINTS_HEALTHY_AFTER_S:
                    backoff.reset()
            except BadCursor:
                cursor = None
            except NotFound:
                self._trigger(session_id)
                return
            except ApiError as exc:
                log.debug("bridge.session.hints_failed", session_id=session_id, error=str(exc))
            await anyio.sleep(backoff.next_delay())
