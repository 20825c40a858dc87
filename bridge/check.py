"""``qoder-bridge check``: is the configuration usable, is the API reachable with this token,
are the Kafka brokers reachable with these TLS/SASL settings? One line per check on stdout.

Exit status: 0 when every check passes, 1 when something is unreachable or refuses us. A
configuration error (including a missing token file or unloadable TLS files) raises
ConfigError, which the CLI turns into exit 2.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable
from typing import Any, TextIO

import anyio
import httpx
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bridge.config import Settings
from bridge.kafka_conn import kafka_client_kwargs, producer_tuning_kwargs
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
    tokens = None if settings.api.uses_simulator else TokenProvider.from_settings(settings.api)
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


async def _check_api(settings: Settings, tokens: TokenProvider | None, report: _Report) -> bool:
    url = f"{settings.api.url}/sessions"
    if tokens is None:
        report(FAIL, "api", "no QODER_ACCESS_TOKEN or QODER_ACCESS_TOKEN_FILE: `run` would refuse")
        return False
    headers = {
        "Authorization": f"Bearer {tokens.current().reveal()}",
        "Accept": "application/json",
    }
    try:
        async with httpx.AsyncClient(
            timeout=settings.api.request_timeout_s, trust_env=False, follow_redirects=False
        ) as client:
            response = await client.get(url, params={"limit": 1}, headers=headers)
    except httpx.HTTPError as exc:
        report(FAIL, "api", f"{url} unreachable: {_describe(exc)}")
        return False
    status = response.status_code
    if status == 200:
        report(OK, "api", f"{url} answered 200, token accepted")
        return True
    kind = _error_type(response)
    if status in (401, 403):
        report(FAIL, "api", f"{url}: token rejected (HTTP {status}{kind})")
    else:
        report(FAIL, "api", f"{url}: HTTP {status}{kind}")
    return False


def _describe(exc: BaseException) -> str:
    text, name = str(exc), type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def _error_type(response: httpx.Response) -> str:
    """`` error.type`` from Qoder's error envelope, if there is one."""
    try:
        body = response.json()
        kind = body["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return ""
    return f" {kind}" if isinstance(kind, str) and kind.isprintable() else ""


async def _check_kafka(
    settings: Settings, kwargs: dict[str, Any], timeout_s: float, report: _Report
) -> bool:
    servers = settings.kafka.bootstrap_servers
    admin = AIOKafkaAdminClient(**kwargs, request_timeout_ms=int(timeout_s * 1000))
    try:
        with anyio.fail_after(timeout_s):
            await admin.start()
            topics = set(await admin.list_topics())
    except TimeoutError:
        report(FAIL, "kafka", f"{servers}: no answer within {timeout_s:g}s")
        return False
    except (KafkaError, OSError, ssl.SSLError) as exc:
        report(FAIL, "kafka", f"{servers} unreachable: {_describe(exc)}")
        return False
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await admin.close()
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
    detail = f"{servers} reachable, {len(topics)} topics visible"
    if missing:
        detail += f"; not yet created (the bridge creates them): {', '.join(missing)}"
    report(OK, "kafka", detail)
    return True
