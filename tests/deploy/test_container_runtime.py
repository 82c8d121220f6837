"""The image's own command, outside Docker: the Dockerfile's ENTRYPOINT and ENV run as a
real process on 127.0.0.1, its HEALTHCHECK passes, and a real Prometheus started with the
compose stack's prometheus.yml scrapes it.

Only what cannot exist outside a container changes: the port (a free one), the host
(loopback only), the volume paths (temporary folders), and PATH (this virtual environment
in place of /opt/venv). Everything else is the image's environment as written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from deploy_helpers import (
    PROMETHEUS_CONFIG,
    VENV_BIN,
    dashboard_queries,
    free_port,
    image_config,
    service_env,
    stop,
    tool,
    wait_for,
)

STARTUP_S = 120  # a loaded CI machine; readiness takes a few seconds here
SCRAPE_S = 60


class Container:
    """The final image's command and environment, run as a local process."""

    def __init__(self, root: Path):
        config = image_config()
        self.config = config
        env = dict(config["env"])
        # Paths the image provides as volumes become temporary folders here.
        for key in ("HOME", "CLIP_CACHE_DIR"):
            env[key] = str(root / env[key].strip("/").replace("/", "_"))
            Path(env[key]).mkdir(parents=True)
        env["TMPDIR"] = env["HOME"]
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        self.port = free_port()
        env.update(CLIP_HOST="127.0.0.1", CLIP_PORT=str(self.port), **service_env())
        self.env = env
        self.url = f"http://127.0.0.1:{self.port}"
        argv = config["entrypoint"] + (config["cmd"] or [])
        self.proc = subprocess.Popen(argv, env=env, cwd=env["HOME"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    c = Container(tmp_path_factory.mktemp("container"))
    try:
        wait_for(c.url + "/readyz", STARTUP_S, c.proc)
        yield c
    finally:
        code = stop(c.proc)
    assert code == 0, f"clip-serve exited with {code} on SIGTERM"


def test_entrypoint_serves_and_becomes_ready(container):
    assert container.config["entrypoint"] == ["clip-serve"]
    assert httpx.get(container.url + "/readyz", timeout=5).status_code == 200
    models = httpx.get(container.url + "/v1/models", timeout=5).json()["data"]
    assert models and all(m["status"] == "ready" for m in models)
    response = httpx.post(container.url + "/embed", json={"texts": ["a red square"]},
                          timeout=30)
    assert response.status_code == 200, response.text


def test_healthcheck_command_passes_then_fails_when_down(container):
    argv = [sys.executable if a == "python3" else a for a in container.config["healthcheck"]]
    script = Path(argv[1])
    # In the image the script lies at its COPY destination; here, at its source.
    local = Path(__file__).resolve().parents[2] / "deploy" / "docker" / script.name
    argv[1] = str(local)
    ok = subprocess.run(argv, env=container.env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    closed = {**container.env, "CLIP_PORT": str(free_port())}
    down = subprocess.run(argv, env=closed, capture_output=True, timeout=30)
    assert down.returncode == 1


def _prometheus_config(target: str) -> dict:
    """The compose stack's prometheus.yml, pointed at `target` and scraping every second;
    everything else (job, path, relabelling) as shipped."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return config


@pytest.fixture(scope="module")
def prometheus(container, tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus")
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(f"127.0.0.1:{container.port}")))
    port = free_port()
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/-/ready", 60, proc)
        yield url
    finally:
        stop(proc)


def _query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]["result"]


def _eventually(prometheus: str, expr: str, total: float = 0) -> list[dict]:
    """The series of `expr` once there are some and their values add up to `total`."""
    deadline = time.monotonic() + SCRAPE_S
    while time.monotonic() < deadline:
        result = _query(prometheus, expr)
        if result and sum(float(r["value"][1]) for r in result) >= total:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no series for {expr} adding up to {total} within {SCRAPE_S} s")


def test_prometheus_scrapes_requests_and_batch_sizes(container, prometheus):
    with httpx.Client(base_url=container.url, timeout=30) as client:
        for i in range(3):
            assert client.post("/embed", json={"texts": [f"shape {i}"] * 2}).status_code == 200
    job = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]["job_name"]
    up = _eventually(prometheus, f'up{{job="{job}"}} == 1')
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{container.port}"
    _eventually(prometheus, 'clip_requests_total{endpoint="/embed",status="200"}', total=3)
    _eventually(prometheus, 'clip_batch_size_count{modality="text"}', total=1)
    buckets = _eventually(prometheus, 'clip_batch_size_bucket{modality="text"}')
    assert {float(r["metric"]["le"]) for r in buckets} >= {1.0, 2.0, float("inf")}


def test_dashboard_queries_run_on_prometheus(container, prometheus):
    # Prometheus parses each of the dashboard's queries (a syntax error fails _query).
    # Grafana substitutes $__rate_interval itself; a fixed window stands in for it here.
    _eventually(prometheus, "clip_requests_total")
    for expr in dashboard_queries():
        _query(prometheus, expr.replace("$__rate_interval", "1m"))
