"""Stream slots: how many thread streams may be open, and who gets the next free one.

Two limits apply: ``BRIDGE_MAX_STREAMS``, and the API gateway's per-client connection cap
(qoder-api.md 8.3: unquantified; beyond it the gateway answers 429 or 503, or resets). The
second is learnt: a refused stream open while others are open lowers the limit to what is
open; quiet periods raise it again, by half, up to the configured maximum.

A thread that finds no slot is not left waiting: its pump reads it through the JSON list and
comes back to the queue, so every running thread keeps flowing. Slots go first come, first
served: the thread that waited longest (served by the list least recently) streams next.
"""

from __future__ import annotations

import math
from collections import deque

import anyio

from bridge import metrics

#: A refusal-free period this long raises a learnt limit again.
RECOVER_AFTER_S = 10.0
#: Refused opens in a row (no open succeeding between them) that make a cap: one 503 or
#: reset is an incident, a run of them while other streams stay open is a limit.
REFUSALS_FOR_A_CAP = 3


class StreamSlots:
    def __init__(self, limit: int) -> None:
        self.max = limit
        self.limit = limit
        self.open = 0
        self._waiters: deque[anyio.Event] = deque()
        self._last_refusal = -math.inf
        self._refusals = 0
        #: One `bridge.streams_capped` alert per episode (threads waiting for a slot).
        self.alerted = False
        metrics.STREAM_LIMIT.set(limit)

    @property
    def capped(self) -> bool:
        """Some running thread is read through the list for want of a stream."""
        return bool(self._waiters)

    async def acquire(self) -> None:
        """Wait for a slot, first come, first served; cancel to give up waiting."""
        self._recover()
        if not self._waiters and self.open < self.limit:
            self._take()
            return
        granted = anyio.Event()
        self._waiters.append(granted)
        metrics.STREAMS_WAITING.set(len(self._waiters))
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.release()  # granted as we gave up: hand it on
            else:
                self._waiters.remove(granted)
            raise
        finally:
            metrics.STREAMS_WAITING.set(len(self._waiters))

    def release(self) -> None:
        self.open -= 1
        self._hand_on()

    def opened(self) -> None:
        """A stream open succeeded: the refusals before it were incidents, not a cap."""
        self._refusals = 0

    def refused(self) -> bool:
        """The API refused a stream open: True when that looks like a connection cap (a run
        of refusals while other streams are open), which then becomes the limit."""
        self._refusals += 1
        if self.open == 0 or self._refusals < REFUSALS_FOR_A_CAP:
            return False
        self._last_refusal = anyio.current_time()
        # The refused opener gave its slot back already: the cap is what the others have open.
        self.limit = max(1, min(self.limit, self.open))
        metrics.STREAM_LIMIT.set(self.limit)
        return True

    def _take(self) -> None:
        self.open += 1

    def _hand_on(self) -> None:
        while self._waiters and self.open < self.limit:
            self._take()
            self._waiters.popleft().set()
        if not self._waiters:
            self.alerted = False

    def _recover(self) -> None:
        if self.limit >= self.max:
            return
        now = anyio.current_time()
        if now - self._last_refusal >= RECOVER_AFTER_S:
            self.limit = min(self.max, self.limit + self.limit // 2 + 1)
            self._last_refusal = now  # the next step only after another quiet period
            metrics.STREAM_LIMIT.set(self.limit)
            self._hand_on()
