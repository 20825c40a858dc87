"""The README says what the code does: settings, flags, defaults, readiness checks, exit codes,
metrics and scenario names are checked against the code, so a change to one shows in the
other."""

from __future__ import annotations

import re
from pathlib import Path

from bridge import metrics
from bridge.cli import EXIT_FATAL, EXIT_OK, EXIT_USAGE, build_parser
from bridge.config import config_table_markdown
from bridge.health import HealthState
from bridge.simulator.named import NAMED

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, re.MULTILINE)
    assert match, f"README has no section {title!r}"
    level = len(match.group(1))
    rest = README[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def test_configuration_table_is_the_generated_one() -> None:
    """Every row of config_table_markdown() (variable, flag, default, meaning) is in the
    README, in order: regenerate it with `python -c 'from bridge.config import
    config_table_markdown as t; print(t())'`."""
    table = config_table_markdown()
    assert table in section("Configuration"), "README's configuration table is out of date"


def test_every_flag_in_the_commands_table_exists() -> None:
    parser = build_parser()
    options = {
        option
        for command in parser.commands.values()
        for action in command._actions
        for option in action.option_strings
    }
    commands = section("Two commands")
    for flag in set(re.findall(r"`(--[a-z][a-z-]+)", commands)) | set(
        re.findall(r"\(`(--[a-z-]+)`", commands)
    ):
        assert flag in options or flag == "--version", flag


def test_readiness_checks_are_the_ones_the_code_has() -> None:
    probes = section("Probes")
    documented = re.findall(r"^\s*\| `([a-z_]+)` \|", probes, re.MULTILINE)
    assert documented == list(HealthState.CHECKS)


def test_exit_codes_and_the_log_lines_that_explain_them() -> None:
    """The exit-code table lists 0, 1 and 2, and every log event it points at for exit 1 is
    one the bridge really logs (the drain deadline included)."""
    table = section("Signals and exit codes")
    rows = re.findall(r"^\| (\d) \| (.*)$", table, re.MULTILINE)
    assert [int(code) for code, _ in rows] == [EXIT_OK, EXIT_FATAL, EXIT_USAGE]
    fatal = dict(rows)["1"]
    events = re.findall(r"`(bridge\.[a-z_.]+)`", fatal)
    assert "bridge.shutdown.deadline_exceeded" in events
    source = "".join(p.read_text() for p in (REPO / "bridge").glob("*.py"))
    for event in events:
        assert f'"{event}"' in source, f"README names {event}, which the bridge never logs"


def test_every_metric_is_documented() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section("Metrics"), re.MULTILINE))
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.REGISTRY.collect()
        if family.name.startswith("qoder_bridge_")
    }
    assert documented == exported
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"):
        assert name in section("Metrics")


def test_scenario_names_are_the_built_in_ones() -> None:
    paragraph = section("The Qoder API simulator")
    start = paragraph.index("Scenarios are built-in names")
    names = re.findall(r"`([a-z-]+)`", paragraph[start : paragraph.index("mirroring", start)])
    assert names == list(NAMED)
    assert "deploy/simulator/example.toml" in paragraph


def test_make_run_documents_where_its_broker_is() -> None:
    two = section("Two commands")
    assert "KAFKA_PORT=" in two and "KAFKA_BOOTSTRAP_SERVERS=" in two


def test_reading_the_topics_outside_make_run() -> None:
    reading = section("Reading the topics")
    assert "kcat -b 127.0.0.1:9092 -C -t qoder.events -X isolation.level=read_committed" in reading
    assert "org.apache.kafka.tools.consumer.ConsoleConsumer" in reading
    assert ".cache/kafka/4.3.1/libs/*" in reading
