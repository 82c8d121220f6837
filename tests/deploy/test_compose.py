"""docker compose files against the Compose specification, Prometheus' config by promtool,
and the Grafana dashboard against the metrics the service really exports."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from deploy_helpers import (
    COMPOSE_FILES,
    DASHBOARD,
    DEPLOY,
    PROMETHEUS_CONFIG,
    REPO,
    dashboard_queries,
    image_config,
    run,
    setting_env_names,
    tool,
)

from service.metrics import Metrics
from service.settings import Settings

MONITORING = DEPLOY / "compose" / "monitoring.yml"


def _load(path):
    return yaml.safe_load(path.read_text())


def _check_compose(*paths) -> str | None:
    """None when every file is valid against the Compose specification, else the errors.
    The schema is the one check-jsonschema bundles (vendor.compose-spec): no network."""
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                  *map(str, paths)], timeout=60)
    return None if result.returncode == 0 else result.stdout + result.stderr


def test_compose_files_follow_the_compose_spec():
    assert _check_compose(*COMPOSE_FILES, MONITORING) is None


def test_compose_validation_is_real(tmp_path):
    bad = _load(COMPOSE_FILES[0])
    bad["services"]["clip"]["deploy"]["resources"]["reservations"]["devices"][0]["drivr"] = "x"
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(bad))
    assert "drivr" in (_check_compose(path) or "")


def test_default_file_reserves_a_gpu_and_cpu_file_does_not():
    gpu, cpu = (_load(p)["services"]["clip"] for p in COMPOSE_FILES)
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and gpu["environment"]["CLIP_DEVICE"] == "cuda"
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu" and cpu["environment"]["CLIP_DEVICE"] == "cpu"


def test_cpu_and_gpu_files_differ_only_where_they_must():
    gpu, cpu = (_load(p) for p in COMPOSE_FILES)
    g, c = gpu["services"]["clip"], cpu["services"]["clip"]
    for service in (g, c):
        service.pop("deploy", None)
        service.pop("image")
        service["build"]["args"].pop("VARIANT")
        service["environment"].pop("CLIP_DEVICE")
    assert g == c
    assert {k: v for k, v in gpu.items() if k != "services"} == \
        {k: v for k, v in cpu.items() if k != "services"}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_clip_service_is_hardened_and_matches_the_image(path):
    spec = _load(path)
    clip = spec["services"]["clip"]
    assert set(clip) >= {"image", "build"}  # `docker compose up` builds it: no other step
    assert clip["build"]["context"] == "."
    assert clip["read_only"] is True
    assert clip["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in clip["security_opt"]
    image = image_config()
    mounts = {(v if isinstance(v, dict) else {"target": v.split(":")[1]})["target"]
              for v in clip["volumes"]}
    assert mounts == set(image["volumes"])  # the cache and /tmp, nothing else writable
    assert clip["ports"] == [f"{image['env']['CLIP_PORT']}:{image['env']['CLIP_PORT']}"]
    assert set(clip["environment"]) <= setting_env_names()
    assert "CLIP_MODELS" not in clip["environment"]  # the built-in default model
    grace = float(clip["stop_grace_period"].removesuffix("s"))
    assert grace > Settings.model_fields["drain_timeout_s"].default
    assert spec["include"] == ["deploy/compose/monitoring.yml"]
    assert set(spec["volumes"]) == {"models"}


def test_prometheus_scrapes_the_clip_service():
    config = _load(PROMETHEUS_CONFIG)
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = image_config()["env"]["CLIP_PORT"]
    assert job["static_configs"][0]["targets"] == [f"clip:{port}"]
    monitoring = _load(MONITORING)["services"]
    mounted = {v.split(":")[0]: v.split(":")[1] for v in monitoring["prometheus"]["volumes"]
               if v.startswith("./")}
    assert (MONITORING.parent / "prometheus/prometheus.yml").resolve() == PROMETHEUS_CONFIG
    assert mounted["./prometheus/prometheus.yml"] in \
        " ".join(monitoring["prometheus"]["command"])


def test_promtool_accepts_the_prometheus_config():
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names() -> set[str]:
    """Every series name the service can export, from the one module that defines them."""
    suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                "histogram": ["_bucket", "_sum", "_count", "_created"]}
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name + s for s in suffixes[family.type]}
    return names


def test_dashboard_queries_only_exported_metrics():
    exported = exported_names()
    queries = dashboard_queries()
    assert queries
    for expr in queries:
        used = set(re.findall(r"\bclip_[a-z0-9_]+", expr))
        assert used, f"queries no clip metric: {expr}"
        assert used <= exported, f"{used - exported} not exported by service/metrics.py"


def test_dashboard_covers_what_operators_need():
    used = " ".join(dashboard_queries())
    for needed in ("clip_requests_total", "clip_request_latency_seconds_bucket",
                   "clip_items_total", "clip_batch_size_bucket", "clip_queue_depth",
                   "clip_rejected_items_total", "clip_dropped_items_total",
                   "clip_cache_hits_total", "clip_cuda_memory_allocated_bytes"):
        assert needed in used, needed
    assert "histogram_quantile(0.5," in used and "histogram_quantile(0.99," in used


def test_grafana_provisioning_is_wired():
    dashboard = json.loads(DASHBOARD.read_text())
    (source,) = _load(DEPLOY / "compose/grafana/provisioning/datasources/prometheus.yml")[
        "datasources"]
    assert source["url"] == "http://prometheus:9090"  # the compose service's name and port
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    (provider,) = _load(DEPLOY / "compose/grafana/provisioning/dashboards/clip-server.yml")[
        "providers"]
    grafana = _load(MONITORING)["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in grafana["volumes"]
                  if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == \
        f"{provider['options']['path']}/{DASHBOARD.name}"
    assert (REPO / "deploy/compose/grafana/dashboards" / DASHBOARD.name).exists()
