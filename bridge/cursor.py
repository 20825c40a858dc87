"""Where one thread stands: what was read and handed on, and what is safely stored.

The pump advances ``submitted_id`` as it hands events to the publisher; the publisher advances
``committed_id`` once Kafka has the event *and* the checkpoint covering it. When a batch fails
(a transaction aborts, the broker drops acknowledged-but-uncommitted work), the publisher
``rewind``s the cursor to ``committed_id``: the epoch changes, stale work still queued is dropped,
and the pump starts reading again from the committed position. No event is skipped.
"""

from __future__ import annotations

from collections import OrderedDict

import anyio

from bridge.records import ThreadRef

#: How many recent event ids a thread remembers to drop replays at a resume boundary.
RECENT_IDS = 4096


class ThreadCursor:
    def __init__(
        self,
        thread: ThreadRef,
        committed_id: str | None = None,
        drained_updated_at: str | None = None,
    ) -> None:
        self.thread = thread
        self.committed_id = committed_id
        self.submitted_id = committed_id
        #: The thread's ``updated_at`` as of the last complete drain (from the checkpoint).
        self.drained_updated_at = drained_updated_at
        #: A drain handed to the publisher but not yet committed: not worth another pass.
        self.pending_drained_updated_at: str | None = None
        self.epoch = 0
        self._recent: OrderedDict[str, None] = OrderedDict()
        if committed_id:
            self._recent[committed_id] = None
        self._read_scope: anyio.CancelScope | None = None

    def seen(self, event_id: str) -> bool:
        return event_id in self._recent

    def mark_submitted(self, epoch: int, event_id: str) -> bool:
        """Record that ``event_id`` was handed on; False when a rewind made the read stale."""
        if epoch != self.epoch:
            return False
        self._recent[event_id] = None
        self._recent.move_to_end(event_id)
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        self.submitted_id = event_id
        return True

    def mark_committed(self, epoch: int, event_id: str | None, drained: str | None) -> None:
        if epoch != self.epoch:
            return
        if event_id is not None:
            self.committed_id = event_id
        if drained is not None:
            self.drained_updated_at = drained
            if self.pending_drained_updated_at == drained:
                self.pending_drained_updated_at = None

    def rewind(self) -> None:
        """Forget everything after ``committed_id`` and make the reader start again from it."""
        self.epoch += 1
        while self._recent:
            last = next(reversed(self._recent))
            if last == self.committed_id:
                break
            self._recent.popitem(last=True)
        self.submitted_id = self.committed_id
        self.pending_drained_updated_at = None
        if self._read_scope is not None:
            self._read_scope.cancel()

    def reading(self, scope: anyio.CancelScope | None) -> None:
        """The pump registers the scope of its current read so that a rewind can interrupt it."""
        self._read_scope = scope
