"""Where one thread stands: what was read and handed on, and what is safely stored.

The pump advances ``submitted_id`` as it hands events to the publisher; the publisher advances
``committed_id`` once Kafka has the event *and* the checkpoint covering it. When a batch fails
(a transaction aborts, the broker drops acknowledged-but-uncommitted work), the publisher
``rewind``s the cursor to ``committed_id``: the epoch changes, stale work still queued is dropped,
and the pump starts reading again from the committed position. No event is skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import anyio

from bridge.records import ThreadRef

#: How many recent event ids a thread remembers to drop replays at a resume boundary.
RECENT_IDS = 128
#: How many of them a checkpoint carries, so that a restarted bridge still recognises the
#: events a server replays from before the cursor (qoder-api.md 6.2 and 10: one to three).
CHECKPOINT_RECENT_IDS = 32


def place_key(anchor: str | None, ordinal: int) -> str:
    """The dedupe key of an item without an id: its place, the ``ordinal``-th such item after
    the event ``anchor``. Not its bytes: a stream and a list may serialise it differently."""
    place = f"{anchor or ''}\0{ordinal}".encode()
    return "place:" + hashlib.sha256(place).hexdigest()[:32]


class ThreadCursor:
    # Slots: one cursor per followed thread, idle or not (issue 11: memory per idle stream).
    __slots__ = (
        "_read_scope",
        "_recent",
        "_settled",
        "committed_id",
        "committed_idless",
        "committed_ids",
        "drained_updated_at",
        "drains_committed",
        "epoch",
        "pending_drained_updated_at",
        "submitted_id",
        "thread",
    )

    def __init__(
        self,
        thread: ThreadRef,
        committed_id: str | None = None,
        drained_updated_at: str | None = None,
        recent_ids: Iterable[str] = (),
        idless_after: int = 0,
    ) -> None:
        self.thread = thread
        self.committed_id = committed_id
        self.submitted_id = committed_id
        #: The thread's ``updated_at`` as of the last complete drain (from the checkpoint).
        self.drained_updated_at = drained_updated_at
        #: A drain handed to the publisher but not yet committed: not worth another pass.
        self.pending_drained_updated_at: str | None = None
        #: Drain marks committed so far: a draining pump waits for this to move.
        self.drains_committed = 0
        self.epoch = 0
        #: The recent keys, oldest first (a dict keeps insertion order; an OrderedDict or a
        #: deque costs about 700 bytes more a thread, idle or not).
        self._recent: dict[str, None] = {}
        #: What a checkpoint carries besides the cursor: the ids up to it, newest last (at
        #: most CHECKPOINT_RECENT_IDS), and how many items without an id were handed on after
        #: it (known by their place).
        self.committed_ids: list[str] = [*recent_ids, *([committed_id] if committed_id else [])]
        del self.committed_ids[:-CHECKPOINT_RECENT_IDS]
        self.committed_idless = idless_after
        self._remember_committed()
        #: Made when someone waits (a draining pump), set when the publisher commits or
        #: rewinds this thread: most cursors never need one.
        self._settled: anyio.Event | None = None
        self._read_scope: anyio.CancelScope | None = None

    def seen(self, event_id: str) -> bool:
        return event_id in self._recent

    def mark_submitted(self, epoch: int, key: str, *, moves_cursor: bool = True) -> bool:
        """Record that ``key`` was handed on; False when a rewind made the read stale.

        ``moves_cursor=False``: an item without an id of its own (a dead letter known by its
        digest) is remembered, so it is not handed on twice, but cannot be resumed after.
        """
        if epoch != self.epoch:
            return False
        self._remember(key)
        if moves_cursor:
            self.submitted_id = key
        return True

    def _remember_committed(self) -> None:
        for key in self.committed_ids:
            self._remember(key)
        for ordinal in range(self.committed_idless):
            self._remember(place_key(self.committed_id, ordinal))

    def _remember(self, key: str) -> None:
        recent = self._recent
        recent.pop(key, None)  # a key seen again moves to the newest end
        recent[key] = None
        if len(recent) > RECENT_IDS:
            del recent[next(iter(recent))]

    def mark_committed(
        self,
        epoch: int,
        event_id: str | None,
        drained: str | None,
        key: str | None = None,
        *,
        drain: bool = False,
    ) -> None:
        if epoch != self.epoch:
            return
        if drain:
            self.drains_committed += 1
        if event_id is not None:
            self.committed_id = event_id
            self.committed_ids.append(event_id)
            if len(self.committed_ids) > CHECKPOINT_RECENT_IDS:
                del self.committed_ids[0]
            self.committed_idless = 0
        elif key is not None:
            self.committed_idless += 1
        if drained is not None:
            self.drained_updated_at = drained
            if self.pending_drained_updated_at == drained:
                self.pending_drained_updated_at = None

    @property
    def settled(self) -> anyio.Event:
        """Set once a batch holding this thread is committed or rewound (after this call)."""
        if self._settled is None:
            self._settled = anyio.Event()
        return self._settled

    def settle(self) -> None:
        """A batch holding this thread was committed or rewound: wake whoever waits on it."""
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    def rewind(self) -> None:
        """Forget everything after ``committed_id`` and make the reader start again from it."""
        self.epoch += 1
        # Rebuilt from what is committed, however much was in flight.
        self._recent.clear()
        self._remember_committed()
        self.submitted_id = self.committed_id
        self.pending_drained_updated_at = None
        if self._read_scope is not None:
            self._read_scope.cancel()

    def reading(self, scope: anyio.CancelScope | None) -> None:
        """The pump registers the scope of its current read so that a rewind can interrupt it."""
        self._read_scope = scope
