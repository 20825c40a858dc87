"""``qoder-bridge status``: what a running bridge follows, as a table, from its ``GET /status``.

One row per thread being read (and per followed session with no thread being read): its state,
last event, the event's processed_at (UTC), lag, reconnects and the reason of its last
reconnect. Made for ``kubectl exec`` or a port-forward; ``--json`` prints the document itself,
every page fetched up to ``--limit`` rows. Exit 0; 1 when the bridge cannot be reached or its
answer is not a status; 2 for bad usage.

Pages are asked for after the last row of the previous one (``after``, the answer's ``next``):
a thread that leaves meanwhile moves no other across a page boundary. What comes from the
bridge is the API's (ids, times, errors): the table shows control characters as escapes
(``\x1b``), never raw to the terminal; ``--json`` prints the values exactly (JSON escapes).
Each answer is read whole within ``TIMEOUT_S`` and up to ``MAX_ANSWER_BYTES``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from bridge.config import load_settings
from bridge.errors import ConfigError
from bridge.status import MAX_LIMIT, STATES, STATUS_VERSION

if TYPE_CHECKING:
    import httpx

__all__ = ["HELP", "StatusUnavailable", "add_arguments", "fetch_status", "main", "render"]

HELP = "show what a running bridge follows and where each thread stands (GET /status)"
PROG = "qoder-bridge status"
EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE = 0, 1, 2
DEFAULT_ROWS = 1000
PAGE_ROWS = 500
#: One answer, from the connection to its last byte (its waits for a busy bridge apart).
TIMEOUT_S = 10.0
#: A page of MAX_LIMIT rows is about 2.5 MB; anything much bigger is not a status.
MAX_ANSWER_BYTES = 32 * 2**20
#: A bridge busy with other /status requests says when to come back (Retry-After): this often.
BUSY_RETRIES = 3
BUSY_WAIT_MAX_S = 5.0
#: What the bridge's error text may take of a message.
ERROR_CHARS = 300
#: Column titles and widths: 100 characters in all, with two spaces between columns.
COLUMNS = (
    ("SESSION", 13),
    ("THREAD", 13),
    ("STATE", 12),
    ("LAST EVENT", 12),
    ("PROCESSED AT", 12),
    ("LAG", 6),
    ("RECONN", 6),
    ("LAST ERROR", 12),
)
_RIGHT = frozenset({"LAG", "RECONN"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
Param = str | int | float | bool | None  # what httpx takes as a query parameter value
T = TypeVar("T")


class StatusUnavailable(Exception):
    """The bridge could not be reached, or its answer is not a status document."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="the bridge's HTTP address (default: http://127.0.0.1:$BRIDGE_HTTP_PORT, the port "
        "of its settings, 8080 unless set)",
    )
    parser.add_argument(
        "--session",
        action="append",
        default=[],
        metavar="ID",
        help="only this session (repeatable)",
    )
    parser.add_argument(
        "--state",
        action="append",
        default=[],
        choices=STATES,
        metavar="STATE",
        help=f"only threads in this state (repeatable): {', '.join(STATES)}",
    )
    parser.add_argument(
        "--limit",
        type=_rows,
        default=DEFAULT_ROWS,
        metavar="N",
        help="at most N rows, fetched page by page (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the status document as JSON (the pages joined) instead of a table",
    )


def _rows(text: str) -> int:
    try:
        rows = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows, got {text!r}") from None
    if rows < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more rows, got {rows}")
    return rows


def main(args: argparse.Namespace) -> int:
    try:
        url = status_url(args.url)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        doc = fetch_status(url, sessions=args.session, states=args.state, limit=args.limit)
    except StatusUnavailable as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        print(json.dumps(doc, indent=2) if args.json else render(doc))
        sys.stdout.flush()
    except BrokenPipeError:
        # `| head` stopped reading: not an error. Python would complain again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def status_url(url: str | None) -> str:
    """``--url`` (with or without its ``/status`` path), or the local bridge's own port."""
    import httpx  # noqa: PLC0415 -- the other subcommands build this parser too: keep it light

    if url is None:
        # Only the HTTP settings matter here; a bad one is a usage error naming it (exit 2).
        env = {k: v for k, v in os.environ.items() if k.startswith("BRIDGE_HTTP_")}
        http = load_settings(env).http
        if http.port == 0:
            raise ConfigError("BRIDGE_HTTP_PORT is 0 (any free port): give the bridge's --url")
        host = "127.0.0.1" if http.host in _WILDCARDS else http.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{http.port}/status"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"--url: {exc}, got {url[:200]!r}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"--url: expected http://HOST:PORT, got {url[:200]!r}")
    path = parsed.path.rstrip("/")
    if not path.endswith("/status"):
        path += "/status"
    return str(parsed.copy_with(path=path, query=None, fragment=None))


def fetch_status(
    url: str,
    *,
    sessions: list[str] | tuple[str, ...] = (),
    states: list[str] | tuple[str, ...] = (),
    limit: int = DEFAULT_ROWS,
) -> dict[str, Any]:
    """Every page up to ``limit`` rows, joined into one document (its ``threads``)."""
    import anyio  # noqa: PLC0415 -- see status_url

    filters: list[tuple[str, Param]] = [("session", s) for s in sessions]
    filters += [("state", s) for s in states]
    return anyio.run(partial(_fetch_pages, url, filters, limit))


async def _fetch_pages(url: str, filters: list[tuple[str, Param]], limit: int) -> dict[str, Any]:
    import httpx  # noqa: PLC0415 -- see status_url

    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str | None]] = set()
    after: str | None = None  # keyset paging: the previous page's last row
    offset = 0  # a bridge that answers no `next` pages by offset
    pages, most_pages = 0, 2 * -(-limit // min(PAGE_ROWS, MAX_LIMIT)) + 10
    timeout = httpx.Timeout(TIMEOUT_S)
    async with httpx.AsyncClient(
        timeout=timeout, trust_env=False, follow_redirects=False
    ) as client:
        while True:
            want = min(PAGE_ROWS, MAX_LIMIT, limit - len(rows))
            where: list[tuple[str, Param]] = [("after", after)] if after is not None else []
            where += [("offset", offset)] if offset else []
            doc = await _page(client, url, [("limit", want), *where, *filters])
            # Rows can move between pages while threads come and go: keep each key once.
            for row in doc["threads"]:
                key = (row.get("session_id"), row.get("thread_id"))
                if key not in seen and len(rows) < limit:
                    seen.add(key)
                    rows.append(row)
            pages += 1
            if len(rows) >= limit:
                break
            if "next" in doc:
                following = doc["next"]
                if following is None:
                    break
                if after is not None and _order(following) <= _order(after):
                    raise StatusUnavailable(f"{url} answered a next that goes nowhere")
                after = following
            else:
                if doc["next_offset"] is None:
                    break
                if doc["next_offset"] <= offset:
                    raise StatusUnavailable(f"{url} answered a next_offset that goes nowhere")
                offset = doc["next_offset"]
            if pages >= most_pages:
                raise StatusUnavailable(f"{url} answered {pages} pages and more for {limit} rows")
    return {**doc, "offset": 0, "limit": limit, "after": None, "threads": rows}


def _order(cursor: str) -> tuple[str, str]:
    session_id, _, thread_id = cursor.partition("/")
    return session_id, thread_id


async def _page(
    client: httpx.AsyncClient, url: str, params: list[tuple[str, Param]]
) -> dict[str, Any]:
    import anyio  # noqa: PLC0415 -- see status_url

    for attempt in range(BUSY_RETRIES + 1):
        try:
            with anyio.fail_after(TIMEOUT_S):
                status_code, headers, body = await _get(client, url, params)
        except TimeoutError:
            raise StatusUnavailable(f"no answer from {url} within {TIMEOUT_S:g} s") from None
        wait = _retry_after(headers.get("retry-after"))
        if status_code == 503 and wait is not None and attempt < BUSY_RETRIES:
            await anyio.sleep(wait)  # other /status requests are being answered
            continue
        break
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if status_code != 200:
        why = doc.get("error") if isinstance(doc, dict) else None
        hint = "" if why else " (is this the bridge's HTTP port, BRIDGE_HTTP_PORT?)"
        detail = f": {_cut(why, ERROR_CHARS)}" if why else ""
        raise StatusUnavailable(f"{url} answered HTTP {status_code}{detail}{hint}")
    if not _is_status(doc):
        raise StatusUnavailable(f"{url} answered something that is not a bridge's status")
    if doc["version"] != STATUS_VERSION:
        raise StatusUnavailable(
            f"{url} answered status version {doc['version']}; this qoder-bridge reads version "
            f"{STATUS_VERSION}: run the bridge's own (kubectl exec ... qoder-bridge status)"
        )
    return doc


async def _get(
    client: httpx.AsyncClient, url: str, params: list[tuple[str, Param]]
) -> tuple[int, httpx.Headers, bytes]:
    """The answer's status, headers and body, read up to MAX_ANSWER_BYTES."""
    import httpx  # noqa: PLC0415 -- see status_url

    too_big = f"{url} answered more than {MAX_ANSWER_BYTES:,} bytes: not a status"
    try:
        async with client.stream("GET", url, params=params) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
                raise StatusUnavailable(too_big)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise StatusUnavailable(too_big)
            return response.status_code, response.headers, bytes(body)
    except httpx.TimeoutException:
        raise StatusUnavailable(f"no answer from {url} within {TIMEOUT_S:g} s") from None
    except httpx.HTTPError as exc:
        raise StatusUnavailable(
            f"cannot reach the bridge at {url}: {_cut(exc, ERROR_CHARS) or type(exc).__name__}"
        ) from None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` in seconds (a date is not worth waiting for here)."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return min(seconds, BUSY_WAIT_MAX_S) if seconds >= 0 else None


def _is_status(doc: object) -> TypeGuard[dict[str, Any]]:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("version"), int)
        and isinstance(doc.get("threads"), list)
        and all(isinstance(row, dict) for row in doc["threads"])
        and isinstance(doc.get("total"), int)
        and (doc.get("next_offset") is None or isinstance(doc.get("next_offset"), int))
        and (doc.get("next") is None or isinstance(doc.get("next"), str))
    )


# -- the table ----------------------------------------------------------------------------


def render(doc: dict[str, Any]) -> str:
    """The document as a summary line and a table no wider than 100 columns. Everything in it
    comes from the bridge (and the API): control characters show as escapes."""
    member: dict[str, Any] = _field(doc, "member", dict, {})
    failing: list[Any] = _field(doc, "failing", list, [])
    ready = "yes" if doc.get("ready") else f"no ({', '.join(_visible(f) for f in failing)})"
    lines = [
        f"member {_visible(member.get('id'))}  ready {ready}  "
        f"sessions {_visible(doc.get('sessions_followed'))}  "
        f"threads {_visible(doc.get('threads_followed'))}",
    ]
    states: dict[str, Any] = _field(doc, "states", dict, {})
    if states:
        lines.append("  ".join(f"{_visible(name)} {_visible(n)}" for name, n in states.items()))
    if doc.get("reason"):
        lines.append(f"note: {_visible(doc['reason'])}")
    rows = doc["threads"]
    total: int = _field(doc, "total", int, len(rows))
    if not rows and not total:
        lines.append("no rows" + (" match the filters" if _filtered(doc) else ""))
        return "\n".join(lines)
    if rows:
        day = str(doc.get("generated_at") or "")[:10]
        lines.append(_line([title for title, _ in COLUMNS]))
        lines.extend(_line(_cells(row, day)) for row in rows)
    if len(rows) < total:
        lines.append(f"{len(rows)} of {total} rows shown (--limit N for more)")
    return "\n".join(lines)


def _field(doc: dict[str, Any], name: str, kind: type[T], default: T) -> T:
    value = doc.get(name)
    return value if isinstance(value, kind) else default


def _cells(row: dict[str, Any], day: str) -> list[str]:
    return [
        _short(row.get("session_id"), 13),
        _short(row.get("thread_id"), 13),
        _cut(row.get("state"), 12),
        _short(row.get("last_event_id"), 12),
        _when(row.get("last_event_processed_at"), day),
        _duration(row.get("lag_s")),
        _cut(row.get("reconnects"), 6),
        _cut(row.get("last_error"), 12),
    ]


def _filtered(doc: dict[str, Any]) -> bool:
    filters = doc.get("filters")
    return isinstance(filters, dict) and any(filters.get(name) for name in ("session", "state"))


def _line(cells: list[str]) -> str:
    out = []
    for (title, width), cell in zip(COLUMNS, cells, strict=True):
        out.append(cell.rjust(width) if title in _RIGHT else cell.ljust(width))
    return "  ".join(out).rstrip()


def _visible(value: object) -> str:
    """The text with every character a terminal would act on (or not show) as an escape:
    ``ESC[2J`` prints as ``\\x1b[2J``."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _short(value: object, width: int) -> str:
    """An id cut in the middle: its kind (``sess_``) and its end, where ids differ."""
    if value is None or value == "":
        return "-"
    text = _visible(value)
    if len(text) <= width:
        return text
    kind, sep, _ = text.partition("_")
    head = kind + sep if sep and len(kind) <= 5 else text[:4]
    return head + ".." + text[-(width - len(head) - 2) :]


def _cut(value: object, width: int) -> str:
    if value is None or value == "":
        return "-"
    text = _visible(value)
    return text if len(text) <= width else text[: width - 2] + ".."


def _when(value: object, day: str) -> str:
    """``HH:MM:SSZ`` on the day of the document, ``MM-DDTHH:MMZ`` before (UTC); a time that is
    not one (or has no UTC: 0001-01-01T00:00:00+01:00) as it came, cut."""
    if not isinstance(value, str):
        return "-"
    try:
        moment = datetime.fromisoformat(value)
        if moment.utcoffset() is None:
            return _short(value, 12)
        utc = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return _short(value, 12)
    if utc.strftime("%Y-%m-%d") == day:
        return utc.strftime("%H:%M:%SZ")
    return utc.strftime("%m-%dT%H:%MZ")


def _duration(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    seconds = max(0.0, float(value))
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    days = whole // 86400
    return f"{days}d{whole % 86400 // 3600:02d}h" if days < 100 else f"{days}d"
