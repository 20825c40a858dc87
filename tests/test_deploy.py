"""The deployment artefacts: Dockerfile, Helm chart, alert rules, Grafana dashboard.

Everything runs offline with tools the project installs itself: hadolint and
kubernetes-validate (Kubernetes' JSON schemas) from the `dev` extra, helm and promtool built by
tests/deploy_tools.py. Locally a missing tool skips its tests; in CI (CI=true) it fails them.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import venv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests import deploy_tools

# The first test to need helm/promtool may build them (~4 min on a new machine, see
# deploy_tools); every tool call below carries its own, shorter timeout.
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "qoder-kafka-bridge"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "qoder-kafka-bridge.json"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
# Two pods of the Deployment, as the kubelet would name them.
POD_NAME = "qkb-qoder-kafka-bridge-7d9f8c6b5-x2x7k"
OTHER_POD_NAME = "qkb-qoder-kafka-bridge-7d9f8c6b5-q8mzp"

# The metric names the dashboard and rules may use (bridge/metrics.py implements them).
METRICS = {
    "qoder_bridge_full_scans_total": "counter",
    "qoder_bridge_list_polls_total": "counter",
    "qoder_bridge_stream_limit": "gauge",
    "qoder_bridge_streams_waiting": "gauge",
    "qoder_bridge_kafka_reachable": "gauge",
    "qoder_bridge_events_received_total": "counter",
    "qoder_bridge_events_published_total": "counter",
    "qoder_bridge_publish_latency_seconds": "histogram",
    "qoder_bridge_end_to_end_lag_seconds": "histogram",
    "qoder_bridge_open_streams": "gauge",
    "qoder_bridge_reconnects_total": "counter",
    "qoder_bridge_pumps": "gauge",
    "qoder_bridge_api_requests_total": "counter",
    "qoder_bridge_dlq_records_total": "counter",
    "qoder_bridge_alerts_total": "counter",
    "qoder_bridge_transactions_total": "counter",
    "qoder_bridge_checkpoint_age_seconds": "gauge",
    "qoder_bridge_token_rejected": "gauge",
    "qoder_bridge_threads_followed": "gauge",
    "qoder_bridge_inflight_bytes": "gauge",
    "qoder_bridge_ready": "gauge",
    "qoder_bridge_build_info": "gauge",
    "qoder_bridge_shards_owned": "gauge",
    "qoder_bridge_rebalances_total": "counter",
    "qoder_bridge_shard_resume_seconds": "histogram",
    "qoder_bridge_shards_fenced_total": "counter",
}
#: Series of prometheus_client's standard collectors that the dashboard may show too.
STANDARD_SERIES = {"process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total"}
SERIES_NAMES = {
    name + suffix
    for name, kind in METRICS.items()
    for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))
} | STANDARD_SERIES


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI: CI must never pass by not running these tests."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: deployment checks may not be skipped)")
    pytest.skip(reason)


def run(
    cmd: list[str | Path], *, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def require_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"{name} is not installed: pip install -e '.[dev]'")


def venv_tool(name: str) -> Path:
    """A console script of the dev extra, next to the running interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        unavailable(f"{name} is not installed: pip install -e '.[dev]'")
    return path


@pytest.fixture(scope="session")
def go_tools() -> dict[str, Path]:
    try:
        return deploy_tools.ensure(*deploy_tools.TOOLS)
    except deploy_tools.ToolUnavailable as exc:
        unavailable(f"helm/promtool cannot be built: {exc}")
        raise


@pytest.fixture(scope="session")
def helm(go_tools: dict[str, Path]) -> Path:
    return go_tools["helm"]


@pytest.fixture(scope="session")
def promtool(go_tools: dict[str, Path]) -> Path:
    return go_tools["promtool"]


# -- Dockerfile -----------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for entry in logical:
        instruction, _, args = entry.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing in the Dockerfile, not even at style level."""
    hadolint = venv_tool("hadolint")
    result = run([hadolint, "--no-color", "--failure-threshold", "style", ROOT / "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_image_is_minimal_non_root_and_signal_ready() -> None:
    """The final stage installs only wheels, runs as a numeric non-root user with a writable
    /tmp only, and starts the bridge itself as PID 1 (exec form) on port 8080."""
    preamble, build, runtime = dockerfile_stages()
    assert all(i == "ARG" for i, _ in preamble)
    assert build[0][1].startswith("python:") and "slim" in build[0][1]
    assert runtime[0][1].startswith("python:") and "slim" in runtime[0][1]

    build_runs = " ".join(a for i, a in build if i == "RUN")
    assert "pip wheel" in build_runs and "[simulator" not in build_runs

    def last(instruction: str) -> str:
        return [a for i, a in runtime if i == instruction][-1]

    user = last("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"USER {user}: want a numeric uid >= 10000"
    assert json.loads(last("ENTRYPOINT")) == ["qoder-bridge"]
    assert json.loads(last("CMD")) == ["run"]
    assert last("EXPOSE") == "8080"
    env = " ".join(a for i, a in runtime if i == "ENV")
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "HOME=/tmp"):
        assert setting in env

    runs = [a for i, a in runtime if i == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert len(installs) == 1
    install = installs[0]
    assert "--no-index" in install and "--no-cache-dir" in install
    assert "--mount=type=bind,from=build" in install, "wheels must not become a layer"
    assert "[" not in install.split("pip install", 1)[1], "no extras (simulator) in production"
    assert not any(i in ("COPY", "ADD") for i, _ in runtime), "the runtime stage copies nothing"
    for forbidden in ("apt-get", "gcc", "build-essential", "pip wheel"):
        assert not any(forbidden in r for r in runs), forbidden

    labels = " ".join(a for i, a in runtime if i == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    """The build context is the wheel's inputs: everything is ignored but what COPY names."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for stage in dockerfile_stages():
        for instruction, args in stage:
            if instruction == "COPY" and "--from" not in args:
                copied.update(s.rstrip("/") for s in shlex.split(args)[:-1])
    assert copied == allowed
    assert {".git", ".venv", ".cache", "tests", "deploy"}.isdisjoint(allowed)


# -- the image's install steps, in a fresh virtualenv ---------------------------------------

LOCK = ROOT / "deploy" / "lock" / "runtime.txt"


def dockerfile_install(stage: list[tuple[str, str]], python: Path, wheels: Path) -> None:
    """Run a stage's COPY into /wheels and its pip RUN lines here, as the Dockerfile has them:
    /wheels is ``wheels``, ``pip`` is ``python -m pip``, bind mounts are already in place.
    Other RUN lines (the user and group) are not this machine's business."""
    for instruction, args in stage:
        if instruction == "COPY" and shlex.split(args)[-1].startswith("/wheels/"):
            source, target = shlex.split(args)
            (wheels / target.removeprefix("/wheels/")).write_bytes((ROOT / source).read_bytes())
        elif instruction == "RUN" and re.match(r"(--mount=\S+\s+)*pip ", args):
            command = re.sub(r"--mount=\S+\s+", "", args).replace("/wheels", str(wheels))
            command = re.sub(r"(^|&&\s*)pip ", rf"\g<1>{shlex.quote(str(python))} -m pip ", command)
            result = run(["bash", "-euc", command], cwd=ROOT, timeout=300)
            assert result.returncode == 0, (
                f"RUN {args}\n" + result.stdout[-3000:] + result.stderr[-3000:]
            )


@pytest.fixture(scope="session")
def image_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's first stage, run here: the locked dependencies as wheels, hashes
    checked (deploy/lock/runtime.txt), and the project's own wheel."""
    wheels = tmp_path_factory.mktemp("wheels")
    _, build, _ = dockerfile_stages()
    dockerfile_install(build, Path(sys.executable), wheels)
    return wheels


@pytest.fixture(scope="session")
def image_venv(image_wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final stage's install, run here in a fresh virtualenv from the first stage's wheels:
    no index, every hash checked again, the bridge on top, ``pip check``."""
    root = tmp_path_factory.mktemp("image-venv")
    venv.create(root, with_pip=True, symlinks=True)
    _, _, runtime = dockerfile_stages()
    dockerfile_install(runtime, root / "bin" / "python", image_wheels)
    return root


def test_image_installs_the_locked_dependencies_only(image_wheels: Path) -> None:
    """The first stage downloads exactly deploy/lock/runtime.txt (hash-checked, no resolution)
    and the final stage installs from those wheels with the hashes checked again: the image
    runs the versions `make test` ran, and a tampered download fails the build."""
    _, build, runtime = dockerfile_stages()
    build_runs = [a for i, a in build if i == "RUN"]
    (locked,) = [r for r in build_runs if "-r /wheels/runtime.txt" in r]
    for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:"):
        assert flag in locked, flag
    (own,) = [r for r in build_runs if r is not locked]
    assert "--no-deps" in own and own.endswith(" ."), "the project's wheel adds no dependency"
    (install,) = [a for i, a in runtime if i == "RUN" and "pip install" in a]
    assert "--require-hashes" in install and "-r /wheels/runtime.txt" in install
    assert "pip check" in install
    pinned = set()
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line.rstrip(" \\"))
            if requirement.marker is None or requirement.marker.evaluate():
                pinned.add(canonicalize_name(requirement.name))
    built = {canonicalize_name(w.name.split("-")[0]) for w in image_wheels.glob("*.whl")}
    assert built == pinned | {"qoder-kafka-bridge"}


def image_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The container's environment: nothing of ours leaks in from the developer's shell."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "PYTHONDONTWRITEBYTECODE": "1",
        "BRIDGE_LOG_FORMAT": "json",
        **extra,
    }


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_installed_image_reports_its_version(image_venv: Path, tmp_path: Path) -> None:
    """`qoder-bridge --version` works from the installed wheel and prints the package version."""
    version = importlib.import_module("bridge").__version__
    result = run([image_venv / "bin" / "qoder-bridge", "--version"], env=image_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert version in result.stdout + result.stderr


def test_installed_image_has_no_simulator_dependencies(image_venv: Path) -> None:
    """The production install pulls the base dependencies only, not the simulator extra."""
    result = run([image_venv / "bin" / "python", "-m", "pip", "list", "--format=json"])
    installed = {re.sub(r"[-_.]+", "-", p["name"]).lower() for p in json.loads(result.stdout)}
    assert {"qoder-kafka-bridge", "aiokafka", "httpx", "prometheus-client"} <= installed
    assert not {"uvicorn", "httptools", "pytest"} & installed


def test_installed_check_names_unreachable_endpoints(image_venv: Path, tmp_path: Path) -> None:
    """`qoder-bridge check` against an API and a Kafka that are not there exits 1 with a clear,
    one-line-per-check error naming both endpoints, no traceback and no token."""
    api_port, kafka_port = closed_port(), closed_port()
    token = "pt-deploy-test-secret-token"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    env = image_env(
        tmp_path,
        QODER_API_URL=f"http://127.0.0.1:{api_port}/api/v1/cloud",
        QODER_ACCESS_TOKEN_FILE=str(token_file),
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{kafka_port}",
        BRIDGE_API_TIMEOUT_S="5",
    )
    result = run([image_venv / "bin" / "qoder-bridge", "check"], env=env, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"127.0.0.1:{api_port}" in output, output
    assert f"127.0.0.1:{kafka_port}" in output, output
    assert "Traceback" not in output
    assert token not in output


def test_installed_check_rejects_bad_config_with_exit_2(image_venv: Path, tmp_path: Path) -> None:
    """A bad setting exits 2 before any I/O, naming the variable."""
    env = image_env(tmp_path, BRIDGE_DELIVERY="sometimes", **{"QODER_ACCESS_TOKEN": "pt-x"})
    result = run([image_venv / "bin" / "qoder-bridge", "check"], env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "BRIDGE_DELIVERY" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# -- Helm chart -----------------------------------------------------------------------------

COMBOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "sasl_ssl_scram": {
        "kafka": {
            "bootstrapServers": "b-1.kafka.example:9096,b-2.kafka.example:9096",
            "securityProtocol": "SASL_SSL",
            "sasl": {
                "mechanism": "SCRAM-SHA-512",
                "username": "bridge",
                "passwordSecret": {"name": "kafka-bridge-scram", "key": "password"},
            },
            "tls": {
                "caSecret": {"name": "kafka-ca", "key": "ca.pem"},
                "clientCertSecret": {"name": "kafka-bridge-tls"},
            },
        },
        "qoder": {"sessions": ["sess_01abc", "sess_02def"]},
        "networkPolicy": {"kafka": {"cidrs": ["10.20.0.0/16"]}},
        "extraEnv": [{"name": "BRIDGE_STALL_TIMEOUT_S", "value": "60"}],
    },
    "at_least_once": {"delivery": {"mode": "at_least_once"}, "topics": {"alerts": ""}},
    "scaled_out": {"replicas": 3, "kafka": {"groupId": "prod-eu.qoder-bridge"}},
    "paused": {"replicas": 0},
    "monitoring_off": {
        "metrics": {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}},
        "networkPolicy": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "serviceAccount": {"create": False},
    },
}


def helm_template(
    helm: Path, values: dict[str, Any], tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))
    return run(
        [helm, "template", "qkb", CHART, "--namespace", "bridge", "--kube-version",
         KUBE_VERSIONS[-1], "--values", values_file, *extra],
        timeout=60,
    )  # fmt: skip


def render(helm: Path, values: dict[str, Any], tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Render the chart; return its objects by kind (one of each kind is rendered)."""
    result = helm_template(helm, values, tmp_path)
    assert result.returncode == 0, result.stderr
    objects: dict[str, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(result.stdout):
        if doc:
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


@pytest.fixture(params=sorted(COMBOS))
def combo(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (bridge,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(bridge)


def pod_env(objects: dict[str, dict[str, Any]], pod_name: str = POD_NAME) -> dict[str, str]:
    """The bridge's environment as the kubelet would build it for the pod ``pod_name``."""
    env = dict(objects["ConfigMap"]["data"])
    for var in container(objects)["env"]:
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = pod_name
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = "from-secret-" + var["valueFrom"]["secretKeyRef"]["name"]
    return env


def test_chart_lints_strictly(helm: Path, combo: str, tmp_path: Path) -> None:
    """`helm lint --strict` passes with each values combination."""
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(COMBOS[combo]))
    result = run([helm, "lint", "--strict", CHART, "--values", values_file], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_renders_valid_kubernetes_objects(helm: Path, combo: str, tmp_path: Path) -> None:
    """Every built-in object validates strictly (unknown fields rejected) against the
    Kubernetes API schemas of the oldest and newest supported versions."""
    kubernetes_validate = require_module("kubernetes_validate")
    objects = render(helm, COMBOS[combo], tmp_path)
    builtin = {k: o for k, o in objects.items() if not o["apiVersion"].startswith("monitoring.")}
    for version in KUBE_VERSIONS:
        for kind, obj in builtin.items():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{kind} invalid for Kubernetes {version}: {exc}")
    expected = {"Deployment", "ConfigMap", "Service"}
    if combo != "monitoring_off":
        expected |= {"ServiceAccount", "NetworkPolicy", "ServiceMonitor", "PrometheusRule"}
    if combo not in ("monitoring_off", "paused"):
        expected.add("PodDisruptionBudget")
    assert set(objects) == expected


def test_chart_environment_is_what_the_bridge_accepts(
    helm: Path, combo: str, tmp_path: Path
) -> None:
    """The pod's environment loads into the bridge's Settings without error, every variable is
    one the bridge knows, and the values land where the chart's values say."""
    config = importlib.import_module("bridge.config")
    values = COMBOS[combo]
    objects = render(helm, values, tmp_path)
    env = pod_env(objects)
    known = {v.name for v in config.ENV_VARS} | {a for v in config.ENV_VARS for a in v.aliases}
    assert set(env) <= known
    # The kubelet would mount the Secrets' files at these paths; the test makes them under
    # tmp_path, because the bridge checks that TLS files exist.
    mounts = [m["mountPath"] for m in container(objects)["volumeMounts"] if m.get("readOnly")]
    files = {}
    for name, value in env.items():
        if any(value.startswith(m + "/") for m in mounts):
            files[name] = Path(value)
            env[name] = str(tmp_path / value.lstrip("/"))
            Path(env[name]).parent.mkdir(parents=True, exist_ok=True)
            Path(env[name]).write_text("placeholder\n")
    settings = config.load_settings(env, stderr_isatty=False)

    assert settings.api.token is None
    assert files["QODER_ACCESS_TOKEN_FILE"] == Path("/var/run/secrets/qoder/token")
    assert settings.api.token_file == Path(env["QODER_ACCESS_TOKEN_FILE"])
    assert settings.shutdown.drain_timeout_s == 20
    assert settings.http.port == 8080
    assert settings.log.format == "json"
    # The group is the release's own unless set: two releases never share one by accident.
    group = values.get("kafka", {}).get("groupId") or "qkb-qoder-kafka-bridge"
    assert settings.kafka.group_id == group
    # The pod's name only names the member (client id suffix).
    assert settings.delivery.transactional_id == POD_NAME
    assert settings.delivery.mode == values.get("delivery", {}).get("mode", "exactly_once")
    if combo == "sasl_ssl_scram":
        assert settings.kafka.security_protocol == "SASL_SSL"
        assert settings.kafka.sasl_mechanism == "SCRAM-SHA-512"
        assert settings.kafka.sasl_username == "bridge"
        assert files["KAFKA_SSL_CAFILE"] == Path("/var/run/secrets/kafka-ca/ca.crt")
        assert settings.kafka.ssl_cafile == Path(env["KAFKA_SSL_CAFILE"])
        assert settings.kafka.ssl_certfile == Path(env["KAFKA_SSL_CERTFILE"])
        assert settings.kafka.ssl_keyfile == Path(env["KAFKA_SSL_KEYFILE"])
        assert settings.api.sessions == ("sess_01abc", "sess_02def")
        assert settings.api.stall_timeout_s == 60
    if combo == "at_least_once":
        assert settings.kafka.alerts_topic is None


def test_deployment_gives_one_member_that_drains(helm: Path, tmp_path: Path) -> None:
    """Defaults: one member, rollouts that start the new pod before stopping the old one (the
    group always has a member), a grace period longer than the drain deadline, probes on
    /livez and /readyz, a locked-down pod."""
    objects = render(helm, {}, tmp_path)
    deployment = objects["Deployment"]["spec"]
    pod = deployment["template"]["spec"]
    bridge = container(objects)
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    drain = float(objects["ConfigMap"]["data"]["BRIDGE_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] == drain + 20 == 40

    txn = next(v for v in bridge["env"] if v["name"] == "BRIDGE_TRANSACTIONAL_ID")
    assert txn["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert bridge["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert bridge["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert bridge["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert bridge["args"] == ["run"] and "command" not in bridge

    assert pod["automountServiceAccountToken"] is False
    assert objects["ServiceAccount"]["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = bridge["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m for m in bridge["volumeMounts"]}
    assert "/tmp" in mounts  # noqa: S108 -- the container's one writable path, not a temp file
    # A subPath mount never sees a rotated Secret.
    assert all("subPath" not in m for m in mounts.values())
    token_file = next(v["value"] for v in bridge["env"] if v["name"] == "QODER_ACCESS_TOKEN_FILE")
    assert str(Path(token_file).parent) in mounts

    assert objects["Service"]["spec"]["ports"][0]["port"] == 8080
    assert objects["PodDisruptionBudget"]["spec"]["selector"] == deployment["selector"]


def test_three_replicas_keep_two_up_spread_over_nodes(helm: Path, tmp_path: Path) -> None:
    """replicas 3: three members, a PodDisruptionBudget that lets one go at a time (two keep
    every shard owned), and spread constraints over nodes and zones that select exactly the
    release's pods of one revision."""
    objects = render(helm, {"replicas": 3}, tmp_path)
    deployment = objects["Deployment"]["spec"]
    assert deployment["replicas"] == 3
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": deployment["selector"]}
    pod = deployment["template"]["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        # Soft: a cluster with fewer nodes than replicas still runs every member.
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["labelSelector"] == deployment["selector"]
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]


def test_replicas_zero_pauses_without_a_budget_that_blocks(helm: Path, tmp_path: Path) -> None:
    """replicas 0: a Deployment of no pod and no PodDisruptionBudget left to block a drain,
    even one asking for minAvailable 1."""
    values = {"replicas": 0, "podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": None}}
    objects = render(helm, values, tmp_path)
    assert objects["Deployment"]["spec"]["replicas"] == 0
    assert "PodDisruptionBudget" not in objects


def test_every_replica_has_the_same_configuration(helm: Path, tmp_path: Path) -> None:
    """Members share sessions only if they run the same configuration: two pods of a
    three-replica release load the same Settings, but for the pod name that names the member
    (its client id); and the bridge needs no per-pod value: without it the rest loads the same."""
    config = importlib.import_module("bridge.config")
    objects = render(helm, {"replicas": 3}, tmp_path)
    one, other = pod_env(objects, POD_NAME), pod_env(objects, OTHER_POD_NAME)
    differ = {name for name in one.keys() | other.keys() if one.get(name) != other.get(name)}
    assert differ == {"BRIDGE_TRANSACTIONAL_ID"}
    per_pod = [v for v in container(objects)["env"] if "fieldRef" in v.get("valueFrom", {})]
    assert [v["name"] for v in per_pod] == ["BRIDGE_TRANSACTIONAL_ID"]

    def settings(env: dict[str, str]) -> Any:
        return config.load_settings(env, stderr_isatty=False)

    def named(loaded: Any, name: str) -> Any:
        delivery = dataclasses.replace(loaded.delivery, transactional_id=name)
        return dataclasses.replace(loaded, delivery=delivery)

    first, second = settings(one), settings(other)
    assert first.delivery.transactional_id == POD_NAME
    assert second.delivery.transactional_id == OTHER_POD_NAME
    assert named(second, POD_NAME) == first
    del one["BRIDGE_TRANSACTIONAL_ID"]
    assert named(settings(one), POD_NAME) == first
    assert first.kafka.group_id == "qkb-qoder-kafka-bridge"


def test_drain_deadline_sets_the_grace_period(helm: Path, tmp_path: Path) -> None:
    """One value drives both BRIDGE_DRAIN_TIMEOUT_S and terminationGracePeriodSeconds."""
    objects = render(helm, {"shutdown": {"drainTimeoutSeconds": 45}}, tmp_path)
    assert objects["ConfigMap"]["data"]["BRIDGE_DRAIN_TIMEOUT_S"] == "45"
    assert objects["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 65


def test_sasl_ssl_secrets_are_references_and_files(helm: Path, tmp_path: Path) -> None:
    """SASL_SSL + SCRAM: the password comes from its Secret, the CA and client certificate
    are mounted files, and no secret value appears in the rendered chart."""
    objects = render(helm, COMBOS["sasl_ssl_scram"], tmp_path)
    bridge = container(objects)
    env = {v["name"]: v for v in bridge["env"]}
    assert env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kafka-bridge-scram",
        "key": "password",
    }
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["kafka-ca"]["secret"]["secretName"] == "kafka-ca"
    assert volumes["kafka-ca"]["secret"]["items"] == [{"key": "ca.pem", "path": "ca.crt"}]
    assert volumes["kafka-client"]["secret"]["secretName"] == "kafka-bridge-tls"
    mounts = {m["name"]: m["mountPath"] for m in bridge["volumeMounts"]}
    assert env["KAFKA_SSL_CAFILE"]["value"].startswith(mounts["kafka-ca"] + "/")
    assert env["KAFKA_SSL_KEYFILE"]["value"].startswith(mounts["kafka-client"] + "/")
    assert "Secret" not in {o["kind"] for o in objects.values()}


def test_network_policy_allows_only_dns_api_kafka_and_metrics(helm: Path, tmp_path: Path) -> None:
    """Egress: DNS, the API's port, Kafka's ports (from the bootstrap list); ingress: the
    HTTP port only."""
    spec = render(helm, COMBOS["sasl_ssl_scram"], tmp_path)["NetworkPolicy"]["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert [r["ports"] for r in spec["ingress"]] == [[{"port": "http", "protocol": "TCP"}]]
    dns, api, kafka = spec["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert api["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert kafka["ports"] == [{"port": 9096, "protocol": "TCP"}]
    assert kafka["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kafka": {"securityProtocol": "SASL_SSL"}}, "kafka.sasl.mechanism"),
        ({"kafka": {"sasl": {"mechanism": "PLAIN"}}}, "kafka.sasl.mechanism"),
        ({"kafka": {"tls": {"caSecret": {"name": "ca"}}}}, "kafka.tls"),
        ({"kafka": {"bootstrapServers": "kafka"}}, "kafka.bootstrapServers"),
        ({"replicas": 33}, "replicas"),
        ({"replicas": -1}, "replicas"),
        ({"delivery": {"transactionalIdPrefix": "prod-eu."}}, "kafka.groupId"),
        ({"delivery": {"mode": "sometimes"}}, "delivery"),
        ({"qoder": {"token": {"existingSecret": ""}}}, "existingSecret"),
        ({"qoder": {"sessions": ["thr_1"]}}, "sessions"),
        ({"shutdownn": {}}, "shutdownn"),
    ],
)
def test_chart_rejects_bad_values_naming_them(
    helm: Path, values: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """Inconsistent or mistyped values fail at render time and the error names the value."""
    result = helm_template(helm, values, tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_service_monitor_scrapes_the_bridge_service(helm: Path, tmp_path: Path) -> None:
    """The ServiceMonitor selects the chart's Service and scrapes its named port's /metrics."""
    objects = render(helm, {}, tmp_path)
    monitor = objects["ServiceMonitor"]
    service = objects["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["bridge"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # An unready bridge (token rejected, Kafka down) is exactly the one to scrape.
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_prometheus_rule_is_the_rules_file(helm: Path, tmp_path: Path) -> None:
    """The chart's PrometheusRule carries exactly deploy/prometheus/rules.yaml."""
    rule = render(helm, {}, tmp_path)["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


# -- alert rules ----------------------------------------------------------------------------


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(?:qoder_bridge|process|python)_[a-z0-9_]+", text))


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"]}


def test_rules_pass_promtool_check(promtool: Path) -> None:
    """`promtool check rules` (syntax, templates in annotations, lint) accepts the file."""
    result = run([promtool, "check", "rules", "--lint=all", "--lint-fatal", RULES])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_cover_the_failure_modes_with_real_metrics() -> None:
    """One alert per failure mode an operator must hear about, each on real metric names,
    each with a severity, a summary and a description."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {
        "QoderBridgeNoEventsPublished",
        "QoderBridgeEndToEndLagHigh",
        "QoderBridgeTokenRejected",
        "QoderBridgeStreamsCapped",
        "QoderBridgeReconnectStorm",
        "QoderBridgeDLQGrowing",
        "QoderBridgeTransactionsAborting",
        "QoderBridgeShardsUnowned",
        "QoderBridgeNoMembers",
        "QoderBridgeShardsFenced",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])
        used = metric_names(rule["expr"])
        assert used and used <= SERIES_NAMES, f"{rule['alert']}: {used - SERIES_NAMES}"


def alert_cases() -> list[dict[str, Any]]:
    """promtool unit tests: synthetic series in, the alerts that must (not) fire out."""
    t = {"job": "qkb", "instance": "10.0.0.7:8080"}
    sel = ",".join(f'{k}="{v}"' for k, v in t.items())

    def series(name: str, values: str, **labels: str) -> dict[str, str]:
        extra = "".join(f',{k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{sel}{extra}}}", "values": values}

    def fires(alert: str, at: str, severity: str, **labels: str) -> dict[str, Any]:
        exp = {**t, "severity": severity, **labels}
        return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": exp}]}

    def silent(alert: str, at: str) -> dict[str, Any]:
        return {"eval_time": at, "alertname": alert, "exp_alerts": []}

    def case(input_series: list[dict[str, str]], *checks: dict[str, Any]) -> dict[str, Any]:
        return {"interval": "1m", "input_series": input_series, "alert_rule_test": list(checks)}

    # Members of one release: job qkb in namespace bridge, one instance each.
    def member(name: str, pod: str, values: str, **labels: str) -> dict[str, str]:
        extra = "".join(f',{k}="{v}"' for k, v in labels.items())
        target = f'job="qkb",namespace="bridge",instance="{pod}:8080"'
        return {"series": f"{name}{{{target}{extra}}}", "values": values}

    def group_fires(alert: str, at: str, severity: str) -> dict[str, Any]:
        exp = {"job": "qkb", "namespace": "bridge", "severity": severity}
        return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": exp}]}

    ksm = {"job": "kube-state-metrics", "instance": "ksm:8080"}
    ksm |= {"namespace": "bridge", "deployment": "qkb"}

    def replicas(values: str) -> dict[str, str]:
        labels = ",".join(f'{k}="{v}"' for k, v in ksm.items())
        return {"series": f"kube_deployment_spec_replicas{{{labels}}}", "values": values}

    lag = "qoder_bridge_end_to_end_lag_seconds_bucket"
    return [
        # Threads followed, events flowing for 10 minutes, then nothing.
        case(
            [
                series("qoder_bridge_threads_followed", "3x60"),
                series(
                    "qoder_bridge_events_published_total", "0+10x10 100x50", type="agent.message"
                ),
            ],
            silent("QoderBridgeNoEventsPublished", "15m"),
            fires("QoderBridgeNoEventsPublished", "40m", "critical"),
        ),
        # Threads followed and not one event published since the start (no series at all).
        case(
            [series("qoder_bridge_threads_followed", "2x30")],
            fires("QoderBridgeNoEventsPublished", "15m", "critical"),
        ),
        # Nothing followed, nothing published: quiet.
        case(
            [series("qoder_bridge_threads_followed", "0x30")],
            silent("QoderBridgeNoEventsPublished", "25m"),
        ),
        # Every event arrives ~45 s late, then (second case) ~0.5 s late.
        case(
            [
                series(lag, "0x30", le="30"),
                series(lag, "0+10x30", le="60"),
                series(lag, "0+10x30", le="+Inf"),
            ],
            fires("QoderBridgeEndToEndLagHigh", "20m", "warning"),
        ),
        case(
            [
                series(lag, "0+10x30", le="1"),
                series(lag, "0+10x30", le="30"),
                series(lag, "0+10x30", le="+Inf"),
            ],
            silent("QoderBridgeEndToEndLagHigh", "20m"),
        ),
        case(
            [series("qoder_bridge_token_rejected", "0 0 1x10")],
            silent("QoderBridgeTokenRejected", "2m"),
            fires("QoderBridgeTokenRejected", "6m", "critical"),
        ),
        case(
            [series("qoder_bridge_streams_waiting", "0 3x30")],
            silent("QoderBridgeStreamsCapped", "10m"),
            fires("QoderBridgeStreamsCapped", "20m", "warning"),
        ),
        # 10 threads, 20 reconnects a minute (2 per thread), then 5 a minute.
        case(
            [
                series("qoder_bridge_threads_followed", "10x30"),
                series("qoder_bridge_reconnects_total", "0+20x30", reason="stall"),
            ],
            fires("QoderBridgeReconnectStorm", "20m", "warning"),
        ),
        case(
            [
                series("qoder_bridge_threads_followed", "10x30"),
                series("qoder_bridge_reconnects_total", "0+5x30", reason="disconnect"),
            ],
            silent("QoderBridgeReconnectStorm", "20m"),
        ),
        case(
            [series("qoder_bridge_dlq_records_total", "0 0 0 1x30", reason="not_json")],
            silent("QoderBridgeDLQGrowing", "2m"),
            fires("QoderBridgeDLQGrowing", "5m", "warning"),
            silent("QoderBridgeDLQGrowing", "25m"),
        ),
        case(
            [
                series("qoder_bridge_transactions_total", "0+1x30", outcome="aborted"),
                series("qoder_bridge_transactions_total", "0+600x30", outcome="committed"),
            ],
            fires("QoderBridgeTransactionsAborting", "20m", "warning"),
        ),
        case(
            [
                series("qoder_bridge_transactions_total", "0x30", outcome="aborted"),
                series("qoder_bridge_transactions_total", "0+600x30", outcome="committed"),
            ],
            silent("QoderBridgeTransactionsAborting", "20m"),
        ),
        case(
            [series("qoder_bridge_ready", "1 1 0x20")],
            silent("QoderBridgeNotReady", "5m"),
            fires("QoderBridgeNotReady", "15m", "warning"),
        ),
        # Scale-out: three members of job qkb share 32 shards. One dies at 10m and the two
        # others take its 10 shards; a one-minute dip (a rebalance scraped mid-way) is no alert.
        case(
            [
                member("qoder_bridge_shards_owned", "a", "11x10 16x20"),
                member("qoder_bridge_shards_owned", "b", "11x3 5 11x6 16x20"),
                member("qoder_bridge_shards_owned", "c", "10x10 stale"),
            ],
            silent("QoderBridgeShardsUnowned", "5m"),
            silent("QoderBridgeShardsUnowned", "25m"),
            silent("QoderBridgeShardsDoublyOwned", "25m"),
        ),
        # ... the dead member's shards find no owner: 22 of 32 for good.
        case(
            [
                member("qoder_bridge_shards_owned", "a", "11x30"),
                member("qoder_bridge_shards_owned", "b", "11x30"),
                member("qoder_bridge_shards_owned", "c", "10x5 stale"),
            ],
            silent("QoderBridgeShardsUnowned", "7m"),
            group_fires("QoderBridgeShardsUnowned", "15m", "critical"),
        ),
        # A zombie that keeps claiming its 11 shards next to their new owners.
        case(
            [
                member("qoder_bridge_shards_owned", "a", "16x30"),
                member("qoder_bridge_shards_owned", "b", "16x30"),
                member("qoder_bridge_shards_owned", "c", "11x30"),
            ],
            group_fires("QoderBridgeShardsDoublyOwned", "15m", "warning"),
            silent("QoderBridgeShardsUnowned", "15m"),
        ),
        # replicas 1 wanted (kube-state-metrics), the only member gone at 10m (crash loop).
        case(
            [
                replicas("1x60"),
                member("qoder_bridge_build_info", "a", "1x10 stale", version="0.2.0"),
                member("qoder_bridge_shards_owned", "a", "32x10 stale"),
            ],
            silent("QoderBridgeNoMembers", "9m"),
            {
                "eval_time": "20m",
                "alertname": "QoderBridgeNoMembers",
                "exp_alerts": [{"exp_labels": {**ksm, "job": "qkb", "severity": "critical"}}],
            },
        ),
        # replicas 0 at 10m: a pause. Nothing owns a shard and nothing fires.
        case(
            [
                replicas("1x10 0x50"),
                member("qoder_bridge_build_info", "a", "1x10 stale", version="0.2.0"),
                member("qoder_bridge_shards_owned", "a", "32x10 stale"),
            ],
            silent("QoderBridgeNoMembers", "30m"),
            silent("QoderBridgeShardsUnowned", "30m"),
        ),
        # A member frozen past the session timeout: its 11 shards fenced at 3m.
        case(
            [series("qoder_bridge_shards_fenced_total", "0 0 0 11x30")],
            silent("QoderBridgeShardsFenced", "2m"),
            fires("QoderBridgeShardsFenced", "5m", "warning"),
            silent("QoderBridgeShardsFenced", "25m"),
        ),
    ]


def test_alerts_fire_on_their_failure_and_only_then(promtool: Path, tmp_path: Path) -> None:
    """`promtool test rules`: each alert fires on a synthetic outage and stays quiet when
    healthy. (Annotations are stripped: their templates are checked by promtool check.)"""
    rules = yaml.safe_load(RULES.read_text())
    bare = copy.deepcopy(rules)
    for group in bare["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(bare))
    tests_file = tmp_path / "tests.yaml"
    tests_file.write_text(
        yaml.safe_dump(
            {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": alert_cases()}
        )
    )
    result = run([promtool, "test", "rules", tests_file])
    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana dashboard ----------------------------------------------------------------------


def dashboard_targets() -> Iterator[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_dashboard_shows_every_metric() -> None:
    """The dashboard is valid JSON with unique panel ids, and every metric appears on it."""
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"] and board["title"]
    used: set[str] = set()
    for title, expr in dashboard_targets():
        names = metric_names(expr)
        assert names and names <= SERIES_NAMES, f"{title}: {names - SERIES_NAMES}"
        used |= names
    shown = {n if n in METRICS else re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert set(METRICS) - shown == set()


def test_dashboard_queries_are_valid_promql(promtool: Path, tmp_path: Path) -> None:
    """Every panel query parses: promtool checks them as recording rules, with Grafana's
    variables replaced by what Grafana would send."""
    substitutions: dict[str, Callable[[re.Match[str]], str]] = {
        r"\$__rate_interval|\$__interval|\$__range": lambda _m: "5m",
        r"\$\{?(job|instance)\}?": lambda _m: ".*",
    }
    rules = []
    for n, (title, query) in enumerate(dashboard_targets()):
        expr = query
        for pattern, repl in substitutions.items():
            expr = re.sub(pattern, repl, expr)
        rules.append({"record": f"dashboard:panel_{n}:check", "expr": expr, "labels": {"t": title}})
    rules_file = tmp_path / "dashboard-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", rules_file])
    assert result.returncode == 0, result.stdout + result.stderr


def test_known_metrics_match_the_bridge_registry() -> None:
    """The names the dashboard and rules rely on are the ones bridge/metrics.py exports."""
    metrics = importlib.import_module("bridge.metrics")
    exported: dict[str, str] = {}
    for family in metrics.REGISTRY.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        exported[name] = family.type
    ours = {name: kind for name, kind in exported.items() if name.startswith("qoder_bridge_")}
    assert ours == METRICS
    # The standard process and Python collectors ride along on the same registry.
    assert {"process_resident_memory_bytes", "process_open_fds", "python_info"} <= set(exported)
