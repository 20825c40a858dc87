"""deploy/asyncapi.yaml, the contract of the Kafka topics, and Kafka records checked against it.

A record is checked as a consumer sees it: its key (the message's Kafka binding ``key``), its
headers (UTF-8 values, each name once, against the message's ``headers``) and its value (UTF-8
JSON against the message's ``payload``). The roles are the document's channel ids: ``events``,
``alerts``, ``deadLetters``, ``checkpoints``.

``assert_topics_match_asyncapi(bootstrap, topics)`` reads every committed record of a test's four
topics and checks each one: the end-to-end tests call it once each, so a field the bridge adds,
drops or changes without this document fails them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from tests.kafka_broker import read_topic

DOCUMENT = Path(__file__).resolve().parents[1] / "deploy" / "asyncapi.yaml"
URI = "urn:qoder-kafka-bridge:asyncapi"
ROLES = ("events", "alerts", "deadLetters", "checkpoints")


class ContractError(AssertionError):
    """A record that deploy/asyncapi.yaml does not allow; the message says where and why."""


@functools.cache
def document() -> dict[str, Any]:
    doc = yaml.safe_load(DOCUMENT.read_text())
    assert isinstance(doc, dict)
    return doc


@functools.cache
def _registry() -> Registry[Any]:
    resource = Resource.from_contents(document(), default_specification=DRAFT7)
    return Registry().with_resource(URI, resource)


def resolve(node: Any) -> Any:
    """Follow a local ``$ref`` (``#/components/...``) of the document, once or more."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = document()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


@functools.cache
def validator(pointer: str) -> Draft7Validator:
    """A validator for the schema at ``pointer`` (``/components/schemas/Alert``) in the
    document, its ``$ref``s resolved within the document."""
    return Draft7Validator({"$ref": f"{URI}#{pointer}"}, registry=_registry())


def messages(role: str) -> dict[str, str]:
    """The messages a channel carries: name -> JSON pointer of the message object."""
    channel = document()["channels"][role]
    found = {}
    for name, message in channel["messages"].items():
        ref = message.get("$ref", f"#/channels/{role}/messages/{name}")
        found[name] = ref.removeprefix("#")
    return found


def _pointer(message: str, *path: str) -> str:
    """The JSON pointer of ``path`` inside a message, through its ``$ref``s."""
    node = resolve({"$ref": "#" + message})
    pointer = message
    for part in path:
        child = node[part]
        if isinstance(child, dict) and "$ref" in child:
            pointer = child["$ref"].removeprefix("#")
        else:
            pointer = f"{pointer}/{part}"
        node = resolve(child)
    return pointer


def _errors(pointer: str, instance: Any) -> list[str]:
    def where(error: ValidationError) -> str:
        return "/".join(str(p) for p in error.absolute_path) or "(top)"

    return [
        f"{where(e)}: {e.message[:300]}"
        for e in sorted(validator(pointer).iter_errors(instance), key=lambda e: e.path)
    ]


def check_parts(role: str, key: Any, headers: Mapping[str, Any], value: Any) -> None:
    """Check decoded parts against the channel's messages: one of them must take all three."""
    failures: dict[str, list[str]] = {}
    for name, message in messages(role).items():
        problems = [f"key {p}" for p in _errors(_pointer(message, "bindings", "kafka", "key"), key)]
        problems += [f"header {p}" for p in _errors(_pointer(message, "headers"), dict(headers))]
        problems += [f"value {p}" for p in _errors(_pointer(message, "payload"), value)]
        if not problems:
            return
        failures[name] = problems
    raise ContractError(
        "; ".join(f"not a {name}: " + "; ".join(problems) for name, problems in failures.items())
    )


def check_record(role: str, record: Any) -> None:
    """Check one ConsumerRecord of the topic with ``role`` against the document."""
    where = f"{record.topic}[{record.partition}]@{record.offset}"
    try:
        if role not in ROLES:
            raise ContractError(f"no channel {role!r} in {DOCUMENT.name}")
        if record.key is None:
            raise ContractError("the record has no key")
        if record.value is None:
            raise ContractError("the record has no value (a tombstone)")
        names = [name for name, _ in record.headers]
        if len(names) != len(set(names)):
            raise ContractError(f"a header name repeats: {names}")
        try:
            key = record.key.decode("utf-8")
            headers = {name: value.decode("utf-8") for name, value in record.headers}
            value = json.loads(record.value.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ContractError(f"not UTF-8 (JSON): {exc}") from None
        check_parts(role, key, headers, value)
    except ContractError as exc:
        raise ContractError(f"{where} ({role}) breaks deploy/asyncapi.yaml: {exc}") from None


def check_records(role: str, records: Iterable[Any]) -> int:
    """Check every record; return how many there were."""
    count = 0
    for record in records:
        check_record(role, record)
        count += 1
    return count


async def assert_topics_match_asyncapi(bootstrap: str, topics: Any) -> dict[str, int]:
    """Every committed record of the test's events, alerts, dead-letter and checkpoint topics,
    checked against deploy/asyncapi.yaml; returns the count per role (the events: at least
    one, or the check proved nothing)."""
    counts = {}
    for role, topic in zip(
        ROLES, (topics.events, topics.alerts, topics.dlq, topics.checkpoints), strict=True
    ):
        counts[role] = check_records(role, await read_topic(bootstrap, topic))
    assert counts["events"] > 0, f"no events to check: {counts}"
    return counts
