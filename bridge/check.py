"""``qoder-bridge check``: is the configuration usable, is the API reachable with this token, does
every configured session exist, are the Kafka brokers reachable with these TLS/SASL settings?
One line per check on stdout, the cause in the operator's words.

Exit status: 0 when every check passes, 1 when something is unreachable, refuses us or is
missing. A configuration error (a missing token, an unreadable token or TLS file) raises
ConfigError, which the CLI turns into exit 2: the same verdict ``run`` gives.
"""

from __future__ import annotations

import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

import anyio
import httpx
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bridge.config import Settings, require_token
from bridge.kafka_conn import describe_kafka_error, kafka_client_kwargs, producer_tuning_kwargs
from bridge.kafka_watch import KafkaProbe, KafkaUnreachable
from bridge.secrets import TokenProvider

__all__ = ["run_check"]

OK, FAIL = "ok", "FAIL"

_Report = Callable[[str, str, str], None]


async def run_check(
    settings: Settings, *, out: TextIO | None = None, kafka_timeout_s: float = 10.0
) -> int:
    """Run every check, print one line each; 0 if all passed, 1 otherwise."""
    out = out if out is not None else sys.stdout

    def report(status: str, name: str, detail: str) -> None:
        print(f"{status:<5} {name:<7} {detail}", file=out, flush=True)

    # Everything that is configuration comes first, so a config error exits 2 before any I/O.
    require_token(settings.api)
    tokens = TokenProvider.from_settings(settings.api)
    kafka_kwargs = kafka_client_kwargs(settings.kafka)
    producer_tuning_kwargs(settings.kafka)
    sessions = ",".join(settings.api.sessions) or "all listed"
    report(
        OK,
        "config",
        f"api={settings.api.url} sessions={sessions} kafka={settings.kafka.bootstrap_servers} "
        f"protocol={settings.kafka.security_protocol} delivery={settings.delivery.mode}",
    )

    results = [
        await _check_api(settings, tokens, report),
        await _check_kafka(settings, kafka_kwargs, kafka_timeout_s, report),
    ]
    return 0 if all(results) else 1


async def _check_api(settings: Settings, tokens: TokenProvider, report: _Report) -> bool:
    """Like the bridge: the configured sessions one by one, else the session list."""
    base = settings.api.url
    headers = {
        "Authorization": f"Bearer {tokens.current().reveal()}",
        "Accept": "application/json",
    }
    targets: list[tuple[str, str | None]] = [
        (f"{base}/sessions/{sid}", sid) for sid in settings.api.sessions
    ]
    if not targets:
        targets = [(f"{base}/sessions", None)]
    answers: list[tuple[str, str | None, httpx.Response]] = []
    async with httpx.AsyncClient(
        timeout=settings.api.request_timeout_s, trust_env=False, follow_redirects=False
    ) as client:
        for url, session_id in targets:
            params = {"limit": 1} if session_id is None else None
            try:
                response = await client.get(url, params=params, headers=headers)
            except httpx.HTTPError as exc:
                report(FAIL, "api", f"{url} unreachable: {_describe_http(exc)}")
                return False
            if response.status_code in (401, 403):
                kind = _error_type(response)
                report(FAIL, "api", f"{url}: token rejected (HTTP {response.status_code}{kind})")
                return False
            answers.append((url, session_id, response))

    if settings.api.sessions:
        report(OK, "api", f"{base} answered, token accepted")
    else:
        listed, _, response = answers[0]
        if response.status_code != 200:
            report(FAIL, "api", f"{listed}: HTTP {response.status_code}{_error_type(response)}")
            return False
        report(OK, "api", f"{listed} answered 200, token accepted")
        return True

    ok = True
    for _url, session_id, response in answers:
        status = response.status_code
        if status == 200:
            report(OK, "session", f"{session_id} found{_session_status(response)}")
        elif status == 404:
            report(FAIL, "session", f"{session_id}: not found (HTTP 404); check BRIDGE_SESSIONS")
            ok = False
        else:
            report(FAIL, "session", f"{session_id}: HTTP {status}{_error_type(response)}")
            ok = False
    return ok


def _describe_http(exc: httpx.HTTPError) -> str:
    """The reason an API request got no answer, in the operator's words."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for cause in chain:
        if isinstance(cause, socket.gaierror):
            return f"DNS lookup failed ({cause.strerror or cause})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (nothing listens there)"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed ({cause.reason or cause})"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time (timed out)"
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused (nothing listens there)"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return f"DNS lookup failed ({text})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_type(response: httpx.Response) -> str:
    """`` error.type`` from Qoder's error envelope, if there is one."""
    try:
        body = response.json()
        kind = body["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f" {kind}" if isinstance(kind, str) and kind.isprintable() else ""


def _session_status(response: httpx.Response) -> str:
    try:
        status = response.json().get("status")
    except (ValueError, AttributeError):
        return ""
    return f" ({status})" if isinstance(status, str) and status.isprintable() else ""


async def _check_kafka(
    settings: Settings, kwargs: dict[str, Any], timeout_s: float, report: _Report
) -> bool:
    servers = settings.kafka.bootstrap_servers
    admin = AIOKafkaAdminClient(**kwargs, request_timeout_ms=int(timeout_s * 1000))
    try:
        with anyio.fail_after(timeout_s):
            await admin.start()
            topics = set(await admin.list_topics())
            cluster = await admin.describe_cluster()
    except (TimeoutError, KafkaError, OSError, ssl.SSLError) as exc:
        report(FAIL, "kafka", describe_kafka_error(exc, servers))
        return False
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await admin.close()
    # The bootstrap answer names the brokers the producer will really talk to: a wrong
    # advertised.listeners (an internal name, a container's address) fails only there.
    for broker in cluster.get("brokers", []):
        address = f"{broker['host']}:{broker['port']}"
        probe = KafkaProbe(
            replace(settings.kafka, bootstrap_servers=address),
            timeout_s=min(timeout_s, 5.0),
            follow_brokers=False,
        )
        try:
            await probe.check()
        except KafkaUnreachable as exc:
            report(
                FAIL,
                "kafka",
                f"{servers} answered, but broker {broker['node_id']} advertises {address}: "
                f"{exc} (check the broker's advertised.listeners)",
            )
            return False
        finally:
            probe.close()
    wanted = [
        t
        for t in (
            settings.kafka.topic,
            settings.kafka.alerts_topic,
            settings.kafka.checkpoint_topic,
            settings.kafka.dlq_topic,
        )
        if t is not None
    ]
    missing = [t for t in wanted if t not in topics]
    brokers = len(cluster.get("brokers", []))
    detail = f"{servers} reachable, {brokers} broker(s), {len(topics)} topics visible"
    if missing:
        detail += f"; not yet created (the bridge creates them): {', '.join(missing)}"
    report(OK, "kafka", detail)
    return True
