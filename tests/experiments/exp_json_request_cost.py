"""What one JSON page request costs the bridge's process in CPU, through its own JSON client.

    .venv/bin/python -m tests.experiments.exp_json_request_cost [REQUESTS]

A local server in a child process (plain asyncio, keep-alive) answers every GET with the same
page of 50 events (~12 KB); this process sends REQUESTS of them through ``bridge.app``'s JSON
client (httpx over the keep-alive pool of bridge/stream_transport.py, 64 connections kept), as
a pump does (``stream()``, the body read whole), 1, 16 and 64 at a time, after a warm-up.
Prints this process's CPU a request (``time.process_time``: the server's is not counted). At
1,000 threads of 50 events a thread costs one such request: this is the part of the bridge's
CPU an event that grows with threads.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import ssl
import sys
import time

import anyio

from bridge.app import _json_client

PAGE = (
    b'{"data":['
    + b",".join(
        b'{"id":"evt_%05d","type":"agent.message","text":"%s"}' % (i, b"x" * 200) for i in range(50)
    )
    + b'],"has_more":false}'
)
ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(PAGE)
    + PAGE
)


def _serve(sock: socket.socket) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def _measure(port: int, requests: int, at_once: int) -> float:
    client = _json_client(64, ssl.create_default_context())
    headers = {"Authorization": "Bearer x", "Accept": "application/json"}

    async def worker(count: int) -> None:
        for i in range(count):
            url = f"http://127.0.0.1:{port}/sessions/s/threads/t{i}/events"
            async with client.stream("GET", url, params={"limit": 100}, headers=headers) as r:
                await r.aread()

    async with client:
        async with anyio.create_task_group() as tg:  # warm-up: connections, imports
            for _ in range(at_once):
                tg.start_soon(worker, 200 // at_once + 1)
        started = time.process_time()
        async with anyio.create_task_group() as tg:
            for _ in range(at_once):
                tg.start_soon(worker, requests // at_once)
        return (time.process_time() - started) / (requests // at_once * at_once)


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(sock,), daemon=True)
    server.start()
    try:
        print(f"python {sys.version.split()[0]}, {requests} requests of a {len(PAGE):,} B page")
        for at_once in (1, 16, 64):
            cpu = anyio.run(_measure, port, requests, at_once)
            print(f"  {at_once:>2} at a time: {cpu * 1e6:,.0f} µs of this process's CPU a request")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
