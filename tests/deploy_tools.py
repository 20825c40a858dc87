"""The two Go programs tests/test_deploy.py needs: helm (render and lint the chart) and promtool
(check and unit-test the alert rules).

Neither is on PyPI, so each is built from its pinned Go module with ``go install`` (through the
Go module proxy) into ``.cache/deploy-tools/<name>-<version>-<build hash>/``. Measured on 2 cores
with empty Go caches: helm 87 s, promtool 192 s (downloads included; built concurrently here).
After that, a fresh clone re-links both from Go's build cache in ~10 s, and a warm ``.cache/``
costs nothing.

``python -m tests.deploy_tools`` builds them ahead of the tests and prints their paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "deploy-tools"
BUILD_TIMEOUT_S = 900


class ToolUnavailable(RuntimeError):
    """A tool cannot be had here (no Go toolchain, or the build failed)."""


@dataclass(frozen=True)
class GoTool:
    name: str
    package: str
    version: str
    ldflags: str = ""

    @property
    def path(self) -> Path:
        build = hashlib.sha256(f"{self.package}@{self.version} {self.ldflags}".encode())
        return CACHE / f"{self.name}-{self.version}-{build.hexdigest()[:8]}" / self.name


# The ldflags of helm's own release build: without them `helm version` says "v3.22" and helm
# assumes Kubernetes 1.20 wherever no --kube-version is given (helm 3.22 is built on 1.37).
HELM = GoTool(
    "helm",
    "helm.sh/helm/v3/cmd/helm",
    "v3.22.0",
    ldflags=" ".join(
        f"-X helm.sh/helm/v3/{var}"
        for var in (
            "internal/version.version=v3.22.0",
            "pkg/chartutil.k8sVersionMajor=1",
            "pkg/chartutil.k8sVersionMinor=37",
            "pkg/lint/rules.k8sVersionMajor=1",
            "pkg/lint/rules.k8sVersionMinor=37",
        )
    ),
)
# Prometheus' Go module versions are v0.<major><minor>.<patch>: v0.316.0 is Prometheus 3.16.0.
PROMTOOL = GoTool(
    "promtool",
    "github.com/prometheus/prometheus/cmd/promtool",
    "v0.316.0",
    ldflags="-X github.com/prometheus/common/version.Version=3.16.0",
)
TOOLS = (HELM, PROMTOOL)


def go_binary() -> str:
    found = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ToolUnavailable("no Go toolchain (`go`) on PATH to build helm and promtool")
    return found


@contextmanager
def _locked() -> Iterator[None]:
    # Two pytest processes (or a test and `python -m tests.deploy_tools`) build once, not twice.
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure(*tools: GoTool) -> dict[str, Path]:
    """Build whichever of ``tools`` is missing, concurrently; return name -> binary path."""
    with _locked():
        missing = [t for t in tools if not t.path.exists()]
        if missing:
            go = go_binary()
            started = time.monotonic()
            builds = [(t, *_start_build(go, t)) for t in missing]
            failures = []
            for tool, proc, gobin in builds:
                try:
                    _, err = proc.communicate(timeout=BUILD_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                    err = f"timed out after {BUILD_TIMEOUT_S} s\n{err}"
                built = Path(gobin) / tool.name
                if proc.returncode == 0 and built.exists():
                    tool.path.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(built, tool.path)
                else:
                    failures.append(f"go install {tool.package}@{tool.version}:\n{err[-3000:]}")
                shutil.rmtree(gobin, ignore_errors=True)
            print(
                f"deploy_tools: built {', '.join(t.name for t in missing)} "
                f"in {time.monotonic() - started:.0f} s",
                file=sys.stderr,
            )
            if failures:
                raise ToolUnavailable("\n\n".join(failures))
    return {t.name: t.path for t in tools}


def _start_build(go: str, tool: GoTool) -> tuple[subprocess.Popen[str], str]:
    gobin = tempfile.mkdtemp(prefix=f"{tool.name}-", dir=CACHE)
    env = {**os.environ, "GOBIN": gobin, "GOFLAGS": "-buildvcs=false", "GOTOOLCHAIN": "local"}
    cmd = [go, "install"]
    if tool.ldflags:
        cmd += ["-ldflags", tool.ldflags]
    cmd.append(f"{tool.package}@{tool.version}")
    proc = subprocess.Popen(
        cmd, env=env, cwd=CACHE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return proc, gobin


if __name__ == "__main__":
    for name, path in ensure(*TOOLS).items():
        print(f"{name}: {path}")
