"""deploy/: every overlay renders with kustomize, validates against the Kubernetes JSON
schemas offline (kubernetes-validate), and keeps the invariants the service needs."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest
from deploy_helpers import (
    COMPONENTS,
    OVERLAYS,
    REPO,
    find,
    kustomize,
    kustomize_with,
    one,
    setting_env_names,
)
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

# The oldest Kubernetes still commonly run, and the newest schema the validator bundles.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
# Custom resources: no schema in the Kubernetes set; checked field by field below.
CUSTOM_KINDS = {"ServiceMonitor", "ScaledObject"}
# Not the bare overlay name: tests/conftest.py skips any test with a "gpu" keyword.
OVERLAY_IDS = [f"{o.name}-overlay" for o in OVERLAYS]


@pytest.fixture(scope="module", params=OVERLAYS, ids=OVERLAY_IDS)
def rendered(request) -> list[dict]:
    return kustomize(request.param)


@pytest.fixture(scope="module")
def gpu_objects() -> list[dict]:
    return kustomize(next(o for o in OVERLAYS if o.name == "gpu"))


def _validate(objects: list[dict], version: str) -> list[str]:
    """Errors for each object; custom resources only when they have no schema."""
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if obj["kind"] not in CUSTOM_KINDS:
                errors.append(f"{obj['kind']}: no schema")
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {e.path}")
    return errors


def _container(objects: list[dict]) -> dict:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "clip-server"]
    return container


def _settings(objects: list[dict]) -> dict[str, str]:
    return one(objects, "ConfigMap")["data"]


def test_there_are_cpu_and_gpu_overlays():
    assert {"cpu", "gpu"} <= {o.name for o in OVERLAYS}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_validates_against_kubernetes_schemas(rendered, version):
    kinds = {o["kind"] for o in rendered}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler",
            "PodDisruptionBudget"} <= kinds
    assert _validate(rendered, version) == []


def test_validation_is_real(gpu_objects):
    # A misspelt field and a wrong type are caught: the schemas are really applied.
    broken = copy.deepcopy(gpu_objects)
    deployment = one(broken, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    one(broken, "Service")["spec"]["ports"][0]["port"] = "eighty"
    assert len(_validate(broken, K8S_VERSIONS[-1])) == 2


@pytest.mark.parametrize("component", COMPONENTS, ids=[c.name for c in COMPONENTS])
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_overlay_with_component_validates(overlay, component, tmp_path):
    objects = kustomize_with(overlay, [component], tmp_path)
    assert _validate(objects, K8S_VERSIONS[-1]) == []


def test_all_components_together(tmp_path):
    overlay = next(o for o in OVERLAYS if o.name == "gpu")
    objects = kustomize_with(overlay, COMPONENTS, tmp_path)
    assert _validate(objects, K8S_VERSIONS[-1]) == []
    assert not find(objects, "HorizontalPodAutoscaler")  # KEDA owns scaling then
    scaled = one(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]


def test_hardening(rendered):
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    container = _container(rendered)
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert "memory" in container["resources"]["limits"]


def test_writable_paths_are_mounted_volumes(rendered):
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(rendered)["volumeMounts"]}
    assert mounts.keys() >= {"/tmp", _settings(rendered)["CLIP_CACHE_DIR"]}
    assert set(mounts.values()) <= volumes


def test_settings_are_real_settings_and_default_model_is_served(rendered):
    data = _settings(rendered)
    assert set(data) <= setting_env_names(), set(data) - setting_env_names()
    assert "CLIP_MODELS" not in data
    Settings(**{k.removeprefix("CLIP_").lower(): v for k, v in data.items()})  # all valid
    container = _container(rendered)
    configmap = one(rendered, "ConfigMap")["metadata"]["name"]
    assert {"configMapRef": {"name": configmap}} in container["envFrom"]


def test_ports_match_settings(rendered):
    port = int(_settings(rendered)["CLIP_PORT"])
    container = _container(rendered)
    (http,) = [p for p in container["ports"] if p["name"] == "http"]
    assert http["containerPort"] == port
    service = one(rendered, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = one(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_probes_point_at_real_routes(rendered):
    # Without its lifespan the app loads no model: /healthz answers 200, /readyz 503, and
    # a path with no route 404.
    client = TestClient(create_app(Settings()))
    assert client.get("/no-such-route").status_code == 404
    container = _container(rendered)
    probes = {k: container[k]["httpGet"] for k in
              ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert client.get(probe["path"]).status_code in (200, 503), probe["path"]
        assert probe["port"] == "http"
    # The server listens only after loading the model: the startup probe must allow
    # minutes before liveness can restart the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_termination_outlasts_prestop_and_drain(rendered):
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    command = _container(rendered)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    drain = float(_settings(rendered).get("CLIP_DRAIN_TIMEOUT_S",
                                          Settings.model_fields["drain_timeout_s"].default))
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    assert pause > 0


def test_hpa_targets_the_deployment(rendered):
    hpa = one(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(rendered, "Deployment")["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2  # the PDB can then allow one pod down
    assert "replicas" not in one(rendered, "Deployment")["spec"]  # the HPA owns it


def test_gpu_overlay_requests_a_gpu(gpu_objects):
    container = _container(gpu_objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = one(gpu_objects, "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    assert _settings(gpu_objects)["CLIP_DEVICE"] == "cuda"
    assert container["image"].endswith(":cuda")


def test_gpu_overlay_cpus_cover_the_decoders_and_the_model(gpu_objects):
    """The pod's CPU request holds the decode pool, the serving threads and the event loop,
    and images are decoded on the GPU, where a CPU pool could not keep up."""
    settings = Settings(**{k.removeprefix("CLIP_").lower(): v
                           for k, v in _settings(gpu_objects).items()})
    cpus = float(_container(gpu_objects)["resources"]["requests"]["cpu"])
    assert settings.torch_threads is not None
    assert cpus >= settings.prepare_workers + settings.torch_threads
    assert settings.preprocess == "device" and settings.cuda_graphs
    memory = _container(gpu_objects)["resources"]
    assert memory["requests"]["memory"] == memory["limits"]["memory"]


def test_cuda_image_wheels_match_its_cuda_base():
    """The torch wheel index (cuXYZ) is the CUDA version of the base image, and
    torchvision, which the device preprocessing needs, is installed beside torch."""
    text = (REPO / "Dockerfile").read_text()
    wheels = re.search(r"ARG CUDA_WHEELS=cu(\d+)", text).group(1)
    base = re.search(r"FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-", text)
    assert wheels == base.group(1) + base.group(2)
    assert re.search(r'"torchvision==\$TORCHVISION_VERSION"', text)


def test_cpu_overlay_asks_for_no_gpu():
    cpu = kustomize(next(o for o in OVERLAYS if o.name == "cpu"))
    container = _container(cpu)
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["image"].endswith(":cpu")
    assert _settings(cpu)["CLIP_DEVICE"] == "cpu"


def test_custom_resources(tmp_path):
    """No schema ships for these; check what would break them silently."""
    from service.metrics import Metrics

    overlay = next(o for o in OVERLAYS if o.name == "cpu")
    objects = kustomize_with(overlay, COMPONENTS, tmp_path)
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"

    scaled = one(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    families = {f.name for f in Metrics().registry.collect()}
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http")
        float(meta["threshold"])
        names = set(re.findall(r"\bclip_[a-z_]+", meta["query"]))
        assert names and all(re.sub(r"_total$", "", n) in families for n in names), names


def test_prefetch_component_fetches_what_the_server_serves(tmp_path):
    overlay = next(o for o in OVERLAYS if o.name == "gpu")
    objects = kustomize_with(overlay, [c for c in COMPONENTS if c.name == "prefetch-weights"],
                             tmp_path)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    container = _container(objects)
    assert init["image"] == container["image"]  # the overlay's tag reaches the init container
    assert init["command"] == ["clip-fetch"] and "$(CLIP_MODELS)" in init["args"]
    assert init["envFrom"] == container["envFrom"]
    assert init["securityContext"] == container["securityContext"]
    assert {m["mountPath"] for m in init["volumeMounts"]} == \
        {m["mountPath"] for m in container["volumeMounts"]}
    data = _settings(objects)
    assert data["CLIP_MODELS"] and data["CLIP_OFFLINE"] == "true"
