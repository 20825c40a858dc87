"""Is Kafka reachable right now? A light probe of its own, so readiness follows within seconds.

The producer only notices a dead broker when a request times out (``request.timeout.ms``, then
retries): readiness that waited for it stayed true for a minute after the broker stopped. This
task keeps one connection of its own (aiokafka's connection class, so TLS and SASL are exactly
as configured) and asks for cluster metadata every ``interval_s`` with a short timeout. A
failed probe tries every bootstrap server and every broker from the last answer, on fresh
connections, before it calls Kafka unreachable.

It sets ``HealthState.kafka_reachable`` and logs one warning, ``bridge.kafka.unreachable``
with the cause in the operator's words, when Kafka goes away, and one info,
``bridge.kafka.reachable``, when it is back. It observes only; it never touches the producer.
"""

from __future__ import annotations

import ssl
from typing import Any

import anyio
import structlog
from aiokafka.conn import AIOKafkaConnection, create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest
from anyio.abc import TaskStatus

from bridge.config import KafkaSettings
from bridge.health import HealthState
from bridge.kafka_conn import bootstrap_hosts, describe_kafka_error, kafka_client_kwargs

__all__ = ["KafkaProbe", "KafkaUnreachable", "watch_kafka"]

log = structlog.get_logger("bridge.kafka")

_PROBE_ERRORS = (KafkaError, OSError, TimeoutError, ssl.SSLError)


class KafkaUnreachable(Exception):
    """No broker answered a metadata request; ``str()`` is the cause in the operator's words."""


class KafkaProbe:
    """One reusable connection and a metadata request: ``await probe.check()`` returns the
    number of brokers the cluster lists, or raises KafkaUnreachable.

    With ``follow_brokers`` the brokers of the last answer are tried too when the bootstrap
    servers fail; without, only the bootstrap servers are (``check`` probes each advertised
    broker that way)."""

    def __init__(
        self, settings: KafkaSettings, *, timeout_s: float = 3.0, follow_brokers: bool = True
    ) -> None:
        kwargs = kafka_client_kwargs(settings)
        self._bootstrap = settings.bootstrap_servers
        self._candidates = bootstrap_hosts(settings.bootstrap_servers)
        self._known: list[tuple[str, int]] = []
        self._follow_brokers = follow_brokers
        self._timeout_s = timeout_s
        self._conn: AIOKafkaConnection | None = None
        self._conn_kwargs: dict[str, Any] = {
            key: kwargs[key]
            for key in (
                "client_id",
                "security_protocol",
                "ssl_context",
                "sasl_mechanism",
                "sasl_plain_username",
                "sasl_plain_password",
            )
            if key in kwargs
        }
        self._conn_kwargs["request_timeout_ms"] = int(timeout_s * 1000)

    async def check(self) -> int:
        conn = self._conn
        if conn is not None and conn.connected():
            try:
                return await self._ask(conn)
            except (*_PROBE_ERRORS, KafkaUnreachable):
                pass  # a stale connection proves nothing: try fresh ones below
        self.close()
        failures: list[tuple[str, BaseException]] = []
        for host, port in dict.fromkeys([*self._candidates, *self._known]):
            try:
                with anyio.fail_after(self._timeout_s * 2 + 1):  # the connection times out first
                    conn = await create_conn(host, port, **self._conn_kwargs)
            except _PROBE_ERRORS as exc:
                failures.append((f"{host}:{port}", exc))
                continue
            try:
                brokers = await self._ask(conn)
            except (*_PROBE_ERRORS, KafkaUnreachable) as exc:
                conn.close()
                failures.append((f"{host}:{port}", exc))
                continue
            self._conn = conn
            return brokers
        causes = [
            str(exc) if isinstance(exc, KafkaUnreachable) else describe_kafka_error(exc, where)
            for where, exc in failures[:3]
        ]
        raise KafkaUnreachable(
            "; ".join(dict.fromkeys(causes)) or f"no broker in {self._bootstrap}"
        )

    async def _ask(self, conn: AIOKafkaConnection) -> int:
        with anyio.fail_after(self._timeout_s * 2 + 1):
            metadata = await conn.send(MetadataRequest([]))
        brokers = [(broker[1], broker[2]) for broker in metadata.brokers]
        if not brokers:
            raise KafkaUnreachable(
                f"{conn.host}:{conn.port} answers but lists no brokers (not registered with its "
                "controller yet?)"
            )
        if self._follow_brokers:
            self._known = brokers
        return len(brokers)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


async def watch_kafka(
    settings: KafkaSettings,
    health: HealthState,
    *,
    interval_s: float = 2.0,
    timeout_s: float = 3.0,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Probe Kafka every ``interval_s`` until cancelled; ``task_status.started()`` after the
    first probe, whatever its answer (Kafka being down must not hold up start-up)."""
    probe = KafkaProbe(settings, timeout_s=timeout_s)
    down_since: float | None = None
    started = False
    try:
        while True:
            try:
                brokers = await probe.check()
            except KafkaUnreachable as exc:
                cause = str(exc)
                health.set_kafka_reachable(False, cause)
                if down_since is None:
                    down_since = anyio.current_time()
                    log.warning(
                        "bridge.kafka.unreachable",
                        bootstrap_servers=settings.bootstrap_servers,
                        cause=cause,
                    )
            else:
                health.set_kafka_reachable(True)
                if down_since is not None:
                    log.info(
                        "bridge.kafka.reachable",
                        bootstrap_servers=settings.bootstrap_servers,
                        brokers=brokers,
                        down_s=round(anyio.current_time() - down_since, 1),
                    )
                    down_since = None
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(interval_s)
    finally:
        probe.close()
