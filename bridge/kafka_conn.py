"""KafkaSettings -> aiokafka connection keyword arguments, shared by every Kafka client.

``kafka_client_kwargs`` holds what every client (producer, consumer, admin) needs to reach and
authenticate to the brokers; ``producer_tuning_kwargs`` adds the producer-only knobs. The
returned dicts hold the SASL password in clear (aiokafka wants a str): pass them straight to
the client, never log them.
"""

from __future__ import annotations

import ssl
from typing import Any

from bridge import __version__
from bridge.config import KafkaSettings
from bridge.errors import ConfigError

__all__ = ["build_ssl_context", "kafka_client_kwargs", "producer_tuning_kwargs"]

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
    """Tuning for ``AIOKafkaProducer``: compression, linger, sizes and the request timeout.

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
    return {
        "compression_type": settings.compression,
        "linger_ms": settings.linger_ms,
        "max_request_size": settings.max_request_bytes,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 30_000,
    }
