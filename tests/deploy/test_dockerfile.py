"""The Dockerfile: hadolint, and the properties the deployments rely on."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import REPO, image_config, parse_dockerfile, run, setting_env_names, tool

VARIANTS = ["cuda", "cpu"]


def test_hadolint_passes():
    result = run([tool("hadolint"), "--no-color", str(REPO / "Dockerfile")], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_mistake(tmp_path):
    # The linter really runs rules: a Dockerfile with a known fault fails.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && echo hi\n")
    result = run([tool("hadolint"), "--no-color", str(bad)], timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


def test_default_variant_is_cuda_and_both_variants_exist():
    args, stages = parse_dockerfile()
    assert args["VARIANT"] == "cuda"
    names = {s.name for s in stages}
    assert {"base-cuda", "base-cpu", "build", "runtime"} <= names
    assert stages[-1].name == "runtime"


@pytest.mark.parametrize("variant", VARIANTS)
def test_final_image_chain(variant):
    config = image_config(variant)
    assert config["stages"][0] == f"base-{variant}"
    assert "build" not in config["stages"]  # pip and the build tools stay behind
    if variant == "cuda":
        base = parse_dockerfile()[1][0].base
        assert base.startswith("nvidia/cuda:") and "-base-" in base


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_compilers_in_final_image(variant):
    installs = " ".join(config for config in image_config(variant)["run"])
    for compiler in ("gcc", "g++", "build-essential", "clang", "python3-dev", "cmake"):
        assert not re.search(rf"(?<![\w-]){re.escape(compiler)}(?![\w-])", installs), compiler


def test_runs_as_uid_1000():
    config = image_config()
    assert config["user"].split(":")[0] == "1000"
    assert any("useradd --uid 1000" in r for r in config["run"])


def test_writable_paths_are_volumes_owned_by_the_user():
    config = image_config()
    cache = config["env"]["CLIP_CACHE_DIR"]
    assert set(config["volumes"]) == {cache, "/tmp"}
    assert config["env"]["HOME"] == "/tmp"  # libraries' ~/.cache lands on the tmp volume
    assert any(f"chown 1000:1000 {cache}" in r for r in config["run"])
    assert config["env"]["PYTHONDONTWRITEBYTECODE"] == "1"


def test_env_names_are_settings_and_port_is_exposed():
    env = image_config()["env"]
    clip = {k for k in env if k.startswith("CLIP_")}
    assert clip <= setting_env_names(), clip - setting_env_names()
    assert "CLIP_MODELS" not in env  # the image serves the default model
    assert env["CLIP_HOST"] == "0.0.0.0"
    assert image_config()["expose"] == [env["CLIP_PORT"]]


def test_exec_form_entrypoint_and_healthcheck():
    config = image_config()
    assert config["entrypoint"] == ["clip-serve"]
    assert config["cmd"] is None
    python, script = config["healthcheck"]
    assert python == "python3"
    # The script is copied into the image from the repository, and asks /healthz.
    source = REPO / "deploy" / "docker" / "healthcheck.py"
    assert any(r == f"{source.relative_to(REPO)} {script}"
               for r in _copies()), f"{script} is not copied from {source}"
    assert "/healthz" in source.read_text()


def _copies() -> list[str]:
    _, stages = parse_dockerfile()
    return [rest for keyword, rest in stages[-1].instructions if keyword == "COPY"]


def test_dockerignore_keeps_the_context_small():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"  # everything out, then only what the build copies back in
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "clip_core", "service", "deploy/docker"} <= allowed
    for copied in _all_copy_sources():
        assert any(copied == a or copied.startswith(a + "/") for a in allowed), copied


def _all_copy_sources() -> list[str]:
    _, stages = parse_dockerfile()
    sources = []
    for stage in stages:
        for keyword, rest in stage.instructions:
            if keyword == "COPY" and not rest.startswith("--from"):
                sources += rest.split()[:-1]
    return sources
