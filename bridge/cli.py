"""``qoder-bridge``: argv and environment -> Settings -> run | simulate | check -> exit code.

Exit codes: 0 clean stop, 1 fatal (or a check failed), 2 bad configuration or usage; the
message names the setting. ``run`` and ``check`` take one flag per setting of
:data:`bridge.config.ENV_VARS`; a flag beats the environment, which beats ``--config FILE``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from bridge import __version__
from bridge.config import (
    ENV_VARS,
    PRODUCER_FLAG,
    PRODUCER_PROPERTIES,
    Settings,
    env_token,
    load_settings,
    producer_env_name,
    require_token,
)
from bridge.errors import ConfigError
from bridge.kafka_conn import kafka_client_kwargs, producer_tuning_kwargs
from bridge.logs import configure_logging, scrub_text
from bridge.secrets import TokenProvider

__all__ = [
    "EXIT_FATAL",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_settings_flags",
    "build_parser",
    "main",
    "settings_from_args",
]

EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2
PROG = "qoder-bridge"
DEFAULT_SCENARIO = "demo"
#: Operators' tools: subcommand -> module of this package with ``add_arguments(parser)``,
#: ``HELP`` and ``main(args) -> exit code``. One line each, so the tools stay out of this file.
TOOLS: dict[str, str] = {
    "status": "status_cli",
    "replay": "replay",
    "checkpoints": "checkpoint_admin",
}


def main(argv: Sequence[str] | None = None) -> int:
    """The console entry point; returns the process exit code."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # argparse reports a subcommand's unknown flag with the top-level usage; the
            # subcommand's own usage is the one that helps.
            command = parser.commands.get(getattr(args, "command", None) or "", parser)
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return _check(args)
        if args.command in TOOLS:
            tool: Any = importlib.import_module(f"{__package__}.{TOOLS[args.command]}")
            return int(tool.main(args))
        return _simulate(args)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {scrub_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


class _Parser(argparse.ArgumentParser):
    """Keeps its subcommands' parsers, to report a usage error with the right usage."""

    commands: dict[str, argparse.ArgumentParser]


def build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Republishes Qoder Cloud Agents thread events to Apache Kafka.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        allow_abbrev=False,
        help="run the bridge (config from the environment, --config FILE, flags)",
        description="Run the bridge until SIGTERM/SIGINT (the first drains, a second stops).",
    )
    _add_settings_flags(run)

    check = commands.add_parser(
        "check",
        allow_abbrev=False,
        help="validate the configuration, reach the API (token) and Kafka",
        description="Exit 0 when the configuration is valid and the API and Kafka answer.",
    )
    _add_settings_flags(check)

    simulate = commands.add_parser(
        "simulate",
        allow_abbrev=False,
        help="serve the Qoder API simulator",
        description="Serve the Qoder API simulator (needs the 'simulator' extra).",
        formatter_class=_SimulateHelp,
    )
    simulate.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    simulate.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s)")
    simulate.add_argument(
        "--scenario",
        default=DEFAULT_SCENARIO,
        metavar="NAME|FILE",
        help=_SCENARIO_HELP,  # the names are filled in when help is shown
    )
    simulate.add_argument(
        "--token",
        default=None,
        help="the bearer token the simulator accepts (default: QODER_ACCESS_TOKEN or QODER_PAT)",
    )
    parser.commands = {"run": run, "check": check, "simulate": simulate}
    for name, module_name in TOOLS.items():
        module: Any = importlib.import_module(f"{__package__}.{module_name}")
        tool = commands.add_parser(
            name, allow_abbrev=False, help=module.HELP, description=module.__doc__
        )
        module.add_arguments(tool)
        parser.commands[name] = tool
    return parser


_SCENARIO_HELP = (
    "a built-in scenario: {names}; or a JSON/TOML scenario file such as "
    "deploy/simulator/example.toml (default: {default}, the lively one `make run` plays; "
    "'default' is a small quiet one)"
)


class _SimulateHelp(argparse.HelpFormatter):
    """Lists the built-in scenarios only when help is shown: importing the simulator costs
    memory and needs the 'simulator' extra, which ``run`` and ``check`` must not pay for."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text == _SCENARIO_HELP:
            try:
                named: Any = importlib.import_module("bridge.simulator.named")
                names = ", ".join(named.NAMED)
            except ModuleNotFoundError:
                names = "(install the 'simulator' extra to list them)"
            return text.format(names=names, default=DEFAULT_SCENARIO).replace("%", "%%")
        return text


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file; keys are the environment variable names in lower case",
    )
    group = parser.add_argument_group(
        "settings", "each flag overrides its environment variable and the config file"
    )
    for var in ENV_VARS:
        default = var.default.replace("`", "")
        note = f"env {var.name}; default {default}"
        if var.secret:
            note += "; visible to local users in the process list, prefer the environment"
        flag_options: dict[str, Any] = {"metavar": "VALUE"}
        if var.default in {"false", "true"}:
            # `--publish-deltas` alone means true; `--publish-deltas false` still works.
            flag_options = {"metavar": "BOOL", "nargs": "?", "const": "true"}
        group.add_argument(
            var.flag,
            dest=var.name,
            default=None,
            help=f"{var.meaning.replace('`', '')} ({note})".replace("%", "%%"),
            **flag_options,
        )
    group.add_argument(
        PRODUCER_FLAG,
        dest="producer_properties",
        metavar="PROPERTY=VALUE",
        action="append",
        default=[],
        help=(
            "a Kafka producer property, repeatable (env KAFKA_PRODUCER_<PROPERTY>): "
            + ", ".join(PRODUCER_PROPERTIES)
            + "; also linger.ms, compression.type, max.request.size"
        ),
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {port}")
    return port


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        var.name: value for var in ENV_VARS if (value := getattr(args, var.name)) is not None
    }
    for item in args.producer_properties:
        prop, sep, value = item.partition("=")
        if not sep or not prop.strip():
            raise ConfigError(f"{PRODUCER_FLAG}: expected PROPERTY=VALUE, got {item[:80]!r}")
        overrides[producer_env_name(prop.strip())] = value
    return load_settings(os.environ, config_file=args.config, overrides=overrides)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and one flag per setting, as ``run`` has them: for the operators'
    tools (:data:`TOOLS`), which take the same settings as the bridge."""
    _add_settings_flags(parser)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """A tool's settings: its flags over the environment over ``--config``, as for ``run``."""
    return _settings(args)


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _preflight(settings)
    configure_logging(settings.log)
    app: Any = importlib.import_module("bridge.app")  # the daemon's imports, only for `run`
    code = app.run(settings)
    return int(code)


def _preflight(settings: Settings) -> None:
    """Configuration that can only be judged by reading files (the token file, TLS files, the
    compression codec): judged here, so a mistake exits 2 before the daemon starts."""
    kafka_client_kwargs(settings.kafka)
    producer_tuning_kwargs(settings.kafka)
    require_token(settings.api)
    TokenProvider.from_settings(settings.api)


def _check(args: argparse.Namespace) -> int:
    from bridge.check import run_check  # noqa: PLC0415 -- aiokafka is only needed here

    settings = _settings(args)
    _preflight(settings)  # the same configuration verdict as `run`, exit 2 included
    configure_logging(settings.log, quiet_third_party=True)
    return anyio.run(run_check, settings, backend="asyncio")


def _simulate(args: argparse.Namespace) -> int:
    # Only the log settings matter here; the rest of the environment is the bridge's business.
    log_env = {k: v for k, v in os.environ.items() if k.startswith("BRIDGE_LOG_")}
    configure_logging(load_settings(log_env).log)
    token = args.token if args.token is not None else env_token(os.environ)
    if token is not None and not isinstance(token, str):
        token = token.reveal()
    try:
        simulator: Any = importlib.import_module("bridge.simulator")
        result = simulator.serve(args.host, args.port, args.scenario, token)
        if inspect.isawaitable(result):

            async def wait() -> Any:
                return await result

            result = anyio.run(wait, backend="asyncio")
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("bridge"):
            raise
        print(
            f"{PROG} simulate needs the 'simulator' extra (missing module {exc.name!r}):\n"
            "    pip install 'qoder-kafka-bridge[simulator]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return int(result) if isinstance(result, int) else EXIT_OK
