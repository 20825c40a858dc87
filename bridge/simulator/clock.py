"""Time-ordered ids and the timestamps that match them.

Ids are 32 hex digits shaped like a UUIDv7: 48 bits of Unix milliseconds, the version nibble,
a 12-bit counter that keeps ids made within one millisecond in order, the variant bits and 62
seeded random bits. ``processed_at`` carries the same millisecond (plus the clock's sub-millisecond
digits), so decoding an id gives its event's time, as in the API's own examples.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stamp:
    ms: int
    ns: int  # nanoseconds within the millisecond

    @property
    def rfc3339(self) -> str:
        """Nanosecond precision, like event ``processed_at`` in the API examples."""
        return f"{_seconds(self.ms)}.{self.ms % 1000:03d}{self.ns:06d}Z"

    @property
    def rfc3339_ms(self) -> str:
        """Millisecond precision, like ``created_at`` on sessions and threads."""
        return f"{_seconds(self.ms)}.{self.ms % 1000:03d}Z"


def _seconds(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))


class Clock:
    """Wall-clock stamps that never go backwards, and ids made from them."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"{seed}/ids")
        self._last_ms = 0
        self._counter = 0

    def stamp(self) -> Stamp:
        now = time.time_ns()
        ms, ns = divmod(now, 1_000_000)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._counter += 1
            if self._counter > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                ms += 1
                self._counter = 0
        else:
            self._counter = 0
        self._last_ms = ms
        return Stamp(ms, ns % 1_000_000)

    def new_id(self, prefix: str, stamp: Stamp | None = None) -> str:
        """``prefix`` + 32 hex digits; pass the stamp the id must decode to."""
        if stamp is None:
            stamp = self.stamp()
        counter = self._counter if stamp.ms == self._last_ms else 0
        rand_b = self._rng.getrandbits(62)
        value = (stamp.ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b
        return f"{prefix}{value:032x}"


def decode_ms(identifier: str) -> int:
    """The Unix milliseconds in an id made by :class:`Clock` (tests and tools)."""
    return int(identifier.rsplit("_", 1)[1][:12], 16)
