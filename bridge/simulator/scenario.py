"""What the simulator plays: sessions, their threads, timing, server behaviour and faults.

A scenario is a frozen value. Build it in Python, load it from a small JSON or TOML file
(keys = field names; ``count`` repeats a session or thread spec; ``children = 30`` is shorthand
for thirty default children), or pick a named built-in (:mod:`bridge.simulator.named`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from bridge.errors import ConfigError

_T = TypeVar("_T")

FreshStream = Literal["replay", "tail"]
HeartbeatForm = Literal["comment", "event"]
ThreadRoutes = Literal["both", "events", "stream"]
FinalStatus = Literal["idle", "archived", "terminated"]
Pagination = Literal["next_page", "after_id"]
StreamQuery = Literal["lenient", "strict"]
CapAnswer = Literal["429", "503", "reset"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"scenario: {message}")


def _check_one_of(name: str, value: object, choices: Any) -> None:
    allowed = typing.get_args(choices)
    _check(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class ThreadSpec:
    """One thread: the coordinator of a session or one of its children."""

    events: int = 12  # events of the thread's own script (at least the few that frame a turn)
    rate: float = 20.0  # events per second, jittered +-50%; 0 = burst (all at once)
    start_after_s: float = 0.0  # children: created this long after the session starts
    final_status: FinalStatus = "idle"
    rerun_after_s: float | None = None  # runs one more turn this long after going idle
    rerun_events: int = 8
    agent_name: str = ""  # "" = picked from a pool

    def __post_init__(self) -> None:
        _check(self.events >= 0 and self.rerun_events >= 0, "events must be >= 0")
        _check(self.rate >= 0 and self.start_after_s >= 0, "rate and start_after_s must be >= 0")
        _check(self.rerun_after_s is None or self.rerun_after_s >= 0, "rerun_after_s must be >= 0")


@dataclass(frozen=True)
class SessionSpec:
    coordinator: ThreadSpec = ThreadSpec()
    children: tuple[ThreadSpec, ...] = ()
    start_after_s: float = 0.0  # the session appears (is listed) this long after start
    title: str = ""
    terminate: bool = False  # ends with session.status_terminated (no reruns after it)
    archive: bool = False  # archived_at is set once every thread has finished

    def __post_init__(self) -> None:
        _check(self.start_after_s >= 0, "start_after_s must be >= 0")


@dataclass(frozen=True)
class Faults:
    """Deterministic given the scenario's seed: the n-th connection to a thread always gets the
    same plan, the m-th frame on it the same treatment, whatever the wall clock does."""

    error_rate: float = 0.0  # requests (JSON and stream opens) answered with an error
    error_mix: tuple[float, float, float] = (1.0, 1.0, 1.0)  # weights of 429, 503, reset
    retry_after_s: int = 1  # Retry-After on 429
    drop_rate: float = 0.0  # stream connections cut after k frames
    drop_after_frames: tuple[int, int] = (1, 40)  # k drawn uniformly from this range
    drop_mid_frame_rate: float = 0.5  # of the cuts, the share made inside a frame
    stall_rate: float = 0.0  # stream connections that go silent (no heartbeats either)
    stall_after_frames: tuple[int, int] = (0, 20)
    stall_s: float = 3600.0
    # Resumed connections that first go back k events (1..replay_max) before the cursor and
    # resend from there: k older events, the cursor's own, then what is new.
    replay_rate: float = 0.0
    replay_max: int = 3
    non_json_rate: float = 0.0  # per frame: a frame whose data is not JSON goes first
    huge_rate: float = 0.0  # share of tool results that are huge
    huge_bytes: int = 300_000
    # Decided per event when it is made, so every page and stream serves the same bytes:
    invalid_utf8_rate: float = 0.0  # events with invalid UTF-8 inside a string value
    malformed_item_rate: float = 0.0  # events followed by an item with no id, or no object

    def __post_init__(self) -> None:
        for name in ("error_rate", "drop_rate", "drop_mid_frame_rate", "stall_rate"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"faults.{name} must be within 0..1")
        for name in ("replay_rate", "non_json_rate", "huge_rate"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"faults.{name} must be within 0..1")
        for name in ("invalid_utf8_rate", "malformed_item_rate"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"faults.{name} must be within 0..1")
        for name in ("drop_after_frames", "stall_after_frames"):
            low, high = getattr(self, name)
            _check(0 <= low <= high, f"faults.{name} must be [low, high] with 0 <= low <= high")
        _check(sum(self.error_mix) > 0 and min(self.error_mix) >= 0, "faults.error_mix weights")
        _check(self.stall_s >= 0 and self.huge_bytes > 0, "faults.stall_s / huge_bytes")
        _check(self.replay_max >= 1, f"faults.replay_max must be >= 1, got {self.replay_max}")


@dataclass(frozen=True)
class Scenario:
    name: str = "custom"
    seed: int = 0
    sessions: tuple[SessionSpec, ...] = (SessionSpec(),)
    instant: bool = False  # every event generated at start, no waiting (throughput tests)
    repeat_every_s: float | None = None  # start the sessions again (new ids) this often
    fresh_stream: FreshStream = "tail"  # stream without cursor: whole history first, or live tail
    heartbeat: HeartbeatForm = "comment"  # ": heartbeat" or "event: heartbeat / data: {}"
    heartbeat_interval_s: float = 15.0
    thread_stream_routes: ThreadRoutes = "both"  # which thread-stream route answers (else 404)
    honour_thread_statuses: bool = False  # G2 filtered threads by statuses[]; G3/G4 ignore it
    deltas: bool = False  # stream-only event_start/event_delta frames before live messages
    close_on_terminal: bool = False  # end a stream cleanly once its thread/session is final
    # Lists: "next_page" (G3/G4: page tokens) or "after_id" (older CN docs: id cursors only,
    # no next_page key in the envelope, a page parameter is a 400).
    pagination: Pagination = "next_page"
    # Query parameters on event streams: "lenient" takes after_id as a cursor and ignores the
    # rest; "strict" (Forward) refuses any, even empty, with 400 invalid_request, so the
    # cursor can only come from Last-Event-ID.
    stream_query: StreamQuery = "lenient"
    # The gateway's cap on event streams open at once per client (bearer token); None: no
    # cap. One more stream is refused with connection_cap_answer; JSON requests never are.
    connection_cap: int | None = None
    connection_cap_answer: CapAnswer = "reset"
    extra_field_rate: float = 0.1  # events carrying unknown fields (x_trace, x_region)
    unicode_rate: float = 0.3  # texts with emoji, CJK, RTL
    line_separator_rate: float = 0.03  # texts with U+2028/U+2029/U+0085 (raw in data lines)
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        _check(self.heartbeat_interval_s > 0, "heartbeat_interval_s must be > 0")
        _check(self.repeat_every_s is None or self.repeat_every_s > 0, "repeat_every_s > 0")
        for name in ("extra_field_rate", "unicode_rate", "line_separator_rate"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be within 0..1")
        _check_one_of("pagination", self.pagination, Pagination)
        _check_one_of("stream_query", self.stream_query, StreamQuery)
        cap = self.connection_cap
        _check(cap is None or cap >= 0, f"connection_cap must be >= 0 or unset, got {cap}")
        _check_one_of("connection_cap_answer", self.connection_cap_answer, CapAnswer)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scenario:
        return _build(cls, data, "scenario")

    @classmethod
    def from_file(cls, path: Path) -> Scenario:
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"scenario file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"scenario file {path}: expected an object at the top level")
        data.setdefault("name", path.stem)
        return cls.from_dict(data)


_NESTED: dict[str, type] = {
    "faults": Faults,
    "coordinator": ThreadSpec,
    "children": ThreadSpec,
    "sessions": SessionSpec,
}


def _build(cls: type[_T], data: Mapping[str, Any], where: str) -> _T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
        if key in ("children", "sessions"):
            values[key] = _build_many(_NESTED[key], raw, f"{where}.{key}")
        elif key in _NESTED:
            values[key] = _build(_NESTED[key], _mapping(raw, f"{where}.{key}"), f"{where}.{key}")
        else:
            values[key] = _coerce(raw, hints[key], f"{where}.{key}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _build_many(cls: type, raw: Any, where: str) -> tuple[Any, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = {"count": raw}
    items = [raw] if isinstance(raw, Mapping) else raw
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list, an object or a count")
    built: list[Any] = []
    for i, item in enumerate(items):
        spec = dict(_mapping(item, f"{where}[{i}]"))
        count = spec.pop("count", 1)
        if not isinstance(count, int) or count < 0:
            raise ConfigError(f"{where}[{i}].count: expected an integer >= 0")
        built.extend([_build(cls, spec, f"{where}[{i}]")] * count)
    return tuple(built)


def _mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected an object")
    return raw


def _coerce(raw: Any, hint: Any, where: str) -> Any:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(raw, int) and not isinstance(raw, bool) and str(raw) in args:
            return str(raw)  # connection_cap_answer = 429 means "429"
        if raw not in args:
            raise ConfigError(f"{where}: {raw!r} is not one of {', '.join(map(str, args))}")
        return raw
    if origin is tuple:
        if not isinstance(raw, list | tuple) or len(raw) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers")
        return tuple(_coerce(v, a, where) for v, a in zip(raw, args, strict=True))
    if type(None) in args:
        return (
            None
            if raw is None
            else _coerce(raw, next(a for a in args if a is not type(None)), where)
        )
    if hint is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if hint in (int, str, bool) and type(raw) is hint:
        return raw
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {raw!r}")
