"""KafkaSettings -> aiokafka connection keyword arguments, shared by every Kafka client.

``kafka_client_kwargs`` holds what every client (producer, consumer, admin) needs to reach and
authenticate to the brokers; ``producer_tuning_kwargs`` adds the producer-only knobs and the
operator's ``KAFKA_PRODUCER_*`` pass-through. The returned dicts hold the SASL password in clear
(aiokafka wants a str): pass them straight to the client, never log them.

``describe_kafka_error`` turns whatever aiokafka raised into one line an operator can act on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Any

from aiokafka import errors

from bridge import __version__
from bridge.config import PRODUCER_PROPERTIES, KafkaSettings
from bridge.errors import ConfigError

__all__ = [
    "bootstrap_hosts",
    "build_ssl_context",
    "describe_kafka_error",
    "kafka_client_kwargs",
    "producer_tuning_kwargs",
]

CLIENT_ID = f"qoder-kafka-bridge/{__version__}"


def kafka_client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for ``AIOKafkaProducer``/``AIOKafkaConsumer``/``AIOKafkaAdminClient``.

    Raises ConfigError when the TLS files cannot be loaded.
    """
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": CLIENT_ID,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = build_ssl_context(settings)
    if settings.security_protocol.startswith("SASL_"):
        kwargs["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = (
            settings.sasl_password.reveal() if settings.sasl_password is not None else None
        )
    return kwargs


def build_ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """A verifying client context: the CA file if given, else the system trust store, plus
    the client certificate for mutual TLS when configured."""
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"KAFKA_SSL_CAFILE: cannot load {settings.ssl_cafile} as PEM certificates ({exc})"
        ) from None
    if settings.ssl_certfile is not None:
        try:
            context.load_cert_chain(
                str(settings.ssl_certfile),
                str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
                # Without a callback, OpenSSL asks for an encrypted key's password on the
                # terminal (the daemon would hang there), or fails with an opaque "[Errno 22]"
                # when there is none. The bridge has no setting for that password.
                password=_refuse_key_password,
            )
        except _EncryptedKeyError:
            name, key = "KAFKA_SSL_KEYFILE", settings.ssl_keyfile
            if key is None:
                name, key = "KAFKA_SSL_CERTFILE", settings.ssl_certfile
            raise ConfigError(
                f"{name}: the private key in {key} is encrypted; the bridge needs it unencrypted "
                "(`openssl pkey -in KEY -out PLAIN_KEY`, and protect that file instead)"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"KAFKA_SSL_CERTFILE/KAFKA_SSL_KEYFILE: cannot load the client certificate "
                f"{settings.ssl_certfile} with its key ({exc})"
            ) from None
    return context


class _EncryptedKeyError(Exception):
    """OpenSSL asked for the password of the client key: it is encrypted."""


def _refuse_key_password() -> str:
    raise _EncryptedKeyError


def producer_tuning_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Tuning for ``AIOKafkaProducer``: compression, linger, sizes and the request timeout, then
    the operator's ``KAFKA_PRODUCER_*`` pass-through, which wins over all of them.

    The publisher adds only what the delivery guarantee needs (acks, idempotence, the
    transactional id), so everything returned here is the operator's to tune.

    Raises ConfigError when the chosen compression codec's library is not installed (aiokafka
    would only fail on the first send).
    """
    if settings.compression is not None:
        from aiokafka import codec  # noqa: PLC0415 -- only the producer needs the codecs

        available = {
            "gzip": codec.has_gzip,
            "snappy": codec.has_snappy,
            "lz4": codec.has_lz4,
            "zstd": codec.has_zstd,
        }
        if not available[settings.compression]():
            raise ConfigError(
                f"KAFKA_COMPRESSION: {settings.compression} needs a library that is not "
                f"installed (pip install 'aiokafka[{settings.compression}]'); or use gzip or none"
            )
    kwargs: dict[str, Any] = {
        "compression_type": settings.compression,
        "linger_ms": settings.linger_ms,
        "max_request_size": settings.max_request_bytes,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 30_000,
    }
    for prop, value in settings.producer_overrides:
        kwargs[PRODUCER_PROPERTIES[prop][0]] = value
    return kwargs


# -- errors in the operator's words ------------------------------------------------------------

# aiokafka raises "Unable to bootstrap from [(host, port, family)]" and logs the real cause
# (DNS, refused, TLS, SASL) on a separate line just before. Those lines are remembered here, by
# host:port, so that describe_kafka_error can name the cause instead of the Python tuple.
_CAUSE_MEMORY_S = 120.0
_MAX_REMEMBERED = 64
_recent_causes: dict[str, tuple[float, BaseException]] = {}


class _RememberConnectErrors(logging.Filter):
    """On the ``aiokafka`` logger (aiokafka.client's): keeps the exception of its "Unable
    connect to" and "Unable to request metadata from" records. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            isinstance(record.msg, str)
            and record.msg.startswith("Unable")
            and isinstance(args, tuple)
            and len(args) == 3
            and isinstance(args[2], BaseException)
        ):
            _recent_causes.pop(f"{args[0]}:{args[1]}", None)
            _recent_causes[f"{args[0]}:{args[1]}"] = (time.monotonic(), args[2])
            while len(_recent_causes) > _MAX_REMEMBERED:
                del _recent_causes[next(iter(_recent_causes))]
        return True


def _install_memory() -> None:
    client_log = logging.getLogger("aiokafka")  # aiokafka/client.py logs under this name
    if not any(isinstance(f, _RememberConnectErrors) for f in client_log.filters):
        client_log.addFilter(_RememberConnectErrors())


_install_memory()


def bootstrap_hosts(bootstrap: str) -> list[tuple[str, int]]:
    """``"k0:9092,[::1]:9093,k2"`` -> ``[("k0", 9092), ("::1", 9093), ("k2", 9092)]``."""
    hosts: list[tuple[str, int]] = []
    for piece in bootstrap.split(","):
        part = piece.strip()
        if not part:
            continue
        host, port = part, 9092
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            if rest.startswith(":") and rest[1:].isdigit():
                port = int(rest[1:])
        elif part.count(":") == 1:
            name, _, number = part.partition(":")
            if number.isdigit():
                host, port = name, int(number)
        hosts.append((host, port))
    return hosts


def _remembered(bootstrap: str) -> list[tuple[str, BaseException]]:
    now = time.monotonic()
    found = []
    for host, port in bootstrap_hosts(bootstrap):
        for key in (f"{host}:{port}", f"[{host}]:{port}"):
            entry = _recent_causes.get(key)
            if entry is not None and now - entry[0] < _CAUSE_MEMORY_S:
                found.append((f"{host}:{port}", entry[1]))
                break
    return found


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups, depth first."""
    out: list[BaseException] = []
    todo = [exc]
    while todo and len(out) < 20:
        current = todo.pop(0)
        if any(current is seen for seen in out):
            continue
        out.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)
    return out


_HTTP_AS_LENGTH = int.from_bytes(b"HTTP", "big")  # "HTTP/1.1 400" read as a Kafka size
_AUTH_ERRORS = (
    errors.SaslAuthenticationFailed,
    errors.AuthenticationFailedError,
    errors.AuthenticationMethodNotSupported,
    errors.UnsupportedSaslMechanismError,
    errors.IllegalSaslStateError,
)
_ACL_ERRORS = (
    errors.TopicAuthorizationFailedError,
    errors.ClusterAuthorizationFailedError,
    errors.GroupAuthorizationFailedError,
    errors.TransactionalIdAuthorizationFailed,
)
_NOT_A_BROKER = (
    errors.IncompatibleBrokerVersion,
    errors.UnrecognizedBrokerVersion,
    errors.UnsupportedVersionError,
)
_TIMEOUTS = (TimeoutError, errors.KafkaTimeoutError, errors.RequestTimedOutError)


def describe_kafka_error(exc: BaseException, bootstrap: str) -> str:
    """One line in an operator's words saying why Kafka at ``bootstrap`` failed us: DNS,
    connection refused, TLS, authentication, authorisation, not a broker, timed out.

    For aiokafka's "Unable to bootstrap from [...]" the cause comes from the log line aiokafka
    wrote just before (remembered by host:port). Never contains a secret: aiokafka's messages
    do not carry passwords, and SASL mechanisms echo the user name at most.
    """
    chain = _chain(exc)
    if any(_is_bootstrap_failure(e) for e in chain):
        remembered = _remembered(bootstrap)
        if remembered:
            return "; ".join(_phrase(cause, where) for where, cause in remembered)
        return f"no bootstrap server of {bootstrap} could be reached"
    return _phrase(exc, bootstrap)


def _is_bootstrap_failure(exc: BaseException) -> bool:
    return isinstance(exc, errors.KafkaConnectionError) and "Unable to bootstrap" in str(exc)


def _phrase(exc: BaseException, where: str) -> str:
    chain = _chain(exc)

    def first(kinds: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
        return next((e for e in chain if isinstance(e, kinds)), None)

    if (cert := first(ssl.SSLCertVerificationError)) is not None:
        why = cert.verify_message or cert.reason or "certificate verify failed"
        return (
            f"TLS handshake with {where} failed: the broker's certificate is not trusted "
            f"({why}; CERTIFICATE_VERIFY_FAILED); check KAFKA_SSL_CAFILE and the broker's name"
        )
    if (tls := first(ssl.SSLError)) is not None:
        reason = str(tls.reason or tls.strerror or tls)
        hint = "check KAFKA_SECURITY_PROTOCOL and the port"
        if "CERTIFICATE_REQUIRED" in reason or "BAD_CERTIFICATE" in reason:
            hint = "the broker wants a client certificate it trusts (KAFKA_SSL_CERTFILE/KEYFILE)"
        elif "WRONG_VERSION_NUMBER" in reason or "EOF" in reason:
            hint = "is it a plaintext listener? check KAFKA_SECURITY_PROTOCOL and the port"
        return f"TLS handshake with {where} failed ({reason}): {hint}"
    if first(errors.IllegalSaslStateError) is not None:
        return (
            f"{where} does not speak SASL there (the handshake was refused before any "
            "credentials were sent): a plaintext or TLS listener? check KAFKA_SECURITY_PROTOCOL "
            "and the port"
        )
    if (auth := first(_AUTH_ERRORS)) is not None:
        return (
            f"authentication failed at {where}: {_kafka_text(auth)}; check KAFKA_SASL_MECHANISM, "
            "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
        )
    if (acl := first(_ACL_ERRORS)) is not None:
        return (
            f"not authorised by {where}: {_kafka_text(acl)}; the broker's ACLs must allow the "
            "bridge's principal (see the README's broker ACLs)"
        )
    if (dns := first(socket.gaierror)) is not None:
        return f"cannot resolve {where}: DNS lookup failed ({dns.strerror or dns})"
    if first(ConnectionRefusedError) is not None:
        return (
            f"connection refused by {where}: nothing listens there (wrong port, or Kafka is down)"
        )
    if first(_NOT_A_BROKER) is not None:
        return (
            f"{where} is not a Kafka broker's client listener: it does not serve Metadata "
            "(a KRaft controller port?)"
        )
    incomplete = first(asyncio.IncompleteReadError)
    if incomplete is not None and incomplete.expected == _HTTP_AS_LENGTH:
        return f"{where} answered in HTTP: not a Kafka broker (wrong port?)"
    if first(_TIMEOUTS) is not None:
        return f"no answer from {where} in time (timed out): Kafka down, paused or firewalled"
    if first(ConnectionResetError) is not None:
        return (
            f"{where} reset the connection: Kafka stopping, or a plaintext listener reached "
            "with TLS (check KAFKA_SECURITY_PROTOCOL and the port)"
        )
    if (os_error := first(OSError)) is not None:
        why = os_error.strerror or str(os_error) or type(os_error).__name__
        return f"cannot connect to {where}: {why}"
    if (closed := first(errors.KafkaConnectionError)) is not None:
        if "closed" in str(closed):
            return (
                f"{where} closed the connection: Kafka stopped, or the listener wants TLS, SASL "
                "or a client certificate (check KAFKA_SECURITY_PROTOCOL), or it is not Kafka"
            )
        return f"lost the connection to {where}: {_kafka_text(closed)}"
    if (kafka := first(errors.KafkaError)) is not None:
        return f"Kafka at {where} said {_kafka_text(kafka)}"
    return f"Kafka at {where}: {type(exc).__name__}: {exc}"


def _kafka_text(exc: BaseException) -> str:
    """``SaslAuthenticationFailed: Authentication failed ...``: the name is kept, it is what
    people search for."""
    text = str(exc)
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name
