"""The dependency lock (deploy/lock/): it agrees with pyproject.toml, and the virtualenv that
`make test` runs in is exactly what it pins.

`make test` runs `deploy/lock/lock.py check` before it installs anything; these tests show that
the check catches what it must, and that its pins satisfy every declared requirement.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / "deploy" / "lock"
LOCK_PY = LOCK_DIR / "lock.py"
SELF = "qoder-kafka-bridge"


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LOCK_PY), "--root", str(root), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def pins(name: str) -> dict[str, tuple[str, Requirement]]:
    """name -> (version, requirement) of every entry of a lock file."""
    found = {}
    for line in (LOCK_DIR / name).read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line.rstrip(" \\"))
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            found[canonicalize_name(requirement.name)] = (spec.version, requirement)
    return found


def declared() -> list[Requirement]:
    """pyproject.toml's requirements: the base ones and those of the simulator and dev extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    listed = [*project["dependencies"], *extras["simulator"], *extras["dev"]]
    return [r for r in map(Requirement, listed) if canonicalize_name(r.name) != SELF]


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """pyproject.toml and deploy/lock/ in a scratch tree, to break on purpose."""
    (tmp_path / "deploy").mkdir()
    shutil.copytree(LOCK_DIR, tmp_path / "deploy" / "lock")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_lock_agrees_with_pyproject() -> None:
    """The committed lock was made from the committed pyproject.toml (`make lock-check`)."""
    result = check(ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        pytest.param(
            lambda text: text.replace('"anyio>=4.4",', '"anyio>=4.4",\n  "attrs>=23",'),
            "pyproject.toml now has attrs>=23",
            id="dependency-added",
        ),
        pytest.param(
            lambda text: text.replace('"pytest-timeout>=2.3",\n', ""),
            "no longer has [dev] pytest-timeout>=2.3",
            id="dev-dependency-removed",
        ),
        pytest.param(
            lambda text: text.replace('"httpx>=0.27"', '"httpx>=0.28"'),
            "pyproject.toml now has httpx>=0.28",
            id="bound-changed",
        ),
        pytest.param(
            lambda text: text.replace('requires-python = ">=3.11"', 'requires-python = ">=3.12"'),
            "requires-python >=3.12",
            id="python-changed",
        ),
    ],
)
def test_lock_check_fails_when_pyproject_changes(repo_copy: Path, edit: object, named: str) -> None:
    """Scenario: someone edits the dependencies in pyproject.toml and forgets `make lock`: the
    check fails, names the requirement, and says how to fix it."""
    pyproject = repo_copy / "pyproject.toml"
    changed = edit(pyproject.read_text())  # type: ignore[operator]
    assert changed != pyproject.read_text(), "the edit no longer applies to pyproject.toml"
    pyproject.write_text(changed)
    result = check(repo_copy)
    assert result.returncode == 1
    assert named in result.stderr
    assert "make lock" in result.stderr


def test_lock_check_fails_on_hand_edited_pins(repo_copy: Path) -> None:
    """Scenario: a pin edited by hand in runtime.txt (the image would run a version `make test`
    never ran), a hash removed from dev.txt, uv.txt out of step with dev.txt."""
    lock = repo_copy / "deploy" / "lock"
    version, _ = pins("runtime.txt")["httpx"]
    runtime = (lock / "runtime.txt").read_text()
    (lock / "runtime.txt").write_text(runtime.replace(f"httpx=={version}", "httpx==0.27.0", 1))
    dev = (lock / "dev.txt").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(dev) if line.startswith("structlog=="))
    end = next(i for i in range(at + 1, len(dev)) if not dev[i].lstrip().startswith("--hash"))
    dev[at : end + 1] = [dev[at].replace(" \\", "")]
    (lock / "dev.txt").write_text("".join(dev))
    (lock / "uv.txt").write_text((lock / "uv.txt").read_text().replace("uv==", "uv==0.0.1+", 1))
    result = check(repo_copy)
    assert result.returncode == 1
    assert "runtime.txt pins httpx" in result.stderr
    assert "dev.txt: no hashes for structlog" in result.stderr
    assert "uv.txt pins uv unlike deploy/lock/dev.txt" in result.stderr


def test_every_declared_requirement_is_satisfied_by_its_pin() -> None:
    """Each requirement of pyproject.toml (base, simulator, dev) has a pin in dev.txt inside its
    range, and each base requirement one in runtime.txt, at the same version."""
    dev, runtime = pins("dev.txt"), pins("runtime.txt")
    base = {canonicalize_name(Requirement(r).name) for r in _project()["dependencies"]}
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in dev, f"{requirement} is not in deploy/lock/dev.txt"
        assert requirement.specifier.contains(dev[name][0], prereleases=True), (
            f"dev.txt pins {name}=={dev[name][0]}, outside {requirement}"
        )
        if name in base:
            assert runtime[name][0] == dev[name][0], name
    assert set(runtime) <= set(dev)


def test_every_pin_has_hashes_and_nothing_is_fetched_from_elsewhere() -> None:
    """Pins only: no URLs, no editable or local paths, no extra indexes in the lock files."""
    for name in ("dev.txt", "runtime.txt", "uv.txt"):
        text = (LOCK_DIR / name).read_text()
        for forbidden in ("--index-url", "--extra-index-url", "--find-links", " @ ", "-e "):
            assert forbidden not in text, f"{name}: {forbidden.strip()}"
        assert pins(name), name


def test_the_virtualenv_is_exactly_the_lock() -> None:
    """`make test` runs in what deploy/lock/dev.txt pins, at those versions and nothing else
    of note: what passes here is what the lock (and so the image) holds."""
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }
    wrong = []
    for name, (version, requirement) in pins("dev.txt").items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if installed.get(name) != version:
            wrong.append(f"{name}: locked {version}, installed {installed.get(name)}")
    extra = set(installed) - set(pins("dev.txt")) - {SELF, "pip", "setuptools", "wheel"}
    assert not wrong and not extra, (
        "the virtualenv differs from deploy/lock/dev.txt (make test re-syncs it): "
        + "; ".join(wrong + [f"{name} is not locked" for name in sorted(extra)])
    )


def _project() -> dict[str, list[str]]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"])
