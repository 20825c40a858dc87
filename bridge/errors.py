"""The bridge's own exceptions.

Third-party exceptions (httpx, httpx-sse, aiokafka) are translated into these at the edge, with
``raise ... from exc``; nothing above the adapters imports a third-party exception type.

    BridgeError                      retriable = False unless said otherwise
    ├── ConfigError                  bad configuration or usage (exit code 2)
    ├── ApiError                     the Qoder API said no, or could not be reached
    │   ├── ApiUnavailable           retriable: connect/read errors, 429, 5xx (retry_after_s)
    │   │   ├── StreamStalled        retriable: no bytes for longer than the stall timeout
    │   │   └── StreamRefused        retriable: a stream open refused (429/5xx/reset): a cap?
    │   ├── AuthRejected             retriable (slowly): 401/403, the token is bad or revoked
    │   ├── NotFound                 404: the session or thread is gone
    │   ├── BadCursor                400 on after_id / Last-Event-ID: fall back to backfill
    │   └── ApiRequestRejected       any other 4xx: a bug on our side or an API change
    │       └── ListCursorStuck      a list says "more" but its cursor does not advance
    └── SinkError                    Kafka
        ├── SinkUnavailable          retriable: broker down, request timed out
        ├── TransactionAborted       retriable: the transaction was aborted; replay from checkpoints
        ├── RecordRejected           this one record cannot be published (too large, invalid)
        ├── SinkForbidden            fatal: an ACL forbids writing to one of our topics
        └── ProducerFenced           fatal: another instance owns our transactional.id
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""

    retriable: bool = False


class ConfigError(BridgeError):
    """The configuration is invalid; the message names the setting and what it accepts."""


class ApiError(BridgeError):
    """The Qoder API answered with an error or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiUnavailable(ApiError):
    retriable = True

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class StreamStalled(ApiUnavailable):
    """The stream sent no bytes (not even a heartbeat) for longer than the stall timeout."""


class StreamRefused(ApiUnavailable):
    """A stream could not be opened (429, 5xx, a reset before any answer): the gateway's
    per-client connection cap looks like this."""


class AuthRejected(ApiError):
    retriable = True


class NotFound(ApiError):
    pass


class BadCursor(ApiError):
    pass


class ApiRequestRejected(ApiError):
    pass


class ListCursorStuck(ApiRequestRejected):
    """A list answered ``has_more`` with a cursor it already gave, or none at all."""


class SinkError(BridgeError):
    """Kafka failed us."""


class SinkUnavailable(SinkError):
    retriable = True


class TransactionAborted(SinkError):
    retriable = True


class RecordRejected(SinkError):
    pass


class SinkForbidden(SinkError):
    """Kafka refuses us a topic (authorization): no retry can help, an operator must."""


class ProducerFenced(SinkError):
    """Another bridge with the same transactional.id started: this one must stop at once."""
