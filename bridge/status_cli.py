"""``qoder-bridge status``: what a running bridge follows, as a table, from its ``GET /status``.

One row per thread being read (and per followed session with no thread being read): its state,
last event, the event's processed_at (UTC), lag, reconnects and the reason of its last
reconnect. Made for ``kubectl exec`` or a port-forward; ``--json`` prints the document itself,
every page fetched up to ``--limit`` rows. Exit 0; 1 when the bridge cannot be reached or its
answer is not a status; 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeGuard

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
TIMEOUT_S = 10.0
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
    import httpx  # noqa: PLC0415 -- see status_url

    filters: list[tuple[str, Param]] = [("session", s) for s in sessions]
    filters += [("state", s) for s in states]
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str | None]] = set()
    offset = 0
    with httpx.Client(timeout=TIMEOUT_S, trust_env=False, follow_redirects=False) as client:
        while True:
            want = min(PAGE_ROWS, MAX_LIMIT, limit - len(rows))
            params: list[tuple[str, Param]] = [("limit", want), ("offset", offset), *filters]
            doc = _page(client, url, params)
            # Rows can move between pages while threads come and go: keep each key once.
            for row in doc["threads"]:
                key = (row.get("session_id"), row.get("thread_id"))
                if key not in seen and len(rows) < limit:
                    seen.add(key)
                    rows.append(row)
            following = doc["next_offset"]
            if following is None or len(rows) >= limit:
                break
            if not isinstance(following, int) or following <= offset:
                raise StatusUnavailable(f"{url} answered a next_offset that goes nowhere")
            offset = following
    return {**doc, "offset": 0, "limit": limit, "threads": rows}


def _page(client: httpx.Client, url: str, params: list[tuple[str, Param]]) -> dict[str, Any]:
    import httpx  # noqa: PLC0415 -- see status_url

    try:
        response = client.get(url, params=params)
    except httpx.TimeoutException:
        raise StatusUnavailable(f"no answer from {url} within {TIMEOUT_S:g} s") from None
    except httpx.HTTPError as exc:
        raise StatusUnavailable(
            f"cannot reach the bridge at {url}: {exc or type(exc).__name__}"
        ) from None
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.status_code != 200:
        why = doc.get("error") if isinstance(doc, dict) else None
        hint = "" if why else " (is this the bridge's HTTP port, BRIDGE_HTTP_PORT?)"
        detail = f": {why}" if why else ""
        raise StatusUnavailable(f"{url} answered HTTP {response.status_code}{detail}{hint}")
    if not _is_status(doc):
        raise StatusUnavailable(f"{url} answered something that is not a bridge's status")
    if doc["version"] != STATUS_VERSION:
        raise StatusUnavailable(
            f"{url} answered status version {doc['version']}; this qoder-bridge reads version "
            f"{STATUS_VERSION}: run the bridge's own (kubectl exec ... qoder-bridge status)"
        )
    return doc


def _is_status(doc: object) -> TypeGuard[dict[str, Any]]:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("version"), int)
        and isinstance(doc.get("threads"), list)
        and all(isinstance(row, dict) for row in doc["threads"])
        and isinstance(doc.get("total"), int)
        and (doc.get("next_offset") is None or isinstance(doc.get("next_offset"), int))
    )


# -- the table ----------------------------------------------------------------------------


def render(doc: dict[str, Any]) -> str:
    """The document as a summary line and a table no wider than 100 columns."""
    member = doc.get("member") or {}
    ready = "yes" if doc.get("ready") else f"no ({', '.join(doc.get('failing') or [])})"
    lines = [
        f"member {member.get('id')}  ready {ready}  sessions {doc.get('sessions_followed')}  "
        f"threads {doc.get('threads_followed')}",
    ]
    states = doc.get("states") or {}
    if states:
        lines.append("  ".join(f"{name} {count}" for name, count in states.items()))
    if doc.get("reason"):
        lines.append(f"note: {doc['reason']}")
    rows = doc["threads"]
    if not rows:
        lines.append("no rows" + (" match the filters" if _filtered(doc) else ""))
        return "\n".join(lines)
    day = str(doc.get("generated_at") or "")[:10]
    lines.append(_line([title for title, _ in COLUMNS]))
    for row in rows:
        lines.append(
            _line(
                [
                    _short(row.get("session_id"), 13),
                    _short(row.get("thread_id"), 13),
                    str(row.get("state") or "-"),
                    _short(row.get("last_event_id"), 12),
                    _when(row.get("last_event_processed_at"), day),
                    _duration(row.get("lag_s")),
                    str(row.get("reconnects", "-")),
                    _cut(row.get("last_error"), 12),
                ]
            )
        )
    total = doc.get("total", len(rows))
    if len(rows) < total:
        lines.append(f"{len(rows)} of {total} rows shown (--limit N for more)")
    return "\n".join(lines)


def _filtered(doc: dict[str, Any]) -> bool:
    filters = doc.get("filters") or {}
    return any(filters.get(name) for name in ("session", "state"))


def _line(cells: list[str]) -> str:
    out = []
    for (title, width), cell in zip(COLUMNS, cells, strict=True):
        out.append(cell.rjust(width) if title in _RIGHT else cell.ljust(width))
    return "  ".join(out).rstrip()


def _short(value: object, width: int) -> str:
    """An id cut in the middle: its kind (``sess_``) and its end, where ids differ."""
    if value is None or value == "":
        return "-"
    text = str(value)
    if len(text) <= width:
        return text
    kind, sep, _ = text.partition("_")
    head = kind + sep if sep and len(kind) <= 5 else text[:4]
    return head + ".." + text[-(width - len(head) - 2) :]


def _cut(value: object, width: int) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    return text if len(text) <= width else text[: width - 2] + ".."


def _when(value: object, day: str) -> str:
    """``HH:MM:SSZ`` on the day of the document, ``MM-DDTHH:MMZ`` before (UTC)."""
    if not isinstance(value, str):
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return _short(value, 12)
    if moment.utcoffset() is None:
        return _short(value, 12)
    utc = moment.astimezone(UTC)
    if utc.strftime("%Y-%m-%d") == day:
        return utc.strftime("%H:%M:%SZ")
    return utc.strftime("%m-%dT%H:%MZ")


def _duration(value: object) -> str:
    if not isinstance(value, int | float):
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
