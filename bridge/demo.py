"""``make run``: a local broker, the Qoder API simulator and the bridge, with events shown live.

With no ``QODER_ACCESS_TOKEN`` (or ``QODER_PAT``/``QODER_ACCESS_TOKEN_FILE``) the source is the
built-in simulator playing the lively ``demo`` scenario; with one, the real API. The sink is
``KAFKA_BOOTSTRAP_SERVERS`` when set, else the local broker on ``127.0.0.1:$KAFKA_PORT`` (9092):
one already running there is used and left running; otherwise ``deploy/local/kafka/kafka.sh``
starts one, and only then is it stopped on exit. A read_committed consumer prints the events of
this run as they land in Kafka (what the topic held before is skipped, and the count said).
Ctrl-C drains the bridge (SIGTERM), then stops the simulator and the broker this command
started, nothing else.
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
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bridge.config import KafkaSettings
from bridge.kafka_watch import KafkaProbe, KafkaUnreachable

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


async def _partitions(bootstrap: str, topic: str) -> list[int]:
    """The topic's partitions; empty while it does not exist."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        (described,) = await admin.describe_topics([topic])
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await admin.close()
    if described.get("error_code", 0) != 0:
        return []
    return sorted(p["partition"] for p in described.get("partitions", []))


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Where the topic ends now (read_committed), by partition: this run's events come after.
    Empty when the topic does not exist yet, or Kafka does not answer within a few seconds."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", group_id=None
    )
    with anyio.move_on_after(15):
        try:
            partitions = await _partitions(bootstrap, topic)
            if not partitions:
                return {}
            await consumer.start()
            tps = [TopicPartition(topic, p) for p in partitions]
            ends = await consumer.end_offsets(tps)
            return {tp.partition: offset for tp, offset in ends.items()}
        except Exception:  # any failure: show the topic from its beginning instead
            return {}
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await consumer.stop()
    return {}


async def _show(bootstrap: str, topic: str, start: dict[int, int]) -> None:
    """Print every event after ``start`` (partition -> offset) as it lands, read_committed."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        group_id=None,
        enable_auto_commit=False,
    )
    tty = sys.stdout.isatty()
    count = 0
    partitions: list[int] = []
    while True:
        with contextlib.suppress(Exception):  # Kafka, or the topic, is not there yet
            partitions = await _partitions(bootstrap, topic)
            if partitions:
                await consumer.start()
                break
        await anyio.sleep(1)
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start.get(tp.partition, 0))
        async for record in consumer:
            count += 1
            print(f"{count:>6}  " + _line(record.key.decode(), record.value, tty), flush=True)
    finally:
        await consumer.stop()


def _answers_kafka(bootstrap: str) -> bool:
    """A Kafka broker (any, not only one kafka.sh started) answers on ``bootstrap``."""

    async def probe() -> bool:
        kafka_probe = KafkaProbe(
            KafkaSettings(bootstrap_servers=bootstrap), timeout_s=2.0, follow_brokers=False
        )
        try:
            await kafka_probe.check()
        except KafkaUnreachable:
            return False
        finally:
            kafka_probe.close()
        return True

    return anyio.run(probe, backend="asyncio")


def _local_kafka(env: dict[str, str]) -> tuple[str, bool]:
    """The local broker's bootstrap address, and whether this command started it (and so must
    stop it). A broker that already runs there, whoever started it, is used and left alone."""
    port = env.get("KAFKA_PORT", "9092")
    bootstrap = f"127.0.0.1:{port}"
    kafka_env = {**env, "KAFKA_PORT": port}
    status = subprocess.run(
        [str(KAFKA_SH), "status"], env=kafka_env, capture_output=True, check=False
    )
    if status.returncode == 0:
        print(f"kafka:  already running on {bootstrap} (kafka.sh); left running on exit")
        return bootstrap, False
    if _answers_kafka(bootstrap):
        print(f"kafka:  a broker already answers on {bootstrap}; left running on exit")
        return bootstrap, False
    start = subprocess.run(
        [str(KAFKA_SH), "start"], env=kafka_env, capture_output=True, text=True, check=False
    )
    sys.stderr.write(start.stderr)
    if start.returncode != 0:
        raise SystemExit(start.returncode)
    # Someone else may have started it between `status` and `start`: then it is theirs.
    ours = "already running" not in start.stderr
    if ours:
        print(f"kafka:  started on {bootstrap}; stopped on exit")
    else:
        print(f"kafka:  already running on {bootstrap}; left running on exit")
    return bootstrap, ours


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
            env["KAFKA_BOOTSTRAP_SERVERS"], started_kafka = _local_kafka(env)
        bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
        topic = env.get("BRIDGE_TOPIC", "qoder.events")
        # Before the bridge starts: everything after these offsets is this run's.
        start = anyio.run(_end_offsets, bootstrap, topic, backend="asyncio")
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
        print(f"sink:   Kafka {bootstrap}, topic {topic}")
        http = f"http://127.0.0.1:{env['BRIDGE_HTTP_PORT']}"
        print(f"bridge: logs {bridge_log_path}, {http}/metrics and /readyz")
        earlier = sum(start.values())
        if earlier:
            print(
                f"events of this run as they land in Kafka (read_committed); the {earlier} "
                f"earlier records of {topic} are not shown (README: reading the topics)"
            )
        else:
            print("events as they land in Kafka (read_committed)")
        print("Ctrl-C stops everything this command started\n")
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(_show, bootstrap, topic, start, backend="asyncio")
        return 0
    finally:
        # Stopping what we started matters more than telling about it: the terminal or the
        # pipe we print to may already be gone (`make run | tee`, a closed window).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _say("\nstopping: draining the bridge…")
        for proc in reversed(procs):
            _stop(proc, 30)
        if started_kafka:
            _say("stopping the Kafka broker this command started…")
            kafka_env = {**env, "KAFKA_PORT": os.environ.get("KAFKA_PORT", "9092")}
            subprocess.run([str(KAFKA_SH), "stop"], check=False, env=kafka_env, capture_output=True)
        _say("stopped.")


def _say(text: str) -> None:
    with contextlib.suppress(OSError):
        print(text, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
