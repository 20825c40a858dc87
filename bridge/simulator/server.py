"""Runs the simulator on a real socket: in-process for tests, or until a signal for the CLI."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import anyio
import uvicorn
from anyio.abc import TaskGroup

from bridge.errors import ConfigError
from bridge.simulator.app import BASE, App, Connection
from bridge.simulator.driver import Driver
from bridge.simulator.named import load_scenario
from bridge.simulator.scenario import Scenario
from bridge.simulator.state import SessionState, ThreadState, World


class Simulator:
    """The handle tests hold: where it listens, what it emitted and served, runtime switches."""

    def __init__(self, scenario: Scenario, token: str | None, host: str, port: int) -> None:
        self.scenario = scenario
        self.world = World(scenario)
        self.driver = Driver(self.world)
        self.app = App(self.world, token)
        self.host, self.port = host, port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{BASE}"

    @property
    def token(self) -> str | None:
        return self.app.token

    # what was emitted ----------------------------------------------------------------------

    def thread_log(self, session_id: str, thread_id: str) -> list[bytes]:
        """Every buffered event of the thread so far, in order, as canonical JSON bytes."""
        return [e.raw for e in self._thread(session_id, thread_id).log.events if e.id]

    def thread_items(self, session_id: str, thread_id: str) -> list[bytes]:
        """What the thread's lists and streams serve, in order: its events and the malformed
        items (no id, or no object) among them."""
        return [e.raw for e in self._thread(session_id, thread_id).log.events]

    def session_log(self, session_id: str) -> list[bytes]:
        """The session-level events (coordinator activity and thread lifecycle)."""
        return [e.raw for e in self._session(session_id).log.events if e.id]

    def session_items(self, session_id: str) -> list[bytes]:
        """The session-level events and the malformed items among them."""
        return [e.raw for e in self._session(session_id).log.events]

    def _session(self, session_id: str) -> SessionState:
        session = self.world.session(session_id)
        if session is None:
            raise KeyError(session_id)
        return session

    def _thread(self, session_id: str, thread_id: str) -> ThreadState:
        session = self.world.session(session_id)
        thread = session.thread(thread_id) if session else None
        if thread is None:
            raise KeyError((session_id, thread_id))
        return thread

    def all_threads(self) -> list[tuple[str, str]]:
        return [(s.id, t.id) for s in self.world.sessions for t in s.threads]

    def session_ids(self) -> list[str]:
        return [s.id for s in self.world.sessions]

    def thread_status(self, session_id: str, thread_id: str) -> str:
        return self._thread(session_id, thread_id).status

    async def wait_idle(self) -> None:
        """Until the scenario has emitted everything and no thread is running."""
        await self.driver.idle.wait()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Until ``predicate()`` holds, checked after every change (bound it with fail_after)."""
        while not predicate():
            await self.world.changed().wait()

    # what was served -----------------------------------------------------------------------

    @property
    def served(self) -> dict[tuple[str, str], list[list[str]]]:
        """Per thread, per stream connection, the ids of the buffered events served, in order."""
        return self.app.served

    @property
    def connections(self) -> list[Connection]:
        return self.app.connections

    @property
    def fault_log(self) -> list[tuple[str, str]]:
        """Every fault injected, in the order decided: (what was asked for, the fault)."""
        return self.app.planner.log

    @property
    def open_streams(self) -> int:
        return len(self.app.open)

    @property
    def cap_refusals(self) -> list[tuple[str, str]]:
        """Stream opens refused over ``connection_cap``: (client digest, path), in order."""
        return self.app.cap_refusals

    # runtime switches ----------------------------------------------------------------------

    def set_token(self, token: str | None, *, drop_streams: bool = True) -> None:
        """Accept only ``token`` from now on (None: refuse everyone); open streams are cut."""
        self.app.token = token
        if drop_streams:
            self.app.cut_streams()

    def outage(self, status: int = 503, duration_s: float | None = 30.0) -> None:
        """Every request fails with ``status`` (429 with Retry-After, 5xx with the api_error
        envelope, 0 = connection reset) for ``duration_s`` (None: until :meth:`end_outage`).
        Open streams are cut."""
        self.app.outage_status = status
        self.app.outage_until = None if duration_s is None else time.monotonic() + duration_s
        self.app.cut_streams()

    def end_outage(self) -> None:
        self.app.outage_status = self.app.outage_until = None

    def drop_streams(self) -> None:
        """Cut every open stream now, mid-response."""
        self.app.cut_streams()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # In-process the host owns the signals; serve() below installs its own handlers.
        yield


class running_simulator:  # lower case: reads as a function at the call site, like open()
    """``async with running_simulator(scenario, token="pt-test") as sim:`` serves on a real
    socket (``port=0``: an ephemeral one) until the block ends."""

    def __init__(
        self,
        scenario: Scenario | str | Path = "default",
        *,
        token: str | None = "pt-test",  # noqa: S107 - the suite's test token, no secret
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._scenario = load_scenario(scenario)
        self._token, self._host, self._port = token, host, port
        self._tg: TaskGroup | None = None
        self._server: _Server | None = None
        self._driver_scope = anyio.CancelScope()
        self._served = anyio.Event()

    async def __aenter__(self) -> Simulator:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then (else
        # Nagle holds every body behind its headers for a delayed ACK, 40 ms a response).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"simulator: cannot listen on {self._host}:{self._port}: {exc}"
            ) from exc
        sock.listen(4096)  # accepting starts now: clients may connect before uvicorn is up
        sim = Simulator(self._scenario, self._token, self._host, sock.getsockname()[1])
        config = uvicorn.Config(
            sim.app,
            http="httptools",
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=2,
        )
        self._server = server = _Server(config)
        sim.driver.start()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._serve, server, sock)
        self._tg.start_soon(self._drive, sim.driver)
        self._sim = sim
        return sim

    async def _serve(self, server: _Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            self._served.set()

    async def _drive(self, driver: Driver) -> None:
        with self._driver_scope:
            await driver.run()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._tg is None or self._server is None:
            return None
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            self._driver_scope.cancel()
            self._sim.app.cut_streams("end")
            self._server.should_exit = True
            await self._served.wait()
        cancelled = exc is not None and isinstance(exc, anyio.get_cancelled_exc_class())
        # The tasks have ended; an error of the body propagates as itself, not in a group.
        if cancelled:
            return await self._tg.__aexit__(exc_type, exc, tb)
        await self._tg.__aexit__(None, None, None)
        return None


def serve(host: str, port: int, scenario: str | Path | Scenario, token: str) -> None:
    """Serves the simulator until SIGINT or SIGTERM (``qoder-bridge simulate``)."""
    if not token:
        raise ConfigError("simulator: a token is required (--token or QODER_ACCESS_TOKEN)")
    anyio.run(_serve_until_signal, host, port, load_scenario(scenario), token)


async def _serve_until_signal(host: str, port: int, scenario: Scenario, token: str) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with running_simulator(scenario, token=token, host=host, port=port) as sim:
            print(
                f"Qoder API simulator: {sim.base_url} (scenario {scenario.name!r});"
                " Ctrl-C stops it",
                file=sys.stderr,
                flush=True,
            )
            async for _ in signals:
                break
