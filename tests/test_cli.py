"""The `qoder-bridge` command: exit codes, messages naming the setting, `check`, and tokens
that never reach the terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from bridge import __version__
from bridge.check import run_check
from bridge.cli import _settings as cli_settings
from bridge.cli import build_parser, main
from bridge.config import load_settings
from bridge.errors import ConfigError

TOKEN = "pt-cli-test-token-3c2b1a0f"
PASSWORD = "sasl-cli-password-never-shown"
REPO = Path(__file__).resolve().parents[1]


def qoder_bridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bridge`` as a user would, with a clean bridge environment."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("QODER_", "BRIDGE_", "KAFKA_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        env={**base, **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    """`python -m bridge --version` prints the version and exits 0."""
    done = qoder_bridge("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"qoder-bridge {__version__}"


def test_bad_config_exits_2_naming_the_setting() -> None:
    """`run` with an unknown delivery mode stops before starting anything: exit 2, and the
    message names the variable and the accepted values."""
    done = qoder_bridge("run", env={"BRIDGE_DELIVERY": "twice"})
    assert done.returncode == 2
    assert "BRIDGE_DELIVERY" in done.stderr
    assert "exactly_once, at_least_once" in done.stderr


def test_bad_flag_value_names_the_flag() -> None:
    """A bad flag value says it came from the flag."""
    done = qoder_bridge("run", "--http-port", "eighty")
    assert done.returncode == 2
    assert "BRIDGE_HTTP_PORT" in done.stderr and "--http-port" in done.stderr


def test_unknown_config_file_key_exits_2(tmp_path: Path) -> None:
    """A typo in --config FILE is a configuration error naming the key."""
    config = tmp_path / "bridge.toml"
    config.write_text('bridge_delivry = "at_least_once"\n')
    done = qoder_bridge("run", "--config", str(config))
    assert done.returncode == 2
    assert "bridge_delivry" in done.stderr


def test_tokens_are_never_printed_on_a_config_error() -> None:
    """Token and SASL password in the environment and on the command line, plus a bad
    setting: the error names settings, never the secret values."""
    done = qoder_bridge(
        "run",
        "--qoder-access-token",
        TOKEN,
        "--kafka-sasl-password",
        PASSWORD,
        env={"QODER_PAT": TOKEN + "-other", "BRIDGE_HTTP_PORT": "x"},
    )
    assert done.returncode == 2
    output = done.stdout + done.stderr
    assert "KAFKA_SASL_PASSWORD" in output or "BRIDGE_HTTP_PORT" in output
    for secret in (TOKEN, PASSWORD):
        assert secret not in output


@pytest.mark.parametrize(
    "args",
    [(), ("launch",), ("run", "--no-such-flag"), ("simulate", "--port", "70000")],
)
def test_usage_errors_exit_2(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    """No command, an unknown command or flag, an impossible port: usage error, exit 2."""
    assert main(list(args)) == 2
    assert "usage:" in capsys.readouterr().err


def test_main_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    """main() returns the exit code instead of raising SystemExit."""
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


@asynccontextmanager
async def stub_api(status: int, body: bytes) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An HTTP server answering every request with ``status``; yields (base_url, requests)."""
    requests: list[bytes] = []

    async def handle(stream: SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
            requests.append(head)
            await stream.send(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, len(body), body)
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 -- anyio
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield f"http://127.0.0.1:{port}/api/v1/cloud", requests
        tg.cancel_scope.cancel()


def check_env(url: str, bootstrap: str = "127.0.0.1:1") -> dict[str, str]:
    return {"QODER_API_URL": url, "QODER_ACCESS_TOKEN": TOKEN, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}


@pytest.mark.anyio
async def test_check_reports_a_rejected_token_and_an_unreachable_broker() -> None:
    """`check` against an API that answers 401 and a port where no broker listens: one FAIL
    line for each, exit 1; the bearer token was sent but is not printed."""
    body = b'{"type":"error","error":{"type":"authentication_error","message":"Invalid"}}'
    with anyio.fail_after(30):
        async with stub_api(401, body) as (url, requests):
            out = io.StringIO()
            code = await run_check(load_settings(check_env(url)), out=out, kafka_timeout_s=5)
    lines = out.getvalue().splitlines()
    assert code == 1
    assert lines[0].startswith("ok    config")
    assert lines[1].startswith("FAIL  api") and "token rejected (HTTP 401" in lines[1]
    assert "authentication_error" in lines[1]
    assert lines[2].startswith("FAIL  kafka   connection refused by 127.0.0.1:1: ")
    assert TOKEN not in out.getvalue()
    assert requests[0].startswith(b"GET /api/v1/cloud/sessions?limit=1 HTTP/1.1")
    assert f"Bearer {TOKEN}\r\n".encode() in requests[0]


@pytest.mark.anyio
async def test_check_without_a_token_is_a_configuration_error() -> None:
    """No token at all: `check` gives the verdict `run` gives, a configuration error."""
    settings = load_settings({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    with pytest.raises(ConfigError, match="QODER_ACCESS_TOKEN"):
        await run_check(settings, out=io.StringIO(), kafka_timeout_s=5)


def test_check_and_run_agree_on_a_missing_token() -> None:
    """Scenario: the token secret is not mounted. `run` and `check` both exit 2 with the same
    message naming QODER_ACCESS_TOKEN, and `check` prints no `ok config` first."""
    done = {command: qoder_bridge(command) for command in ("run", "check")}
    assert done["run"].returncode == done["check"].returncode == 2
    assert done["run"].stderr == done["check"].stderr
    assert "configuration error: QODER_ACCESS_TOKEN: no token" in done["check"].stderr
    assert done["check"].stdout == ""


@asynccontextmanager
async def stub_routes(
    routes: dict[str, tuple[int, bytes]],
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An HTTP server answering by path (404 for anything else); yields (base_url, requests)."""
    requests: list[bytes] = []

    async def handle(stream: SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
            requests.append(head)
            path = head.split(b" ")[1].decode().split("?")[0]
            status, body = routes.get(path, (404, NOT_FOUND))
            await stream.send(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, len(body), body)
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 -- anyio
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield f"http://127.0.0.1:{port}/api/v1/cloud", requests
        tg.cancel_scope.cancel()


NOT_FOUND = b'{"type":"error","error":{"type":"not_found_error","message":"Not found"}}'


@pytest.mark.anyio
async def test_check_looks_up_every_configured_session_and_names_the_missing_one() -> None:
    """Scenario: BRIDGE_SESSIONS has a typo. `check` asks for every configured session (not
    only the session list), says which one is not found (HTTP 404), and exits 1."""
    routes = {"/api/v1/cloud/sessions/sess_good01": (200, b'{"id":"sess_good01","status":"idle"}')}
    with anyio.fail_after(30):
        async with stub_routes(routes) as (url, requests):
            env = {**check_env(url), "BRIDGE_SESSIONS": "sess_good01,sess_typo02"}
            out = io.StringIO()
            code = await run_check(load_settings(env), out=out, kafka_timeout_s=5)
    lines = out.getvalue().splitlines()
    assert code == 1
    assert lines[1].startswith("ok    api     ") and "token accepted" in lines[1]
    assert lines[2] == "ok    session sess_good01 found (idle)"
    assert lines[3] == "FAIL  session sess_typo02: not found (HTTP 404); check BRIDGE_SESSIONS"
    assert [r.split(b" ")[1] for r in requests] == [
        b"/api/v1/cloud/sessions/sess_good01",
        b"/api/v1/cloud/sessions/sess_typo02",
    ]


@pytest.mark.anyio
async def test_check_kafka_line_gives_the_cause_in_plain_words() -> None:
    """Scenario: a typo in the broker's name. The kafka line says DNS and names the host, not
    "Unable to bootstrap from [('nosuchhost.invalid', 9092, <AddressFamily.AF_UNSPEC: 0>)]"."""
    body = b'{"data":[],"has_more":false}'
    with anyio.fail_after(30):
        async with stub_api(200, body) as (url, _):
            out = io.StringIO()
            env = check_env(url, "nosuchhost.invalid:9092")
            code = await run_check(load_settings(env), out=out, kafka_timeout_s=5)
    kafka = out.getvalue().splitlines()[2]
    assert code == 1
    assert kafka.startswith(
        "FAIL  kafka   cannot resolve nosuchhost.invalid:9092: DNS lookup failed ("
    )
    assert "AddressFamily" not in kafka and "Unable to bootstrap" not in kafka


def test_check_with_an_unknown_flag_shows_the_check_usage() -> None:
    """`check --bogus` is a usage error of `check`: its own usage, not the top-level one."""
    done = qoder_bridge("check", "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: qoder-bridge check ")
    assert "qoder-bridge check: error: unrecognized arguments: --bogus" in done.stderr


def test_simulate_help_lists_the_scenarios_and_the_default() -> None:
    """`simulate --help` names every built-in scenario, the default, and a scenario file."""
    from bridge.simulator.named import NAMED  # noqa: PLC0415 -- the simulator extra

    done = qoder_bridge("simulate", "--help", env={"COLUMNS": "200"})  # no wrapped names
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for name in NAMED:
        assert name in text
    assert "(default: demo," in text
    assert "deploy/simulator/example.toml" in text


def test_token_flag_help_is_about_the_flag() -> None:
    """The token flag's help says what `run` does without it, not what `make run` does."""
    done = qoder_bridge("run", "--help")
    text = " ".join(done.stdout.split())
    start = text.index("--qoder-access-token VALUE bearer token")
    assert "make run" not in text[start : text.index("--qoder-access-token-file VALUE", start + 1)]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--publish-deltas"], True),
        (["--publish-deltas", "true"], True),
        (["--publish-deltas", "false"], False),
        ([], False),
    ],
)
def test_publish_deltas_works_as_a_plain_flag(argv: list[str], expected: bool) -> None:
    args = build_parser().parse_args(["run", *argv])
    assert cli_settings(args).delivery.publish_deltas is expected


def test_kafka_producer_flag_passes_properties() -> None:
    """``--kafka-producer property=value`` is the flag form of KAFKA_PRODUCER_<PROPERTY>."""
    args = build_parser().parse_args(
        [
            "run",
            "--kafka-producer",
            "client.id=bridge-7",
            "--kafka-producer",
            "request.timeout.ms=9000",
        ]
    )
    assert cli_settings(args).kafka.producer_overrides == (
        ("client.id", "bridge-7"),
        ("request.timeout.ms", 9000),
    )
    done = qoder_bridge("run", "--kafka-producer", "acks=0")
    assert done.returncode == 2
    assert "KAFKA_PRODUCER_ACKS: acks is not for the operator to override" in done.stderr


@pytest.mark.parametrize("command", ["run", "check"])
def test_unreadable_files_are_config_errors_before_start(tmp_path: Path, command: str) -> None:
    """A token file that is missing, or a CA file that is not PEM, is judged before anything
    starts: exit 2 naming the variable."""
    done = qoder_bridge(command, env={"QODER_ACCESS_TOKEN_FILE": str(tmp_path / "absent")})
    assert done.returncode == 2
    assert "QODER_ACCESS_TOKEN_FILE" in done.stderr
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    env = {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": str(tmp_path / "ca.pem")}
    done = qoder_bridge(command, env=env)
    assert done.returncode == 2
    assert "KAFKA_SSL_CAFILE" in done.stderr


@pytest.mark.kafka
@pytest.mark.anyio
async def test_check_passes_with_a_real_broker_and_an_accepting_api(kafka_bootstrap: str) -> None:
    """API answers 200 and the real broker answers metadata: every line ok, exit 0."""
    body = b'{"data":[],"has_more":false,"next_page":null,"first_id":null,"last_id":null}'
    with anyio.fail_after(60):
        async with stub_api(200, body) as (url, _):
            out = io.StringIO()
            code = await run_check(load_settings(check_env(url, kafka_bootstrap)), out=out)
    assert code == 0, out.getvalue()
    assert [line.split()[0] for line in out.getvalue().splitlines()] == ["ok", "ok", "ok"]
