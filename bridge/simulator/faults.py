"""Fault plans, deterministic given the seed.

Every decision comes from a random generator seeded with (seed, what is asked for, how many
times it was asked before): the third stream connection to thread ``0.2`` gets the same plan in
every run with the same seed, and the m-th frame on it the same treatment, however the wall
clock and the ids differ between runs. ``FaultPlanner.log`` records every fault in the order
it was decided, for tests that compare two runs.

:class:`ItemFaults` decides, per thread and per event as it is made, which events carry invalid
UTF-8 and which are followed by a malformed item; those are part of the log, the same bytes
on every read.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bridge.simulator.scenario import Faults

ERROR_KINDS = ("429", "503", "reset")

_GARBAGE = (
    b'event: agent.message\ndata: {"type":"agent.message","content":[{"type":"te\n\n',
    b"data: <html><body><h1>502 Bad Gateway</h1></body></html>\n\n",
    b"event: message\ndata: [object Object]\n\n",
    b"event: agent.tool_result\ndata: \xef\xbf\xbd\xef\xbf\xbd undefined\n\n",
)


@dataclass
class StreamPlan:
    key: str
    error: str | None = None  # "429", "503" or "reset": the connection is refused
    drop_after: int | None = None  # cut after this many frames ...
    drop_mid_frame: bool = False  # ... half-way through the next one
    stall_after: int | None = None  # go silent after this many frames
    stall_s: float = 0.0
    replay: int = 0  # resumes only: start this many events before the cursor
    non_json_rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    log: list[tuple[str, str]] | None = None

    def garbage(self, frame_no: int) -> bytes | None:
        """A frame whose data is not JSON, to go before frame ``frame_no``, or None."""
        if not self.non_json_rate or self.rng.random() >= self.non_json_rate:
            return None
        if self.log is not None:
            self.log.append((self.key, f"non_json before frame {frame_no}"))
        return self.rng.choice(_GARBAGE)

    @property
    def frame_faults(self) -> bool:
        return bool(self.drop_after is not None or self.stall_after is not None)

    def describe(self) -> str:
        parts = []
        if self.error:
            parts.append(f"error {self.error}")
        if self.drop_after is not None:
            where = "mid-frame" if self.drop_mid_frame else "between frames"
            parts.append(f"drop after {self.drop_after} frames {where}")
        if self.stall_after is not None:
            parts.append(f"stall {self.stall_s}s after {self.stall_after} frames")
        if self.replay:
            parts.append(f"replay {self.replay}")
        return ", ".join(parts)


class FaultPlanner:
    def __init__(self, seed: int, faults: Faults) -> None:
        self.seed = seed
        self.faults = faults
        self.log: list[tuple[str, str]] = []
        self._asked: dict[str, int] = defaultdict(int)

    def _rng(self, key: str) -> random.Random:
        n = self._asked[key]
        self._asked[key] = n + 1
        return random.Random(f"{self.seed}|{key}|{n}")

    def _error(self, rng: random.Random) -> str | None:
        if rng.random() >= self.faults.error_rate:
            return None
        return rng.choices(ERROR_KINDS, weights=self.faults.error_mix)[0]

    def request(self, key: str) -> str | None:
        """The error a JSON request gets (``"429"``, ``"503"``, ``"reset"``) or None."""
        if not self.faults.error_rate:
            return None
        error = self._error(self._rng(key))
        if error:
            self.log.append((key, f"error {error}"))
        return error

    def stream(self, key: str, *, resuming: bool) -> StreamPlan:
        f = self.faults
        rng = self._rng(key)
        plan = StreamPlan(key, non_json_rate=f.non_json_rate, rng=rng, log=self.log)
        # Always draw in the same order so one knob does not shift another's decisions.
        error = self._error(rng)
        drop, mid = rng.random() < f.drop_rate, rng.random() < f.drop_mid_frame_rate
        drop_after = rng.randint(*f.drop_after_frames)
        stall, stall_after = rng.random() < f.stall_rate, rng.randint(*f.stall_after_frames)
        replay, replay_n = rng.random() < f.replay_rate, rng.randint(1, f.replay_max)
        if error:
            plan.error = error
        else:
            if drop:
                plan.drop_after, plan.drop_mid_frame = max(drop_after, 1), mid
            if stall:
                plan.stall_after, plan.stall_s = stall_after, f.stall_s
            if replay and resuming:
                plan.replay = replay_n
        if described := plan.describe():
            self.log.append((key, described))
        return plan


# Lone surrogates stand for the bytes they escape: encoded with "surrogateescape", "\udcff" is
# a lone 0xff and "\udce2\udc82" the first two bytes of "€" without the third.
_BAD_UTF8 = ("\udcff", "\udce2\udc82")
_IDENTITY = ("id", "type", "processed_at", "session_thread_id")
_NO_ID = b'{"type":"agent.message","content":[{"type":"text","text":"An item with no id."}]}'
_NOT_OBJECTS = (b"null", b"42", b'"text"', b"[]")


class ItemFaults:
    """One thread's generation-time faults, each from its own generator seeded with (seed,
    thread key), so one knob does not shift the other's decisions."""

    def __init__(self, seed: int, key: str, faults: Faults) -> None:
        self.utf8_rate = faults.invalid_utf8_rate
        self.malformed_rate = faults.malformed_item_rate
        self._utf8 = random.Random(f"{seed}|utf8:{key}")
        self._items = random.Random(f"{seed}|malformed:{key}")
        self._corrupted = self._made = 0

    def corrupt(self, event: dict[str, Any]) -> bytes | None:
        """The event's bytes with invalid UTF-8 inside one string value, or None."""
        if not self.utf8_rate:
            return None
        rng = self._utf8
        hit, which, where = rng.random() < self.utf8_rate, rng.random(), rng.random()
        if not hit:
            return None
        bad = _BAD_UTF8[self._corrupted % len(_BAD_UTF8)]
        self._corrupted += 1
        leaves = list(_strings(event, ()))
        if leaves:
            path = leaves[int(which * len(leaves))]
            value = _get(event, path)
            at = int(where * (len(value) + 1))
            event = _replace(event, path, value[:at] + bad + value[at:])
        else:  # nothing but identity fields: an extra field carries it
            event = {**event, "x_note": "note " + bad}
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8", "surrogateescape")

    def malformed(self) -> tuple[bytes, str] | None:
        """An item to follow the event just made, and its event name ("" for none): in turn
        an object without an id, and a JSON value that is not an object."""
        if not self.malformed_rate or self._items.random() >= self.malformed_rate:
            return None
        n, self._made = self._made, self._made + 1
        if n % 2 == 0:
            return _NO_ID, "agent.message"
        return _NOT_OBJECTS[n // 2 % len(_NOT_OBJECTS)], ""


def _strings(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
    """Paths to the string values that neither name nor type anything."""
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in _IDENTITY and not key.endswith(("_id", "_ids", "_at")):
                yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*path, i))


def _get(value: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def _replace(value: Any, path: tuple[str | int, ...], new: str) -> Any:
    """A copy of ``value`` with the leaf at ``path`` replaced (the original is shared)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, list):
        return [_replace(v, rest, new) if i == head else v for i, v in enumerate(value)]
    return {k: _replace(v, rest, new) if k == head else v for k, v in value.items()}
