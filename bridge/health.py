"""A tiny HTTP/1.1 server for probes and scrapes: ``/livez``, ``/readyz``, ``/metrics``, and
``/status`` for operators (:mod:`bridge.status`).

No framework: one request per connection (``Connection: close``), GET and HEAD only. The request
head is bounded in size and must arrive within ``read_timeout_s``, and at most
``max_connections`` are served at once (the rest get a quick 503), so slow or idle clients cannot
pin the server. ``/status`` answers are large and take a while to build: at most
``max_status`` are built or sent at once, the others get 503 with ``Retry-After``, so operators'
clients (slow or many) never take the places the probes and the scrapes need. It observes the
bridge through :class:`HealthState`; it never calls into it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from prometheus_client.exposition import choose_encoder

from bridge.config import HttpSettings
from bridge.errors import ConfigError
from bridge.metrics import KAFKA_REACHABLE, READY, REGISTRY

__all__ = ["HealthState", "serve_http"]

MAX_REQUEST_HEAD_BYTES = 8192
#: ``/status``: the query string -> the answer's status and JSON body.
StatusSource = Callable[[str], Awaitable[tuple[HTTPStatus, bytes]]]
#: What a client told to wait for a place to build its ``/status`` waits, in seconds.
STATUS_RETRY_AFTER_S = 1

log = structlog.get_logger(__name__)


class HealthState:
    """Readiness checks, each set by the part of the bridge that knows; every change updates
    ``qoder_bridge_ready`` (and ``qoder_bridge_kafka_reachable``).

    ============================  ========================================  ==================
    check                         true when                                 set by
    ============================  ========================================  ==================
    ``producer_connected``        the producer has started (and not been    the publisher
                                  torn down after a failed batch)
    ``kafka_reachable``           the last metadata probe was answered      the Kafka watcher
    ``api_authorized``            the API accepted the token last time      the alerts (token)
    ``discovery_ok``              no configured session is missing (404)    the supervisor
                                  and listing the sessions works
    ``group_member``              the bridge is a member of its group       the ownership
                                  (shards come only from the group)         consumer
    ``not_draining``              no SIGTERM yet                            the app
    ============================  ========================================  ==================

    A new state is not ready: the producer and the API start unknown (false). The Kafka and
    discovery checks start true, meaning "nothing known to be wrong": until the watcher's and
    the supervisor's first look, the producer and token checks already hold readiness back.
    ``detail`` holds one line per failing check that has something to say (the cause of a
    Kafka outage, the sessions that are missing); ``/readyz`` shows it.
    """

    CHECKS = (
        "producer_connected",
        "kafka_reachable",
        "api_authorized",
        "discovery_ok",
        "group_member",
        "not_draining",
    )

    def __init__(self) -> None:
        self._producer_connected = False
        self._kafka_reachable = True
        self._kafka_error: str | None = None
        self._api_authorized = False
        self._discovery_ok = True
        self._discovery_error: str | None = None
        self._missing_sessions: dict[str, str] = {}
        self._group_member = True
        self._group_error: str | None = None
        self._draining = False
        self._publish()

    @property
    def producer_connected(self) -> bool:
        return self._producer_connected

    @producer_connected.setter
    def producer_connected(self, value: bool) -> None:
        self._producer_connected = value
        self._publish()

    @property
    def kafka_reachable(self) -> bool:
        return self._kafka_reachable

    @kafka_reachable.setter
    def kafka_reachable(self, value: bool) -> None:
        self.set_kafka_reachable(value)

    def set_kafka_reachable(self, value: bool, cause: str | None = None) -> None:
        """The watcher's verdict; ``cause`` (when unreachable) is shown by ``/readyz``."""
        self._kafka_reachable = value
        self._kafka_error = None if value else cause
        self._publish()

    @property
    def api_authorized(self) -> bool:
        return self._api_authorized

    @api_authorized.setter
    def api_authorized(self, value: bool) -> None:
        self._api_authorized = value
        self._publish()

    @property
    def discovery_ok(self) -> bool:
        """Listing sessions works and every configured session exists."""
        return self._discovery_ok and not self._missing_sessions

    @discovery_ok.setter
    def discovery_ok(self, value: bool) -> None:
        self.set_discovery(value)

    def set_discovery(self, value: bool, cause: str | None = None) -> None:
        """Whether listing sessions (or looking at the configured ones) works at all."""
        self._discovery_ok = value
        self._discovery_error = None if value else cause
        self._publish()

    def set_group_member(self, value: bool, cause: str | None = None) -> None:
        """Whether the bridge is in its group (out of it, it follows nothing new)."""
        self._group_member = value
        self._group_error = None if value else cause
        self._publish()

    def session_missing(self, session_id: str, cause: str = "not found (HTTP 404)") -> bool:
        """A configured session answered 404; True the first time (warn and alert then)."""
        new = session_id not in self._missing_sessions
        self._missing_sessions[session_id] = cause
        self._publish()
        return new

    def session_found(self, session_id: str) -> None:
        if self._missing_sessions.pop(session_id, None) is not None:
            self._publish()

    @property
    def missing_sessions(self) -> tuple[str, ...]:
        return tuple(self._missing_sessions)

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        self._publish()

    @property
    def ready(self) -> bool:
        return not self.failing_checks()

    def failing_checks(self) -> list[str]:
        """Names of the checks that fail, in :attr:`CHECKS` order."""
        results = {
            "producer_connected": self._producer_connected,
            "kafka_reachable": self._kafka_reachable,
            "api_authorized": self._api_authorized,
            "discovery_ok": self.discovery_ok,
            "group_member": self._group_member,
            "not_draining": not self._draining,
        }
        return [name for name in self.CHECKS if not results[name]]

    def detail(self) -> dict[str, str]:
        """Why the failing checks fail, where the bridge knows more than the check's name."""
        out: dict[str, str] = {}
        if not self._kafka_reachable and self._kafka_error:
            out["kafka_reachable"] = self._kafka_error
        if not self._group_member and self._group_error:
            out["group_member"] = self._group_error
        if not self.discovery_ok:
            reasons = [f"session {sid}: {why}" for sid, why in self._missing_sessions.items()]
            if not self._discovery_ok and self._discovery_error:
                reasons.insert(0, self._discovery_error)
            if reasons:
                out["discovery_ok"] = "; ".join(reasons)
        return out

    def _publish(self) -> None:
        READY.set(1 if self.ready else 0)
        KAFKA_REACHABLE.set(1 if self._kafka_reachable else 0)


@dataclass(frozen=True)
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    allow: str | None = None
    retry_after_s: int | None = None


class _Places:
    """How many of something are under way, and how many may be (one event loop: no lock)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.taken = 0


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


async def serve_http(
    settings: HttpSettings,
    state: HealthState,
    *,
    read_timeout_s: float = 5.0,
    max_connections: int = 256,
    status: StatusSource | None = None,
    max_status: int = 4,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started(port)`` reports the bound port. Without
    ``status``, ``/status`` is not found."""
    try:
        listener = await anyio.create_tcp_listener(
            local_host=settings.host, local_port=settings.port
        )
    except OSError as exc:
        raise ConfigError(
            f"BRIDGE_HTTP_HOST/BRIDGE_HTTP_PORT: cannot listen on "
            f"{settings.host}:{settings.port} ({exc.strerror or exc})"
        ) from exc
    handler = partial(
        _handle,
        state=state,
        status=status,
        connections=_Places(max_connections),
        status_places=_Places(max_status),
        read_timeout_s=read_timeout_s,
    )
    async with listener:
        port = listener.extra(SocketAttribute.local_port)  # noqa: S610 -- anyio, not Django
        log.info("bridge.health.listening", host=settings.host, port=port)
        task_status.started(port)
        await listener.serve(handler)


async def _handle(
    stream: SocketStream,
    *,
    state: HealthState,
    status: StatusSource | None,
    connections: _Places,
    status_places: _Places,
    read_timeout_s: float,
) -> None:
    # Errors stay inside the connection: a misbehaving client must not stop the server.
    async with stream:
        if connections.taken >= connections.most:
            await _answer(stream, _text(HTTPStatus.SERVICE_UNAVAILABLE, "busy\n"), read_timeout_s)
            return
        connections.taken += 1
        try:
            request = await _request(stream, read_timeout_s)
            if request is None or isinstance(request, _Response):
                if request is not None:
                    await _answer(stream, request, read_timeout_s)
                return
            method, path, query, headers = request
            if path != "/status" or status is None:
                response = _guarded(path, lambda: _route(method, path, headers, state))
                await _answer(stream, response, read_timeout_s, head_only=method == "HEAD")
                return
            if status_places.taken >= status_places.most:
                await _answer(stream, _status_busy(status_places.most), read_timeout_s)
                return
            status_places.taken += 1
            try:  # the place is held until the answer is sent: a big one to a slow reader too
                response = await _status(method, query, status)
                await _answer(stream, response, read_timeout_s, head_only=method == "HEAD")
            finally:
                status_places.taken -= 1
        finally:
            connections.taken -= 1


async def _request(
    stream: SocketStream, read_timeout_s: float
) -> tuple[str, str, str, dict[str, str]] | _Response | None:
    """Method, path, query string and headers; an answer for a bad request; None: just close."""
    try:
        with anyio.fail_after(read_timeout_s):
            head = await _read_head(stream)
        method, target, headers = _parse_head(head)
    except _BadRequest as exc:
        return _text(exc.status, exc.status.phrase + "\n")
    except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        return None  # slow, gone or reset: just close
    path, _, query = target.partition("?")
    return method, path, query, headers


def _guarded(path: str, respond: Callable[[], _Response]) -> _Response:
    try:
        return respond()
    except Exception:
        log.exception("bridge.health.handler_failed", path=path)
        return _internal_error()


def _internal_error() -> _Response:
    return _text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")


async def _read_head(stream: SocketStream) -> bytes:
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")
        if end >= 0:
            return bytes(buf[:end])
        if len(buf) > MAX_REQUEST_HEAD_BYTES:
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        buf += await stream.receive(4096)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    if len(head) > MAX_REQUEST_HEAD_BYTES:
        raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(HTTPStatus.BAD_REQUEST)
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _route(method: str, path: str, headers: dict[str, str], state: HealthState) -> _Response:
    if path not in ("/livez", "/readyz", "/metrics"):
        return _text(HTTPStatus.NOT_FOUND, "not found\n")
    if method not in ("GET", "HEAD"):
        return _Response(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", allow="GET, HEAD")
    if path == "/livez":
        return _text(HTTPStatus.OK, "ok\n")
    if path == "/readyz":
        failing = state.failing_checks()
        answer: dict[str, object] = {"ready": not failing, "failing": failing}
        if detail := state.detail():
            answer["detail"] = detail
        body = json.dumps(answer).encode() + b"\n"
        status = HTTPStatus.OK if not failing else HTTPStatus.SERVICE_UNAVAILABLE
        return _Response(status, body, "application/json")
    encoder, content_type = choose_encoder(headers.get("accept", ""))
    return _Response(HTTPStatus.OK, encoder(REGISTRY), content_type)


async def _status(method: str, query: str, status: StatusSource) -> _Response:
    if method not in ("GET", "HEAD"):
        return _Response(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", allow="GET, HEAD")
    try:
        code, body = await status(query)
    except Exception:
        log.exception("bridge.health.handler_failed", path="/status")
        return _internal_error()
    return _Response(code, body, "application/json")


def _status_busy(most: int) -> _Response:
    why = f"busy: {most} /status answers are under way; retry in {STATUS_RETRY_AFTER_S} s"
    body = json.dumps({"error": why}).encode() + b"\n"
    return _Response(
        HTTPStatus.SERVICE_UNAVAILABLE, body, "application/json", retry_after_s=STATUS_RETRY_AFTER_S
    )


def _text(status: HTTPStatus, body: str) -> _Response:
    return _Response(status, body.encode())


async def _answer(
    stream: SocketStream, response: _Response, timeout_s: float, *, head_only: bool = False
) -> None:
    lines = [
        f"HTTP/1.1 {response.status.value} {response.status.phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if response.allow:
        lines.append(f"Allow: {response.allow}")
    if response.retry_after_s is not None:
        lines.append(f"Retry-After: {response.retry_after_s}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if not head_only:
        data += response.body
    # A client that went away or stopped reading gets nothing more.
    with (
        anyio.move_on_after(timeout_s),
        contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
    ):
        await stream.send(data)
