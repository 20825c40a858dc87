"""structlog setup: JSON lines (or a console view) on stderr, secrets redacted.

Our own log calls use stable dotted event names (``bridge.pump.reconnecting``) with key/value
detail. Records from stdlib logging (aiokafka, httpx, uvicorn) go through the same renderer,
with ``event`` = the logger's name and the text under ``message``; those libraries are held at
warning level, and each of their message shapes is written at most once per
``third_party_window_s`` (30 s): a broker that is down makes aiokafka log about 30 lines a
second, which would bury everything else. The next line of that shape after the window says how
many were folded (``suppressed``). The bridge's own lines (``bridge.*``) are never folded: the
Kafka watcher says ``bridge.kafka.unreachable`` once, with the cause.

Redaction is a last line of defence, not the mechanism: tokens are :class:`~bridge.secrets.Secret`
values and are never passed to a logger in clear. Still, every line is scrubbed of the value of
every live Secret, of bearer/PAT/JWT-shaped strings, and of the values under keys such as
``authorization`` or ``password``.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

from bridge.config import LogSettings
from bridge.secrets import MASK, Secret, live_secret_values

__all__ = [
    "THIRD_PARTY_LOGGERS",
    "ThirdPartyRateLimit",
    "configure_logging",
    "redact_event",
    "scrub_text",
]

# Libraries whose stdlib logging is routed through structlog, at warning level at least.
THIRD_PARTY_LOGGERS = ("aiokafka", "kafka", "httpx", "httpcore", "uvicorn", "asyncio")

_SENSITIVE_KEYS = frozenset(
    {
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "token",
        "password",
        "passwd",
        "secret",
        "api_key",
        "apikey",
        "pat",
        "bearer",
        "credentials",
    }
)
_SENSITIVE_SUFFIXES = ("_token", "_password", "_secret", "_api_key")

_TOKEN_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]+"), rf"\1\2{MASK}"),
    (re.compile(r"\bpt-[A-Za-z0-9_-]{8,}"), MASK),  # Qoder personal access token
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), MASK),  # JWT
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]{8,}"), MASK),
    (
        re.compile(
            r"(?i)\b(authorization|x-api-key|password|passwd|access_token|token)"
            r"(\"?\s*[:=]\s*\"?)(?!\*{10})([^\s\"',;}&]+)"
        ),
        rf"\1\2{MASK}",
    ),
)


def _is_sensitive_key(key: str) -> bool:
    normalized = key.lower().replace("-", "_")
    return normalized in _SENSITIVE_KEYS or normalized.endswith(_SENSITIVE_SUFFIXES)


def scrub_text(text: str) -> str:
    """``text`` without live secret values and token-shaped substrings."""
    for value in live_secret_values():
        if value in text:
            text = text.replace(value, MASK)
    for pattern, replacement in _TOKEN_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any, depth: int) -> Any:
    if isinstance(value, Secret):
        return MASK
    if depth > 4:
        return value
    if isinstance(value, Mapping):
        return {
            k: MASK if isinstance(k, str) and _is_sensitive_key(k) else _redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_redact_value(v, depth + 1) for v in value]
    return value


def redact_event(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: mask Secret values and values under sensitive keys; puts
    ``timestamp``, ``level`` and ``event`` first so a JSON line reads well."""
    out: dict[str, Any] = {}
    for key in ("timestamp", "level", "event"):
        if key in event_dict:
            out[key] = event_dict[key]
    for key, value in event_dict.items():
        if key in out:
            continue
        out[key] = MASK if value is not None and _is_sensitive_key(key) else value
    for key, value in out.items():
        out[key] = _redact_value(value, 0)
    return out


def _scrub_rendered(_logger: Any, _method: str, rendered: Any) -> Any:
    """Last processor: the rendered line itself, whatever put a secret in it."""
    return scrub_text(rendered) if isinstance(rendered, str) else rendered


def _name_foreign_event(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """For a stdlib record: ``event`` = the logger's (dotted) name, the text in ``message``,
    and how many lines of the same shape were folded into this one."""
    record = event_dict.get("_record")
    if isinstance(record, logging.LogRecord):
        event_dict["message"] = event_dict.get("event")
        event_dict["event"] = record.name
        suppressed = getattr(record, _SUPPRESSED_ATTR, 0)
        if suppressed:
            event_dict["suppressed"] = suppressed
    return event_dict


_SUPPRESSED_ATTR = "bridge_suppressed"
_DIGITS = re.compile(r"\d+")


class ThirdPartyRateLimit(logging.Filter):
    """At most one record per logger, level and message shape every ``window_s``; the next one
    after a window carries the number folded meanwhile (``bridge_suppressed``). The bridge's
    own records (``bridge.*``) always pass.

    The shape is the format string when the record has arguments (aiokafka's usual style),
    else the text with its numbers blanked (ports, ids, sizes in f-strings).
    """

    MAX_SHAPES = 512

    def __init__(
        self, window_s: float = 30.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._window_s = window_s
        self._clock = clock
        #: shape -> [window start, records folded in this window]
        self._shapes: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "bridge" or record.name.startswith("bridge."):
            return True
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        shape = template if record.args else _DIGITS.sub("#", template)
        key = (record.name, record.levelno, shape[:200])
        now = self._clock()
        state = self._shapes.get(key)
        if state is not None and now - state[0] < self._window_s:
            state[1] += 1
            return False
        if state is not None and state[1]:
            setattr(record, _SUPPRESSED_ATTR, int(state[1]))
        self._shapes.pop(key, None)
        self._shapes[key] = [now, 0]
        if len(self._shapes) > self.MAX_SHAPES:
            del self._shapes[next(iter(self._shapes))]  # the least recently written shape
        return True


def _json_default(obj: object) -> str:
    return str(obj)  # Secret -> masked; Path, UUID, datetime -> their text


class _BridgeHandler(logging.StreamHandler[TextIO]):
    """Marks the handler we installed, so configuring again replaces it."""


def configure_logging(
    settings: LogSettings,
    *,
    stream: TextIO | None = None,
    third_party_window_s: float = 30.0,
    quiet_third_party: bool = False,
) -> None:
    """Configure structlog and stdlib logging once for the process (safe to call again).

    Third-party records are folded per shape over ``third_party_window_s`` (see
    :class:`ThirdPartyRateLimit`); with ``quiet_third_party`` (``check``, whose verdict lines
    say the cause in words) they are not written at all.
    """
    level = logging.getLevelNamesMapping()[settings.level.upper()]
    stream = stream if stream is not None else sys.stderr

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    renderer: list[Processor]
    if settings.format == "json":
        renderer = [
            structlog.processors.format_exc_info,  # a plain traceback, never locals
            redact_event,
            structlog.processors.JSONRenderer(default=_json_default),
        ]
    else:
        renderer = [
            redact_event,
            structlog.dev.ConsoleRenderer(
                colors=_isatty(stream),
                exception_formatter=structlog.dev.plain_traceback,
            ),
        ]

    structlog.configure(
        # Redacted before it leaves structlog too, in case another handler sees the record.
        processors=[*shared, redact_event, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached: tests (and `check`) configure again, and bound loggers are made once
        # per pump anyway.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _name_foreign_event],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *renderer,
            _scrub_rendered,
        ],
    )
    handler = _BridgeHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ThirdPartyRateLimit(third_party_window_s))
    if quiet_third_party:
        handler.addFilter(_own_records_only)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BridgeHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)


def _own_records_only(record: logging.LogRecord) -> bool:
    return not record.name.startswith(THIRD_PARTY_LOGGERS)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
