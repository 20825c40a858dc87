"""Simulator benchmark: ``.venv/bin/python -m tests.bench_simulator``.

The simulator runs in a child process (``python -m bridge.simulator``), so the figures are its
own and its RSS is not the client's. Printed:

1. events/s to one SSE client: 100,000 pre-generated events on one stream, read raw; next to a
   baseline measured in the same run on the same bytes (a trivial asyncio server writing them
   in 256 KiB chunks), as a ratio; plus the same stream parsed by httpx-sse (a real client's
   ceiling) and JSON list pages (limit=100);
2. 2,000 concurrent open streams: how many opened and got a heartbeat, how long that took, the
   simulator's RSS idle (baseline) and with them open, and a JSON request's latency meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

TOKEN = "pt-bench"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = "/api/v1/cloud"
EVENTS = 100_000
STREAMS = 2_000
RUNS = 7  # medians: one run moves 35 MiB in well under a second


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Child:
    """A server in a child process, listening on a free port."""

    def __init__(self, *argv: str) -> None:
        self.port = _free_port()
        cmd = [sys.executable, *argv, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}{BASE}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{argv} did not start listening")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def simulator(scenario: str) -> Child:
    return Child("-m", "bridge.simulator", "--scenario", scenario, "--token", TOKEN)


async def _open(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    request = f"GET {path} HTTP/1.1\r\nHost: sim\r\nAuthorization: {AUTH['Authorization']}\r\n"
    writer.write(request.encode() + b"Accept: text/event-stream\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    return reader, writer


async def read_raw(port: int, path: str, count: int) -> tuple[float, bytes]:
    """Seconds until ``count`` frames arrived on one stream, and the bytes read."""
    reader, writer = await _open(port, path)
    started = time.perf_counter()
    seen, chunks, last = 0, [], b""
    while seen < count:  # frames end with a blank line; JSON data never holds a raw newline
        chunk = await reader.read(2**20)
        if not chunk:
            raise RuntimeError(f"stream ended after {seen} frames")
        chunks.append(chunk)
        seen += (last + chunk).count(b"\n\n")
        last = chunk[-1:]
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed, b"".join(chunks)


async def read_parsed(url: str, count: int) -> float:
    async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
        started, seen = time.perf_counter(), 0
        async with aconnect_sse(c, "GET", url) as source:
            async for _ in source.aiter_sse():
                seen += 1
                if seen == count:
                    break
        return time.perf_counter() - started


async def _serve_bytes(port: int, payload: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
        for at in range(0, len(payload), 256 * 1024):
            writer.write(payload[at : at + 256 * 1024])
            await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def _list_rate(url: str, count: int) -> float:
    with httpx.Client(headers=AUTH) as c:
        started, got, page = time.perf_counter(), 0, None
        while got < count:
            body = c.get(url, params={"limit": 100, **({"page": page} if page else {})}).json()
            got += len(body["data"])
            if not (page := body["next_page"]):
                break
        return got / (time.perf_counter() - started)


def bench_one_client() -> None:
    sim = simulator("bench")
    try:
        with httpx.Client(base_url=sim.url, headers=AUTH) as c:
            session = c.get("/sessions").json()["data"][0]["id"]
            thread = c.get(f"/sessions/{session}/threads").json()["data"][0]["id"]
        path = f"{BASE}/sessions/{session}/threads/{thread}/stream"
        runs = sorted(asyncio.run(read_raw(sim.port, path, EVENTS)) for _ in range(RUNS))
        took, payload = runs[RUNS // 2]  # the median run
        parsed = asyncio.run(read_parsed(f"http://127.0.0.1:{sim.port}{path}", EVENTS))
        lists = _list_rate(f"{sim.url}/sessions/{session}/threads/{thread}/events", EVENTS)
        rss = _rss_mib(sim.proc.pid)
    finally:
        sim.stop()
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp, "payload")
        file.write_bytes(payload)
        trivial = Child("-m", "tests.bench_simulator", "--serve-bytes", str(file))
        try:
            times = sorted(asyncio.run(read_raw(trivial.port, "/", EVENTS))[0] for _ in range(RUNS))
            baseline = times[RUNS // 2]
        finally:
            trivial.stop()
    rate, base = EVENTS / took, EVENTS / baseline
    mib = len(payload) / 2**20
    print(f"one SSE client   {rate:>10,.0f} events/s  {mib:.0f} MiB in {took:.2f} s (median, raw)")
    print(f"  baseline       {base:>10,.0f} events/s  trivial asyncio server, the same bytes")
    print(f"  ratio          {rate / base:>10.2f} x baseline")
    print(f"  httpx-sse      {EVENTS / parsed:>10,.0f} events/s  the same stream, parsed")
    print(f"  JSON lists     {lists:>10,.0f} events/s  limit=100 pages via next_page")
    print(f"  simulator RSS  {rss:>10.0f} MiB  holding {EVENTS:,} events")


async def _hold_streams(sim: Child, paths: list[str]) -> None:
    idle = _rss_mib(sim.proc.pid)
    opened = beats = 0
    writers: list[asyncio.StreamWriter] = []
    pace = asyncio.Semaphore(200)  # connects in flight at once, as a client pool would

    async def one(path: str) -> None:
        nonlocal opened, beats
        async with pace:
            reader, writer = await _open(sim.port, path)
        opened += 1
        writers.append(writer)
        if b"heartbeat" in await asyncio.wait_for(reader.read(4096), timeout=30):
            beats += 1

    started = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in paths), return_exceptions=True)
    took = time.perf_counter() - started
    rss = _rss_mib(sim.proc.pid)
    async with httpx.AsyncClient(base_url=sim.url, headers=AUTH) as c:
        before = time.perf_counter()
        (await c.get("/sessions", params={"limit": 100})).raise_for_status()
        latency_ms = (time.perf_counter() - before) * 1000
    for writer in writers:
        writer.close()
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"concurrent       {opened:>10,} of {len(paths):,} streams open in {took:.1f} s")
    print(f"  heartbeats     {beats:>10,} streams got one (1 s interval)")
    print(f"  simulator RSS  {idle:>10.0f} MiB idle (baseline) -> {rss:.0f} MiB with them open")
    print(f"  per stream     {(rss - idle) * 1024 / max(opened, 1):>10.0f} KiB")
    print(f"  JSON request   {latency_ms:>10.0f} ms while they are open")
    if failed:
        print(f"  failed         {len(failed):>10,} first: {failed[0]!r}")


def bench_streams() -> None:
    sim = simulator("bench-streams")
    try:
        paths: list[str] = []
        with httpx.Client(base_url=sim.url, headers=AUTH) as c:
            for s in c.get("/sessions", params={"limit": 100}).json()["data"]:
                threads = c.get(f"/sessions/{s['id']}/threads", params={"limit": 100}).json()
                prefix = f"{BASE}/sessions/{s['id']}/threads"
                paths += [f"{prefix}/{t['id']}/stream" for t in threads["data"]]
        asyncio.run(_hold_streams(sim, paths[:STREAMS]))
    finally:
        sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve-bytes", type=Path, help="(internal) the baseline server")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.serve_bytes:
        asyncio.run(_serve_bytes(args.port, args.serve_bytes.read_bytes()))
        return
    print(f"simulator benchmark, {os.cpu_count()} cores, python {sys.version.split()[0]}")
    bench_one_client()
    bench_streams()


if __name__ == "__main__":
    main()
