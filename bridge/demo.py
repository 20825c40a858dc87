"""``make run``: a local broker, the Qoder API simulator and the bridge, with events shown live.

With no ``QODER_ACCESS_TOKEN`` (or ``QODER_PAT``/``QODER_ACCESS_TOKEN_FILE``) the source is the
built-in simulator playing the lively ``demo`` scenario; with one, the real API. The sink is the
local broker started by ``deploy/local/kafka/kafka.sh`` unless ``KAFKA_BOOTSTRAP_SERVERS`` is
set. A read_committed consumer prints every event as it lands in Kafka. Ctrl-C drains the
bridge (SIGTERM), then stops the simulator and the broker this command started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
from aiokafka import AIOKafkaConsumer

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "deploy" / "local" / "kafka" / "kafka.sh"
RUN_DIR = ROOT / ".cache" / "demo"
COLOURS = {"agent": 36, "user": 32, "session": 33, "span": 90}


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


def _summary(event: dict[str, Any]) -> str:
    for key in ("content", "input", "error", "stop_reason"):
        value = event.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = value[0].get("text", value[0])
        if value:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            text = " ".join(text.split())
            return text[:70] + ("…" if len(text) > 70 else "")
    return ""


def _line(key: str, value: bytes, tty: bool) -> str:
    try:
        event = json.loads(value)
    except ValueError:
        event = {}
    kind = str(event.get("type", "?"))
    session, _, thread = key.partition("/")
    text = f"{session[-6:]}/{thread[-6:]}  {kind:<32} {_summary(event)}"
    if tty:
        colour = COLOURS.get(kind.split(".", maxsplit=1)[0], 0)
        text = f"\x1b[{colour}m{text}\x1b[0m"
    return text


async def _show(bootstrap: str, topic: str) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        group_id=None,
        enable_auto_commit=False,
    )
    tty = sys.stdout.isatty()
    count = 0
    while True:
        try:
            await consumer.start()
            break
        except Exception:
            await anyio.sleep(1)
    try:
        async for record in consumer:
            count += 1
            print(f"{count:>6}  " + _line(record.key.decode(), record.value, tty), flush=True)
    finally:
        await consumer.stop()


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C reaches only this command, which then drains the bridge.
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    # A closed terminal or a `kill` stops the demo as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    exe = shutil.which("qoder-bridge") or sys.executable
    cmd = [exe] if exe.endswith("qoder-bridge") else [exe, "-m", "bridge"]
    started_kafka = False
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            port = int(env.get("KAFKA_PORT", "9092"))
            subprocess.run(
                [str(KAFKA_SH), "start"], check=True, env={**env, "KAFKA_PORT": str(port)}
            )
            started_kafka = True
            env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{port}"
        has_token = any(
            env.get(k) for k in ("QODER_ACCESS_TOKEN", "QODER_PAT", "QODER_ACCESS_TOKEN_FILE")
        )
        if not has_token:
            sim_port = _free_port(8765)
            token = "demo-" + secrets.token_hex(8)
            simulate = ["simulate", "--port", str(sim_port), "--scenario", "demo", "--token", token]
            procs.append(_spawn([*cmd, *simulate], env, RUN_DIR / "simulator.log"))
            env.update(
                QODER_API_URL=f"http://127.0.0.1:{sim_port}/api/v1/cloud", QODER_ACCESS_TOKEN=token
            )
            print(f"source: the Qoder API simulator (demo scenario) on 127.0.0.1:{sim_port}")
        else:
            print(f"source: {env.get('QODER_API_URL', 'https://api.qoder.com/api/v1/cloud')}")
        env.setdefault("BRIDGE_HTTP_PORT", str(_free_port(8080)))
        env.setdefault("BRIDGE_LOG_FORMAT", "json")
        env.setdefault("BRIDGE_TRANSACTIONAL_ID", "qoder-kafka-bridge-demo")
        bridge_log_path = RUN_DIR / "bridge.log"
        procs.append(_spawn([*cmd, "run"], env, bridge_log_path))
        topic = env.get("BRIDGE_TOPIC", "qoder.events")
        print(f"sink:   Kafka {env['KAFKA_BOOTSTRAP_SERVERS']}, topic {topic}")
        http = f"http://127.0.0.1:{env['BRIDGE_HTTP_PORT']}"
        print(f"bridge: logs {bridge_log_path}, {http}/metrics and /readyz")
        print("events as they land in Kafka (read_committed); Ctrl-C stops everything\n")
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(_show, env["KAFKA_BOOTSTRAP_SERVERS"], topic)
        return 0
    finally:
        # Stopping what we started matters more than telling about it: the terminal or the
        # pipe we print to may already be gone (`make run | tee`, a closed window).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _say("\nstopping: draining the bridge…")
        for proc in reversed(procs):
            _stop(proc, 30)
        if started_kafka:
            subprocess.run([str(KAFKA_SH), "stop"], check=False, env=env, capture_output=True)
        _say("stopped.")


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        print(text, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
