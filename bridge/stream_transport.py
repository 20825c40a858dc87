"""A lean httpx transport for the long-lived event streams: one connection per request, on
asyncio's own protocol, HTTP/1.1 spoken by h11.

Thousands of streams sit idle for hours, each waiting for its next bytes. Under httpcore every
one of them holds a pool entry, two locks, anyio's socket stream and a stack of generators,
context managers and a cancel scope for its pending read (issue 11: 35 KiB a stream). Here a
stream is one object (:class:`Connection`: the protocol, the parser state and the body
iterator at once) and an idle one waits on a single future; its read timeout is one timer
handle, moved only when it fires, not a cancel scope per read.

What it keeps of httpx's behaviour, as the bridge relies on it:

- timeouts from ``request.extensions["timeout"]``: ``connect`` bounds the TCP connect and the
  TLS handshake (``httpx.ConnectTimeout``), ``read`` is the longest wait for any byte, while
  the headers come and on every body read (``httpx.ReadTimeout``); ``write`` and ``pool`` have
  nothing to bound (the request is one small write into the transport's buffer, and there is no
  pool);
- errors as httpx raises them: ``ConnectError``, ``ReadError`` (a reset, a TLS error),
  ``RemoteProtocolError`` (malformed HTTP, or a body cut short: an incomplete chunked or
  ``Content-Length`` body), ``LocalProtocolError``;
- bodies framed by ``Transfer-Encoding: chunked``, ``Content-Length`` or the connection's end;
  a complete body ends the iteration (``StopAsyncIteration``) and closes the connection;
- TLS with the given ``ssl.SSLContext`` for https (the URL's host as server name), plain TCP
  for http. TLS runs on ``ssl.MemoryBIO`` as anyio's does, not on asyncio's SSL transport,
  which gives every connection a 256 KiB read buffer (305 KiB a stream against httpx's 54);
- backpressure: once ``HIGH_WATER`` (64 KiB) bytes wait unread the socket is no longer read, and
  it is read again once fewer wait; h11 is given one received chunk at a time. A reader that is
  behind (Kafka away) holds at most ``HIGH_WATER``, one socket read (asyncio reads up to 256
  KiB) and the chunk h11 is parsing; the rest waits in the kernel and the server.

A cancelled reader leaves nothing behind: ``aclose()`` (and every error) aborts the socket at
once, without awaiting anything, so it completes even inside a cancelled scope.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, cast

import anyio
import h11
import httpx

#: Unread bytes past which the socket is no longer read (resumed once the reader takes them).
HIGH_WATER = 64 * 1024
#: The most plaintext one TLS record holds: what one read of the TLS object asks for.
TLS_RECORD_BYTES = 16 * 1024
#: The largest status line and headers accepted (httpcore's own bound).
MAX_HEAD_BYTES = 100 * 1024
#: The key under which a response carries its :class:`Connection` (see :func:`body_of`).
_BODY = "bridge.stream_body"
#: A request extension: True sends it on a new connection, not a kept one (a request sent
#: again after :class:`KeptConnectionClosed`: the kept ones may have gone as that one did).
NEW_CONNECTION = "bridge.new_connection"
#: h11's states of a server whose response came whole.
_COMPLETE = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
#: A timer may fire this much before its deadline (the loop's granularity): still a stall.
_SLACK_S = 0.001


class Connection(asyncio.Protocol):
    """One HTTP/1.1 exchange on its own connection; once the response has come, its body as an
    async iterator of bytes (``async for``/``anext``) until ``aclose()``."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closed",
        "_cycle",
        "_deadline",
        "_eof",
        "_error",
        "_h11",
        "_loop",
        "_origin",
        "_paused",
        "_pool",
        "_received_any",
        "_stalled",
        "_timeout",
        "_timer",
        "_tls",
        "_transport",
        "_waiter",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float | None,
        pool: KeepAliveTransport | None = None,
    ) -> None:
        self._loop = loop
        self._pool = pool  # where the connection goes back once a response has come whole
        self._timeout = read_timeout
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []  # received, not yet given to h11
        self._buffered = 0
        self._paused = False
        self._eof = False
        self._error: BaseException | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._stalled = False
        self._tls: _Tls | None = None
        self._cycle = 0  # responses completed on it (a pooled body reads only its own)
        self._origin: tuple[str, str, int] | None = None  # a pooled connection's key
        self._received_any = False  # since it was connected or last went idle

    # -- asyncio.Protocol: called by the loop ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        tls = self._tls
        if tls is None:
            self._take(data)
        else:
            tls.incoming.write(data)
            if tls.open:
                self._decrypt(tls)
        self._wake()

    def _take(self, data: bytes) -> None:
        self._received_any = True
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake()

    @property
    def unread_bytes(self) -> int:
        """Bytes received from the socket that the reader has not taken yet."""
        return self._buffered

    @property
    def reading_paused(self) -> bool:
        """True while the socket is not read because the reader is behind."""
        return self._paused

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the read timeout: one timer a connection, moved only when it fires ----------------------

    def _arm(self) -> asyncio.Future[None]:
        """A future the reader awaits until bytes (or the end) come, or the read timeout."""
        waiter = self._waiter = self._loop.create_future()
        if self._timeout is not None:
            self._deadline = self._loop.time() + self._timeout
            if self._timer is None:
                self._timer = self._loop.call_at(self._deadline, self._on_timer)
        return waiter

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait arms it again
        if self._loop.time() >= self._deadline - _SLACK_S:
            self._stalled = True
            waiter.set_result(None)
        else:  # bytes came since it was set: the current wait started later
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _after_wait(self) -> None:
        # A wait that was cancelled leaves its (done) future here: _wake and _on_timer pass
        # over a done one, and the next wait replaces it.
        self._waiter = None
        if self._stalled:
            self.close()
            raise httpx.ReadTimeout(f"no bytes for {self._timeout:g} s")

    # -- parsing -------------------------------------------------------------------------------

    def _next_event(self) -> Any:
        """h11's next event, or None when it needs bytes that have not come yet."""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self.close()
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event
            if self._chunks:
                # One chunk at a time: h11 holds at most one, and the socket is read again
                # only once what waits here is under HIGH_WATER (a reader that is behind,
                # Kafka away, holds HIGH_WATER + a socket read + a chunk, not twice that).
                chunk = self._chunks.pop(0)
                self._buffered -= len(chunk)
                self._h11.receive_data(chunk)
                if self._paused and self._buffered < HIGH_WATER and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
            elif self._error is not None:
                error = self._error
                self.close()
                raise httpx.ReadError(str(error) or type(error).__name__) from error
            elif self._eof:
                if self._h11.their_state is h11.SEND_RESPONSE:
                    self.close()
                    raise httpx.RemoteProtocolError(
                        "Server disconnected without sending a response."
                    )
                self._h11.receive_data(b"")  # h11 says whether the body was complete
            else:
                return None

    async def _response(self) -> h11.Response:
        while True:
            if self._closed:
                raise httpx.ReadError("the connection was closed before the response came")
            event = self._next_event()
            if event is None:
                await self._arm()
                self._after_wait()
            elif isinstance(event, h11.Response):
                return event
            # an informational (1xx) answer: the real one follows

    # -- the body ------------------------------------------------------------------------------

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> bytes:
        # One loop, one await: an idle stream holds this frame and a future, nothing deeper.
        while True:
            if self._closed:
                if self._h11.their_state in _COMPLETE:
                    raise StopAsyncIteration
                raise httpx.ReadError("the connection was closed before the body's end")
            event = self._next_event()
            if event is None:
                await self._arm()
                self._after_wait()
            elif type(event) is h11.Data:
                return bytes(event.data)
            else:  # EndOfMessage (nothing else comes after a response's head)
                if self._pool is not None and self._reusable():
                    self._pool._release(self)
                    raise StopAsyncIteration
                self.close()

    def _reusable(self) -> bool:
        """Can the next request go on this connection? Only after a whole exchange that both
        sides mean to keep open, with nothing received past the response's end."""
        return (
            self._h11.our_state is h11.DONE
            and self._h11.their_state is h11.DONE
            and self._h11.trailing_data == (b"", False)
            and self._open()
        )

    def _open(self) -> bool:
        """Open, as far as the loop has told: no end, no error, nothing unasked for received."""
        return (
            not self._closed
            and not self._eof
            and self._error is None
            and not self._chunks
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def _park(self) -> None:
        """Ready the connection for its next exchange, as it goes idle into the pool; the
        body of the response just read is over (its reader sees the cycle move on)."""
        self._h11.start_next_cycle()
        self._cycle += 1
        self._received_any = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """Abort the connection now (nothing to flush: the request went out whole)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed:
            return
        self._closed = True
        self._chunks, self._buffered = [], 0
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    async def aclose(self) -> None:
        self.close()  # no await: it completes even in a cancelled scope

    # -- TLS -----------------------------------------------------------------------------------
    # On memory BIOs, as anyio does: asyncio's own SSL transport reads into a 256 KiB buffer of
    # its own, which every open stream would hold.

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """The TLS handshake; its errors are ``ssl.SSLError``/``OSError`` (a refused
        certificate among them), for the caller to report as a connect error."""
        tls = self._tls = _Tls(context, server_hostname)
        while True:
            try:
                tls.object.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush(tls)
            if self._error is not None:
                raise self._error
            if self._eof:
                raise ConnectionResetError("the server closed the connection in the TLS handshake")
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter  # bounded by the connect timeout, not the read timeout
            finally:
                self._waiter = None
        self._flush(tls)
        tls.open = True
        self._decrypt(tls)  # what came with the handshake's last bytes

    def _decrypt(self, tls: _Tls) -> None:
        while True:
            try:
                data = tls.object.read(TLS_RECORD_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the end of the stream
                self._eof = True
                break
            except ssl.SSLError as exc:
                self._error = exc
                if self._transport is not None:
                    self._transport.abort()
                return
            if not data:
                self._eof = True
                break
            self._take(data)
        self._flush(tls)  # a post-handshake message may want an answer

    def _flush(self, tls: _Tls) -> None:
        if tls.outgoing.pending and self._transport is not None:
            self._transport.write(tls.outgoing.read())

    def _write(self, transport: asyncio.Transport, data: bytes) -> None:
        tls = self._tls
        if tls is None:
            transport.write(data)
        else:
            tls.object.write(data)
            self._flush(tls)

    # -- the request ---------------------------------------------------------------------------

    async def send(self, request: httpx.Request) -> h11.Response:
        """Write the request, then read until the response's head has come."""
        h11_request = h11.Request(
            method=request.method.encode("ascii"),
            target=request.url.raw_path,
            headers=request.headers.raw,
        )
        try:
            out = [self._h11.send(h11_request)]
            if isinstance(request.stream, httpx.AsyncByteStream):
                async for part in request.stream:
                    if part:
                        out.append(self._h11.send(h11.Data(data=part)))
            out.append(self._h11.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc
        transport = self._transport
        if transport is None or transport.is_closing():
            raise httpx.WriteError("the connection closed before the request was sent")
        try:
            self._write(transport, b"".join(b for b in out if b))
        except ssl.SSLError as exc:
            raise httpx.WriteError(str(exc)) from exc
        return await self._response()


class _Tls:
    """A connection's TLS state: OpenSSL's object between two memory BIOs."""

    __slots__ = ("incoming", "object", "open", "outgoing")

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.object = context.wrap_bio(
            self.incoming, self.outgoing, server_side=False, server_hostname=server_hostname
        )
        self.open = False  # handshake done


class _Body(httpx.AsyncByteStream):
    """The body as httpx's ``Response.aread()``/``aiter_bytes()`` read it."""

    __slots__ = ("_connection",)

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def __aiter__(self) -> Connection:  # an iterator, not a generator
        return self._connection

    async def aclose(self) -> None:
        self._connection.close()


def body_of(response: httpx.Response) -> Connection | None:
    """The :class:`Connection` behind a response this transport answered (None for any other):
    its body can be read from it directly, and the response let go."""
    body = response.extensions.get(_BODY)
    return body if isinstance(body, Connection) else None


class KeptConnectionClosed(httpx.RemoteProtocolError):
    """A request on a kept connection got no byte of an answer: the server closed or reset it
    as the request left (its idle timeout racing the request, a restart, a gateway refusing).
    The request may or may not have reached it. The pool drops what it kept for that origin,
    and a request sent again with the ``NEW_CONNECTION`` extension goes on a new connection
    (others may have been kept since). Sending it again is the caller's call, not the
    transport's, so that every request the server may have seen is one the caller counted
    and budgeted."""


class _PooledBody(httpx.AsyncByteStream):
    """The body of a response on a pooled connection: it ends with its response, after which
    the connection may already carry another one; closed early, the connection is dropped."""

    __slots__ = ("_connection", "_cycle")

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._cycle = connection._cycle

    def __aiter__(self) -> _PooledBody:
        return self

    async def __anext__(self) -> bytes:
        if self._connection._cycle != self._cycle:
            raise StopAsyncIteration
        return await self._connection.__anext__()

    async def aclose(self) -> None:
        if self._connection._cycle == self._cycle:  # not read to its end: not reusable
            self._connection.close()


def _origin(url: httpx.URL, tls: ssl.SSLContext | None) -> tuple[str, str, int]:
    if url.scheme not in ("http", "https"):
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
    host = url.raw_host.decode("ascii")  # IDNA-encoded; an IPv6 address without brackets
    return url.scheme, host, url.port or (443 if url.scheme == "https" else 80)


async def _connect(
    request: httpx.Request,
    origin: tuple[str, str, int],
    tls: ssl.SSLContext | None,
    pool: KeepAliveTransport | None,
) -> Connection:
    """A new connection to ``origin``, TLS done for https, its errors as httpx's."""
    scheme, host, port = origin
    timeout = request.extensions.get("timeout", {})
    if scheme == "https" and tls is None:
        tls = ssl.create_default_context()
    loop = asyncio.get_running_loop()
    connection = Connection(loop, timeout.get("read"), pool)
    connection._origin = origin
    try:
        with anyio.fail_after(timeout.get("connect")):
            await loop.create_connection(
                lambda: connection,
                host,
                port,
                # A name's addresses are tried in turn, not raced: asyncio's race leaves
                # its winning socket open when the caller is cancelled as it connects
                # (tests/test_review_issue11c.py), and a stream is cancelled often (a
                # drain, a rewind, the connect timeout).
                happy_eyeballs_delay=None,
            )
            if tls is not None and scheme == "https":
                await connection.start_tls(tls, host)
    except TimeoutError as exc:  # the connect timeout, or the system's (ETIMEDOUT)
        connection.close()
        limit = timeout.get("connect")
        message = f"no connection within {limit:g} s" if limit is not None else str(exc)
        raise httpx.ConnectTimeout(message) from exc
    except OSError as exc:  # refused, unreachable, no such host, TLS verification failed
        connection.close()
        raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
    except BaseException:
        connection.close()
        raise
    return connection


async def _exchange(connection: Connection, request: httpx.Request) -> h11.Response:
    """Send ``request`` on ``connection`` and read its response's head; on any failure the
    connection is closed."""
    try:
        return await connection.send(request)
    except BaseException:
        connection.close()
        raise


def _response(
    head: h11.Response, stream: httpx.AsyncByteStream, **extensions: Any
) -> httpx.Response:
    return httpx.Response(
        head.status_code,
        headers=head.headers.raw_items(),
        stream=stream,
        extensions={
            "http_version": b"HTTP/" + head.http_version,
            "reason_phrase": head.reason,
            **extensions,
        },
    )


class StreamTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=StreamTransport(tls))``: every request on a new
    connection, closed when its response is (or when its body ends). Meant for long-lived
    streams; a pool buys them nothing."""

    __slots__ = ("_tls",)

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        connection = await _connect(request, _origin(request.url, self._tls), self._tls, None)
        head = await _exchange(connection, request)
        return _response(head, _Body(connection), **{_BODY: connection})


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=KeepAliveTransport(tls, keep=64))``: short requests on
    HTTP/1.1 connections kept open between them (the JSON pages).

    A connection goes back to the pool once its response has been read to the end and both
    sides mean to keep it; a response closed early takes its connection with it. Up to
    ``keep`` idle connections are kept an origin, each at most ``idle_s`` (httpcore's 5 s:
    servers close idle connections, and a request must not race that). There is no bound on
    connections in use: the caller bounds its requests in flight (``QoderApi``'s
    ``json_in_flight``).

    Unlike httpcore's pool nothing is checked per request: a connection learns that the
    server closed it from the loop (``connection_lost``), so taking one is a list pop. A
    request whose kept connection turns out closed before any byte of an answer (the server
    closed it as the request left) fails with :class:`KeptConnectionClosed`, for the caller
    to send again.
    """

    def __init__(
        self, tls: ssl.SSLContext | None = None, *, keep: int = 16, idle_s: float = 5.0
    ) -> None:
        self._tls = tls
        self._keep = keep
        self._idle_s = idle_s
        self._idle: dict[tuple[str, str, int], list[tuple[float, Connection]]] = {}
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def _take(self, origin: tuple[str, str, int], now: float) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            since, connection = idle.pop()  # the most recent: the least likely to be closed
            if not idle:
                del self._idle[origin]
            if connection._timer is not None:  # its idle expiry
                connection._timer.cancel()
                connection._timer = None
            if now - since < self._idle_s and connection._open():
                return connection
            connection.close()
            idle = self._idle.get(origin)
        return None

    def _release(self, connection: Connection) -> None:
        """A connection whose response was read whole (called by it)."""
        connection._park()
        origin = connection._origin
        if self._closed or origin is None:
            connection.close()
            return
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self._keep:
            connection.close()
            return
        loop = connection._loop
        now = loop.time()
        idle.append((now, connection))
        # Closed once idle past its time even if no request comes again (the bridge may make
        # none for hours once caught up): one timer while it waits, in the read timer's slot.
        connection._timer = loop.call_at(now + self._idle_s, self._expire, origin, connection)

    def _expire(self, origin: tuple[str, str, int], connection: Connection) -> None:
        connection._timer = None
        idle = self._idle.get(origin, [])
        self._idle[origin] = kept = [entry for entry in idle if entry[1] is not connection]
        if not kept:
            del self._idle[origin]
        connection.close()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        origin = _origin(request.url, self._tls)
        loop = asyncio.get_running_loop()
        connection = None
        if not request.extensions.get(NEW_CONNECTION):
            connection = self._take(origin, loop.time())
        if connection is not None:
            connection._timeout = request.extensions.get("timeout", {}).get("read")
            try:
                head = await _exchange(connection, request)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if connection._received_any:
                    raise
                # Closed or reset as the request left, not a byte of an answer: the others
                # kept for this origin are as suspect (a restart, a gateway refusing).
                for _since, idle in self._idle.pop(origin, []):
                    idle.close()
                raise KeptConnectionClosed(
                    f"the server ended a kept connection before answering ({exc})"
                ) from exc
            return _response(head, _PooledBody(connection))
        connection = await _connect(request, origin, self._tls, self)
        head = await _exchange(connection, request)
        return _response(head, _PooledBody(connection))

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for _since, connection in idle:
                connection.close()
        self._idle.clear()
