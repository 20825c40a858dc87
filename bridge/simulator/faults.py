"""Fault plans, deterministic given the seed.

Every decision comes from a random generator seeded with (seed, what is asked for, how many
times it was asked before): the third stream connection to thread ``0.2`` gets the same plan in
every run with the same seed, and the m-th frame on it the same treatment, however the wall
clock and the ids differ between runs. ``FaultPlanner.log`` records every fault in the order
it was decided, for tests that compare two runs.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

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
