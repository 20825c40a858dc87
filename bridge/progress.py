"""How far a long tool run has got: a progress bar on a terminal, plain log lines otherwise.

``qoder-bridge replay`` shows threads done out of the threads of the run, the events committed
so far, their rate, and an ETA drawn from the threads' pace (the API does not say how many
events a thread holds before it is read). On a terminal (stderr is a TTY) that is a tqdm bar
redrawn in place; anywhere else (a pod's log, CI, a pipe) it is a ``bridge.replay.progress``
log line every ``interval_s``, so a log collector never sees carriage returns.

While the bar is drawn, the log lines written to the same terminal (warnings: an item skipped,
a request retried) go above it, each on a line of its own: the log handlers on that stream
write through ``tqdm.write`` (which clears the bar, writes the line and draws the bar again)
until the bar is closed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

import structlog
from tqdm import tqdm

__all__ = ["ReplayProgress"]

log = structlog.get_logger("bridge.replay")

_BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} threads{postfix} [{elapsed}<{remaining}]"
)


class ReplayProgress:
    """Threads done of ``threads``, events committed; ``update`` after each commit."""

    def __init__(
        self,
        label: str,
        threads: int,
        threads_done: int,
        events: int,
        *,
        stream: TextIO | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._label = label
        self._threads = threads
        self._done = threads_done
        self._events = events
        # Rates are of this process: what an earlier, interrupted run did is not pace.
        self._first_done, self._first_events = threads_done, events
        self._started = time.monotonic()
        self._interval_s = interval_s
        self._next_line = self._started + interval_s
        self._bar: Any = None
        #: Log handlers writing above the bar, and the stream each had before.
        self._redirected: list[tuple[logging.StreamHandler[Any], Any]] = []
        if _isatty(self._stream):
            # A terminal that reports no size (a bare pty) would get no bar at all.
            width, height = _size(self._stream)
            self._bar = tqdm(
                total=threads,
                initial=threads_done,
                desc=f"replay {label}",
                unit="thread",
                file=self._stream,
                dynamic_ncols=width > 0,
                ncols=None if width > 0 else 100,
                nrows=None if height > 0 else 24,
                bar_format=_BAR_FORMAT,
                postfix=self._events_text(),
            )
            self._redirect_logs()

    def update(self, threads_done: int, events: int) -> None:
        self._done, self._events = threads_done, events
        if self._bar is not None:
            self._bar.set_postfix_str(self._events_text(), refresh=False)
            self._bar.update(threads_done - self._bar.n)
            return
        now = time.monotonic()
        if now >= self._next_line:
            self._next_line = now + self._interval_s
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._events_text(), refresh=False)
            self._bar.close()
            self._bar = None
            self._restore_logs()
        else:
            self._line()

    def _redirect_logs(self) -> None:
        above = _AboveTheBar(self._stream)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stream:
                self._redirected.append((handler, handler.setStream(above)))

    def _restore_logs(self) -> None:
        for handler, stream in self._redirected:
            handler.setStream(stream)
        self._redirected.clear()

    def _rate(self) -> float:
        elapsed = max(time.monotonic() - self._started, 1e-3)
        return (self._events - self._first_events) / elapsed

    def _events_text(self) -> str:
        return f"{self._events:,} events, {self._rate():,.0f} events/s"

    def _eta_s(self) -> float | None:
        finished = self._done - self._first_done
        if finished <= 0:
            return None
        elapsed = time.monotonic() - self._started
        return round(elapsed / finished * (self._threads - self._done), 1)

    def _line(self) -> None:
        log.info(
            "bridge.replay.progress",
            run=self._label,
            threads_done=self._done,
            threads=self._threads,
            events=self._events,
            events_per_s=round(self._rate(), 1),
            eta_s=self._eta_s(),
        )


class _AboveTheBar:
    """What a log handler writes to while the bar is drawn: whole lines, through tqdm.write."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            tqdm.write(line, file=self._stream)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _size(stream: TextIO) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return 0, 0
    return size.columns, size.lines
