"""What the deployment tests share: paths, the Dockerfile reader, kustomize rendering, and a
real server process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
COMPONENTS = sorted(p for p in (DEPLOY / "components").iterdir() if p.is_dir())
COMPOSE_FILES = [REPO / "docker-compose.yml", REPO / "docker-compose.cpu.yml"]
PROMETHEUS_CONFIG = DEPLOY / "compose" / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "compose" / "grafana" / "dashboards" / "clip-server.json"
VENV_BIN = Path(sys.executable).parent  # where pip put clip-serve, hadolint, ...


def service_env() -> dict[str, str]:
    """Settings every test server gets on top of the deployment's own: none. The deployment
    sets no CLIP_MODELS and serves the built-in default model; so do the tests."""
    return {}


def setting_env_names() -> set[str]:
    """CLIP_<FIELD> for every field of service.settings.Settings."""
    return {f"CLIP_{name.upper()}" for name in Settings.model_fields}


def tool(name: str) -> str:
    """A command from the virtual environment (test extra) or the system (kubectl, promtool)."""
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed; `make test` installs what the tests need"
    return found


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, rest)


def _logical_lines(text: str) -> Iterator[str]:
    """Instructions with their backslash continuations joined; comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def parse_dockerfile(path: Path = REPO / "Dockerfile") -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order)."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
    return args, stages


def stage_chain(stages: list[Stage], args: Mapping[str, str]) -> list[Stage]:
    """The final stage and the stages it is built on, base first, with ${ARG}s resolved."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stages[-1]]
    while True:
        base = chain[0].base
        for key, value in args.items():
            base = base.replace("${" + key + "}", value).replace("$" + key, value)
        if base not in by_name:
            return chain
        chain.insert(0, by_name[base])


def image_config(variant: str | None = None) -> dict:
    """The final image's ENV, ENTRYPOINT, CMD, USER, VOLUME, EXPOSE and HEALTHCHECK, as
    Docker would assemble them along the final stage's chain."""
    args, stages = parse_dockerfile()
    if variant is not None:
        args = {**args, "VARIANT": variant}
    config: dict = {"env": {}, "entrypoint": None, "cmd": None, "user": None, "volumes": [],
                    "expose": [], "healthcheck": None, "run": [], "stages": []}
    for stage in stage_chain(stages, args):
        config["stages"].append(stage.name or stage.base)
        for keyword, rest in stage.instructions:
            if keyword == "ENV":
                for word in shlex.split(rest):
                    key, _, value = word.partition("=")
                    config["env"][key] = value
            elif keyword in ("ENTRYPOINT", "CMD"):
                config[keyword.lower()] = json.loads(rest)  # exec form only
            elif keyword == "USER":
                config["user"] = rest
            elif keyword == "VOLUME":
                config["volumes"] += json.loads(rest)
            elif keyword == "EXPOSE":
                config["expose"] += rest.split()
            elif keyword == "HEALTHCHECK":
                config["healthcheck"] = json.loads(rest[rest.index("CMD") + 3:])
            elif keyword == "RUN":
                config["run"].append(rest)
    return config


# --- Kubernetes ---------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict]:
    result = run([tool("kubectl"), "kustomize", str(directory)], timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kustomize_with(overlay: Path, components: list[Path], workdir: Path) -> list[dict]:
    """Render `overlay` with `components` added to it, as README tells users to do
    (`kustomize edit add component`), from a copy of its kustomization in `workdir`."""
    spec = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    # kustomize takes only relative paths to other kustomizations.
    spec["resources"] = [os.path.relpath(overlay / r, workdir) for r in spec["resources"]]
    spec["components"] = [os.path.relpath(c, workdir) for c in components]
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return kustomize(workdir)


def find(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = find(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, proc: subprocess.Popen | None = None) -> httpx.Response:
    """Poll `url` until it answers 200; fail after `timeout` s or if `proc` exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} "
                                 f"answered:\n{_output(proc)}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
            last = f"HTTP {response.status_code}"
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s (last: {last})")


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _output(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError):
        return ""
    return (out or "")[-4000:]
