"""Plays a scenario: one task, one heap of timed actions, every session and thread in it.

A coordinator runs its script; once it has had its first thought it spawns the children (each
at its own ``start_after_s``), and its closing message waits until every child has reported
back. Children run their script framed by lifecycle events; finishing, they message the
coordinator, which records the matching tool result. In instant mode the same actions run
back to back at start-up, in the same order, without waiting.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from bridge.simulator.events import Script, Step, Writer
from bridge.simulator.scenario import Scenario, SessionSpec, ThreadSpec
from bridge.simulator.state import SessionState, ThreadState, World

Action = Callable[[float], None]
_SLICE_S = 0.005


@dataclass(eq=False)
class _Run:
    thread: ThreadState
    writer: Writer
    script: Script
    rerun: bool = False
    pos: int = 0
    resolve: list[str] = field(default_factory=list)
    spawn_tool_use: str = ""  # children: the coordinator's tool use that spawned them


@dataclass(eq=False)
class _Session:
    state: SessionState
    coordinator: _Run
    pending: list[tuple[float, ThreadSpec]]  # children not spawned yet: (due, spec)
    unfinished: int  # children whose first run has not ended
    spawning: bool = False
    holding: bool = False
    busy_reruns: int = 0


class Driver:
    def __init__(self, world: World) -> None:
        self.world = world
        self.scenario: Scenario = world.scenario
        self._heap: list[tuple[float, int, Action]] = []
        self._seq = itertools.count()
        self._ordinals = itertools.count()
        self.idle = anyio.Event()
        self._started = 0.0
        for spec in self.scenario.sessions:
            self._at(spec.start_after_s, self._session_starter(spec))
        if self.scenario.repeat_every_s:
            self._at(self.scenario.repeat_every_s, self._repeat)

    def start(self) -> None:
        """Plays what is due at once (sessions starting at 0 exist when the server is up); in
        instant mode, plays everything."""
        self._started = anyio.current_time()
        while self._heap and (self.scenario.instant or self._heap[0][0] <= 0):
            due, _, action = heapq.heappop(self._heap)
            action(due)
        if not self._heap:
            self.idle.set()

    async def run(self) -> None:
        while self._heap:
            now = anyio.current_time() - self._started
            if self._heap[0][0] > now:
                await anyio.sleep(self._heap[0][0] - now)
                continue
            # Everything due goes out back to back, so a stream woken once sends it all in one
            # write; a time slice bounds how long the streams wait for the loop.
            until = time.monotonic() + _SLICE_S
            while self._heap and self._heap[0][0] <= now and time.monotonic() < until:
                due, _, action = heapq.heappop(self._heap)
                action(due)
            await anyio.lowlevel.checkpoint()
        self.idle.set()

    def _at(self, due: float, action: Action) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), action))

    def _writer(self, thread_key: str, run: int) -> Writer:
        scenario = self.scenario
        return Writer(
            random.Random(f"{scenario.seed}/{thread_key}/{run}"),
            unicode_rate=scenario.unicode_rate,
            separator_rate=scenario.line_separator_rate,
            extra_rate=scenario.extra_field_rate,
            huge=(scenario.faults.huge_rate, scenario.faults.huge_bytes),
        )

    # sessions ------------------------------------------------------------------------------

    def _session_starter(self, spec: SessionSpec) -> Action:
        return lambda now: self._start_session(spec, now)

    def _repeat(self, now: float) -> None:
        for spec in self.scenario.sessions:
            self._at(now + spec.start_after_s, self._session_starter(spec))
        self._at(now + (self.scenario.repeat_every_s or 0.0), self._repeat)

    def _start_session(self, spec: SessionSpec, now: float) -> None:
        ordinal = next(self._ordinals)
        name = spec.coordinator.agent_name or "coordinator"
        state = self.world.add_session(spec, ordinal, name)
        thread = self.world.add_thread(state, spec.coordinator, name, None)
        writer = self._writer(thread.key, 0)
        run = _Run(thread, writer, writer.coordinator(spec.coordinator.events, first=True))
        pending = [(now + child.start_after_s, child) for child in spec.children]
        session = _Session(state, run, pending, len(spec.children))
        if not spec.children:
            run.script.hold_at = None
        self._at(now, lambda t: self._step(session, run, t))

    # threads -------------------------------------------------------------------------------

    def _step(self, session: _Session, run: _Run, now: float) -> None:
        """Emits the run's next step, or all of them in a burst, up to a gate."""
        steps = run.script.steps
        while True:
            if run is session.coordinator and not run.rerun:
                if run.pos >= run.script.spawn_at and not session.spawning:
                    session.spawning = True
                    for due, spec in session.pending:
                        self._at(max(now, due), self._spawner(session, spec))
                if run.pos == run.script.hold_at and session.unfinished:
                    session.holding = True
                    return
            if run.pos >= len(steps):
                self._finish(session, run, now)
                return
            self.world.emit(run.thread, steps[run.pos], run.resolve)
            run.pos += 1
            rate = run.thread.spec.rate
            if rate > 0 and run.pos < len(steps):
                delay = run.writer.rng.uniform(0.5, 1.5) / rate
                self._at(now + delay, lambda t: self._step(session, run, t))
                return

    def _spawner(self, session: _Session, spec: ThreadSpec) -> Action:
        return lambda now: self._spawn(session, spec, now)

    def _spawn(self, session: _Session, spec: ThreadSpec, now: float) -> None:
        world, coordinator = self.world, session.coordinator.thread
        cw = session.coordinator.writer
        name = spec.agent_name or cw.agent_name()
        use = world.emit(coordinator, cw.step("agent.tool_use", _delegate(name, cw.text())))
        thread = world.add_thread(session.state, spec, name, coordinator)
        writer = self._writer(thread.key, 0)
        created = {
            "parent_thread_id": coordinator.id,
            "agent_name": name,
            "created_by_tool_use_id": use.id,
        }
        world.emit(thread, writer.step("session.thread_created", created))
        world.emit(thread, writer.step("session.thread_status_running", {"agent_name": name}))
        self._message(coordinator, thread, cw)
        run = _Run(thread, writer, writer.child(spec.events), spawn_tool_use=use.id)
        self._at(now, lambda t: self._step(session, run, t))

    def _message(self, sender: ThreadState, receiver: ThreadState, writer: Writer) -> None:
        """One message from thread to thread: "sent" in the sender's log, "received" in the
        receiver's, both on the session stream."""
        body = {
            "from_session_thread_id": sender.id,
            "to_session_thread_id": receiver.id,
            "from_agent_name": sender.agent["name"],
            "to_agent_name": receiver.agent["name"],
            "content": writer.blocks(),
        }
        self.world.emit(sender, Step("agent.thread_message_sent", body))
        self.world.emit(receiver, Step("agent.thread_message_received", body))

    def _finish(self, session: _Session, run: _Run, now: float) -> None:
        world, thread, spec = self.world, run.thread, run.thread.spec
        if thread.parent_id is None:
            self._finish_coordinator(session, run, now)
        else:
            coordinator = session.coordinator.thread
            self._message(thread, coordinator, run.writer)
            agent = {"agent_name": thread.agent["name"]}
            terminated = spec.final_status == "terminated" and (run.rerun or not spec.rerun_after_s)
            if terminated:
                world.emit(thread, run.writer.step("session.thread_status_terminated", agent))
                world.set_status(thread, "terminated")
            else:
                idle = {**agent, "stop_reason": {"type": "end_turn"}}
                world.emit(thread, run.writer.step("session.thread_status_idle", idle))
                archive = spec.final_status == "archived" and (run.rerun or not spec.rerun_after_s)
                world.set_status(thread, "archived" if archive else "idle", archive=archive)
            if not run.rerun:
                result = {"tool_use_id": run.spawn_tool_use, "is_error": terminated}
                result["content"] = run.writer.blocks()
                cw = session.coordinator.writer
                world.emit(coordinator, cw.step("agent.tool_result", result))
                session.unfinished -= 1
                if session.holding and not session.unfinished:
                    session.holding = False
                    self._at(now, lambda t: self._step(session, session.coordinator, t))
            self._maybe_rerun(session, run, now, thread.final)
        self._maybe_archive(session)

    def _finish_coordinator(self, session: _Session, run: _Run, now: float) -> None:
        world, state = self.world, session.state
        if state.spec.terminate and not run.rerun:
            world.emit(run.thread, run.writer.step("session.status_terminated", {}))
            state.terminated = True
            world.set_status(run.thread, "terminated")
            return
        world.set_status(run.thread, "idle")
        self._maybe_rerun(session, run, now, False)

    def _maybe_rerun(self, session: _Session, run: _Run, now: float, final: bool) -> None:
        after = run.thread.spec.rerun_after_s
        if run.rerun or final or after is None or session.state.spec.terminate:
            if run.rerun:
                session.busy_reruns -= 1
            return
        session.busy_reruns += 1
        self._at(now + after, lambda t: self._rerun(session, run, t))

    def _rerun(self, session: _Session, first: _Run, now: float) -> None:
        thread = first.thread
        writer = self._writer(thread.key, 1)
        if thread.parent_id is None:
            run = _Run(thread, writer, writer.coordinator(thread.spec.rerun_events, first=False))
        else:
            coordinator = session.coordinator.thread
            self._message(coordinator, thread, writer)
            running = {"agent_name": thread.agent["name"]}
            self.world.emit(thread, writer.step("session.thread_status_running", running))
            run = _Run(thread, writer, writer.child(thread.spec.rerun_events))
        run.rerun = True
        self.world.set_status(thread, "running")
        self._at(now, lambda t: self._step(session, run, t))

    def _maybe_archive(self, session: _Session) -> None:
        state = session.state
        if not state.spec.archive or state.archived_at is not None or session.busy_reruns:
            return
        if session.unfinished or any(t.status == "running" for t in state.threads):
            return
        self.world.archive_session(state)


def _delegate(agent_name: str, task: str) -> dict[str, object]:
    return {
        "name": "delegate",
        "input": {"agent": agent_name, "task": task},
        "evaluated_permission": "allow",
    }
