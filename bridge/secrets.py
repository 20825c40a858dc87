"""Secret values and the API token provider.

A :class:`Secret` never shows its value: not in ``repr``/``str``/f-strings, not in a dataclass
repr, not in a pickle. The only way in clear is :meth:`Secret.reveal`, called where the value
leaves the process (an ``Authorization`` header, the SASL handshake).

:class:`TokenProvider` serves the API token from a literal or from a file. Kubernetes rotates a
mounted secret by writing a new timestamped directory and swapping the ``..data`` symlink, so
the file is re-read when the inode or mtime seen through the symlinks changes, checked at most
once per ``check_interval_s``.
"""

from __future__ import annotations

import hmac
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from bridge.errors import ConfigError

if TYPE_CHECKING:
    from bridge.config import ApiSettings

__all__ = ["MASK", "Secret", "TokenProvider", "live_secret_values"]

MASK = "**********"

log = structlog.get_logger(__name__)

# Every Secret alive in the process, so the log redactor can scrub their values from any text
# (exception messages, third-party log lines) as a last line of defence. Weak: a rotated-out
# token disappears from the set once nothing holds it.
_LIVE: weakref.WeakSet[Secret] = weakref.WeakSet()


class Secret:
    """A string that is never printed, logged or pickled in clear."""

    __slots__ = ("__weakref__", "_value")

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret wraps a str, not {type(value).__name__}")
        self._value = value
        _LIVE.add(self)

    def reveal(self) -> str:
        """The value in clear: only where it leaves the process (a header, a handshake)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return format(repr(self), format_spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    # Immutable, so copies can share the instance; deepcopy must not go through pickling.
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Secret cannot be pickled: its value would be written in clear")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled: its value would be written in clear")


def live_secret_values(min_length: int = 4) -> list[str]:
    """Values of every live :class:`Secret` (for the log redactor); short ones are skipped
    because scrubbing a 2-character value out of every log line would garble the logs."""
    return [s._value for s in list(_LIVE) if len(s._value) >= min_length]


_FileId = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size


class TokenProvider:
    """The current API token, from a literal or from a (rotating) file.

    Exactly one of ``token`` and ``token_file`` must be given. With a file, the constructor
    reads it and raises :class:`ConfigError` when it is missing, unreadable or empty; later, a
    file that disappears or turns empty keeps the previous token and logs a warning once.
    """

    def __init__(
        self,
        token: Secret | None = None,
        token_file: Path | None = None,
        *,
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (token is None) == (token_file is None):
            raise ConfigError(
                "QODER_ACCESS_TOKEN / QODER_ACCESS_TOKEN_FILE: set exactly one of them"
            )
        self._file = token_file
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._file_id: _FileId | None = None
        self._failing = False
        if token is not None:
            problem = _token_problem(token.reveal().strip())
            if problem:
                raise ConfigError(f"QODER_ACCESS_TOKEN: {problem}")
            self._token = Secret(token.reveal().strip())
        else:
            assert token_file is not None  # noqa: S101 -- narrowed by the check above
            try:
                file_id, value = _read_token(token_file)
            except _TokenFileError as exc:
                raise ConfigError(f"QODER_ACCESS_TOKEN_FILE: {exc}") from None
            self._file_id, self._token = file_id, value
        self._next_check = self._clock() + self._check_interval_s

    @classmethod
    def from_settings(cls, api: ApiSettings) -> TokenProvider:
        """The provider for ``settings.api`` (raises ConfigError when neither is set)."""
        return cls(api.token, api.token_file)

    @property
    def token_file(self) -> Path | None:
        return self._file

    def current(self) -> Secret:
        """The token to send now; cheap enough to call before every request."""
        if self._file is None:
            return self._token
        now = self._clock()
        if now < self._next_check:
            return self._token
        self._next_check = now + self._check_interval_s
        self._refresh(self._file)
        return self._token

    def _refresh(self, path: Path) -> None:
        try:
            file_id = _file_id(path)
            if file_id == self._file_id:
                self._recovered()
                return
            file_id, value = _read_token(path)
        except _TokenFileError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "bridge.token.reload_failed",
                    path=str(path),
                    reason=str(exc),
                    keeping="previous token",
                )
            return
        changed = value != self._token
        self._file_id, self._token = file_id, value
        self._recovered()
        if changed:
            log.info("bridge.token.reloaded", path=str(path))

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("bridge.token.file_recovered", path=str(self._file))


class _TokenFileError(Exception):
    pass


def _file_id(path: Path) -> _FileId:
    try:
        st = os.stat(path)  # follows the ..data symlink chain to the real file
    except FileNotFoundError:
        raise _TokenFileError(f"{path} does not exist") from None
    except OSError as exc:
        raise _TokenFileError(f"{path} cannot be read ({exc.strerror})") from None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _read_token(path: Path) -> tuple[_FileId, Secret]:
    # stat before reading: if the file is swapped in between, the next check sees a new id
    # and reads again, so a rotation is never missed.
    file_id = _file_id(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _TokenFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise _TokenFileError(f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise _TokenFileError(f"{path} cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise _TokenFileError(f"{path} is not UTF-8 text") from None
    problem = _token_problem(text)
    if problem:
        raise _TokenFileError(f"{path} {problem}")
    return file_id, Secret(text)


def _token_problem(text: str) -> str | None:
    """Why ``text`` (already stripped) cannot be a bearer token, without quoting it."""
    if not text:
        return "is empty"
    if any(c.isspace() or not c.isprintable() for c in text):
        return "contains whitespace or control characters inside the token"
    return None
