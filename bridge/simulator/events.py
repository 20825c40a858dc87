"""Realistic event scripts (the catalog of qoder-api.md section 5), generated from a seed.

A script is a list of :class:`Step` values made up front; ids and times are given only when a
step is emitted (:meth:`Step.materialize`), so a step that points at an earlier one (a tool
result at its tool use, a span end at its start, ``requires_action`` at the pending tool use)
holds the earlier step's index and is resolved then.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from bridge.simulator.clock import Stamp

_TOOLS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Bash", "command", ("pytest -q tests/unit", "git status --short", "ls -la src/", "make lint")),
    ("Read", "file_path", ("src/app/main.py", "README.md", "docs/设计.md", "pyproject.toml")),
    ("Grep", "pattern", ("def handle_", "TODO|FIXME", "class .*Error", "retry_after")),
    ("Glob", "pattern", ("**/*.py", "src/**/*.ts", "deploy/**/*.yaml")),
    ("Edit", "file_path", ("src/app/retry.py", "src/app/config.py", "tests/test_retry.py")),
    ("WebFetch", "url", ("https://docs.qoder.com/cloud-agents/api", "https://example.com/ü")),
)
_PLAIN = (
    "I'll start by reading the failing test to see what it expects.",
    "The retry loop never resets its backoff after a healthy connection; fixing that.",
    "All 214 tests pass now. Summary of the change:\n- backoff resets after 5 s\n- jitter",
    'Found it: the config key is "retry_max" but the code reads "max_retry".',
    "Delegating the benchmark run to a child thread so the review can continue.",
    'Tabs\tand a backslash \\ and a quote " survive JSON round trips.',
)
_UNICODE = (
    "请调研 Cloud Agents API 的最新竞品动态。",
    "テストはすべて成功しました ✅ 次はドキュメントを更新します。",
    "مرحبا! تم تحديث الملف بنجاح 🎉",
    "שלום עולם — בדיקה של טקסט מימין לשמאל",
    "Rocket 🚀 family 👨‍👩‍👧‍👦 flag 🇯🇵 and Ω≈ç√∫ in one line",
    "한국어 텍스트와 emoji 🧪 를 섞어서 보냅니다.",
)
# Valid JSON, raw in the data line; only CR and LF end an SSE line, but a client splitting lines
# like str.splitlines() (httpx's aiter_lines does) breaks this frame in two.
_SEPARATORS = "line\u2028separator, paragraph\u2029separator and next\u0085line in one string"
_AGENTS = ("researcher", "test-runner", "reviewer", "doc-writer", "benchmarker", "研究员")


@dataclass(frozen=True, slots=True)
class Step:
    type: str
    body: dict[str, Any]
    refs: tuple[tuple[str, int], ...] = ()  # (dotted field path, index of an earlier step)

    def materialize(
        self, event_id: str, stamp: Stamp, thread_id: str, resolve: list[str]
    ) -> dict[str, Any]:
        body = dict(self.body)
        for path, index in self.refs:
            head, _, leaf = path.partition(".")
            if leaf:  # one level deep is all the catalog needs (stop_reason.event_ids)
                body[head] = {**body[head], leaf: [resolve[index]]}
            else:
                body[head] = resolve[index]
        extra = body.pop("x_extra", None)
        event = {"id": event_id, "type": self.type, "processed_at": stamp.rfc3339}
        event["session_thread_id"] = thread_id
        event.update(body)
        if extra:
            event.update(extra)
        return event


@dataclass
class Script:
    steps: list[Step] = field(default_factory=list)
    spawn_at: int = 0  # coordinator: children may be spawned once this many steps are out
    hold_at: int | None = None  # coordinator: the wrap-up from here waits for the children


class Writer:
    """Makes the steps of one thread's runs; every choice comes from the thread's own rng."""

    def __init__(
        self,
        rng: random.Random,
        *,
        unicode_rate: float,
        separator_rate: float,
        extra_rate: float,
        huge: tuple[float, int],
    ) -> None:
        self.rng = rng
        self.unicode_rate = unicode_rate
        self.separator_rate = separator_rate
        self.extra_rate = extra_rate
        self.huge_rate, self.huge_bytes = huge

    def text(self) -> str:
        roll = self.rng.random()
        if roll < self.separator_rate:
            return _SEPARATORS
        return self.rng.choice(_UNICODE if roll < self.unicode_rate else _PLAIN)

    def blocks(self) -> list[dict[str, str]]:
        return [{"type": "text", "text": self.text()}]

    def step(self, kind: str, body: dict[str, Any], *refs: tuple[str, int]) -> Step:
        if self.rng.random() < self.extra_rate:
            body["x_extra"] = self._extra()
        return Step(kind, body, refs)

    def agent_name(self) -> str:
        return self.rng.choice(_AGENTS)

    def coordinator(self, events: int, *, first: bool) -> Script:
        """user.message, session.status_running, one or more model requests, status_idle."""
        steps = [self.step("user.message", {"content": self.blocks()})]
        steps.append(self.step("session.status_running", {}))
        self._requests(steps, max(3, events - 3), asks=True)
        steps.append(self.step("session.status_idle", {"stop_reason": {"type": "end_turn"}}))
        # The coordinator spawns children after its first thought; its closing message waits.
        hold_at = len(steps) - 3
        return Script(steps, spawn_at=min(4, hold_at), hold_at=hold_at if first else None)

    def child(self, events: int) -> Script:
        """The body of a child's turn; the driver frames it with the lifecycle events."""
        steps: list[Step] = []
        self._requests(steps, max(3, events - 5), asks=False)
        return Script(steps)

    def _requests(self, steps: list[Step], budget: int, *, asks: bool) -> None:
        start = len(steps)
        steps.append(self.step("span.model_request_start", {}))
        left = budget - 3  # reserved: the start above, the closing message and span end
        while left > 0:
            roll = self.rng.random()
            if roll < 0.45 and left >= 2:
                ask = asks and left >= 6 and self.rng.random() < 0.15
                left -= self._tool(steps, ask=ask)
            elif roll < 0.65:
                steps.append(self.step("agent.thinking", self._thinking()))
                left -= 1
            elif roll < 0.72 and left >= 2:  # one model request ends, the next begins
                steps.append(self._span_end(start))
                start = len(steps)
                steps.append(self.step("span.model_request_start", {}))
                left -= 2
            elif roll < 0.75:
                steps.append(self.step("session.error", {"error": self._error()}))
                left -= 1
            else:
                steps.append(self.step("agent.message", {"content": self.blocks()}))
                left -= 1
        steps.append(self.step("agent.message", {"content": self.blocks()}))
        steps.append(self._span_end(start))

    def _tool(self, steps: list[Step], *, ask: bool) -> int:
        name, key, values = self.rng.choice(_TOOLS)
        use: dict[str, Any] = {"name": name, "input": {key: self.rng.choice(values)}}
        use["evaluated_permission"] = "ask" if ask else "allow"
        at = len(steps)
        steps.append(self.step("agent.tool_use", use))
        if ask:  # paused for a confirmation, then resumed: five events instead of two
            idle = {"stop_reason": {"type": "requires_action", "event_ids": []}}
            steps.append(self.step("session.status_idle", idle, ("stop_reason.event_ids", at)))
            confirm = {"tool_use_id": "", "result": "allow"}
            steps.append(self.step("user.tool_confirmation", confirm, ("tool_use_id", at)))
            steps.append(self.step("session.status_running", {}))
        result = {"tool_use_id": "", "content": self._output(), "is_error": False}
        steps.append(self.step("agent.tool_result", result, ("tool_use_id", at)))
        return 5 if ask else 2

    def _span_end(self, start: int) -> Step:
        usage = {
            "input_tokens": self.rng.randint(800, 40_000),
            "output_tokens": self.rng.randint(20, 2_000),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.rng.randint(0, 30_000),
        }
        body = {"model_request_start_id": "", "is_error": False, "model_usage": usage}
        return self.step("span.model_request_end", body, ("model_request_start_id", start))

    def _thinking(self) -> dict[str, Any]:
        # Docs disagree: some show the reasoning text, the current pack shows none at all.
        return {"thinking": self.text()} if self.rng.random() < 0.5 else {}

    def _output(self) -> list[dict[str, str]]:
        if self.rng.random() < self.huge_rate:
            line = "build log ✓ 构建 " + "x" * 80 + "\n"
            return [{"type": "text", "text": line * (self.huge_bytes // len(line.encode()) + 1)}]
        return self.blocks()

    def _error(self) -> dict[str, Any]:
        return {
            "type": self.rng.choice(("model_overloaded_error", "unknown_error")),
            "message": "The operation was aborted due to timeout",
            "retry_status": {"type": "retrying"},
        }

    def _extra(self) -> dict[str, Any]:
        trace = f"{self.rng.getrandbits(128):032x}"
        if self.rng.random() < 0.5:
            return {"x_trace": {"trace_id": trace, "sampled": True, "hops": [1, 2.5, None]}}
        return {"x_region": "cn-hangzhou", "x_trace": {"trace_id": trace}}
