# Two commands for a fresh machine: `make serve` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# torch comes first, pinned to the wheels this machine keeps on disk (and its pip
# constraint); the project's own range then accepts it and never pulls another build.
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install serve test lint bench bench-service gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Serves the built-in default model (builtin/clip-shapes); CLIP_MODELS or --model picks others.
serve: install
	$(PY) -m service --log-format text

lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

# tests/deploy run Debian's Prometheus (promtool, and a real scrape of a live server);
# CI runs as root on a fresh machine, so the first `make test` installs it.
PROMETHEUS := /usr/bin/prometheus
$(PROMETHEUS):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

# tests/e2e/test_playground.py drives Debian's Chromium through Playwright (which cannot
# download its own browsers here); installed the same way, on the first `make test`.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation

test: install lint $(PROMETHEUS) $(CHROMIUM)
	$(PY) -m pytest

bench: install
	$(PY) loadtests/bench_model.py

# The service against the raw model in one run (about 15 minutes on 2 cores): report.md,
# report.json and plots in out/bench. docs/benchmarks.md explains it.
bench-service: install
	$(PY) loadtests/bench.py --model ViT-B-32 --dtype fp32 --repeats 3 --bf16 --out out/bench

# The packages the service needs that a lent GPU machine's Python (CPython 3.12, torch
# 2.11, no internet) lacks, as wheels for it in .whl/; loadtests/gpu_check.sh installs
# them there with `pip install --no-index --target`. Pinned to what this machine's venv
# runs, so the GPU run serves with the versions the tests here passed with.
# typing-extensions is newer than the image's and pydantic needs it (>= 4.16).
GPU_WHEELS ?= fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
	pydantic-settings==2.16.3 python-dotenv==1.2.4 uvicorn==0.55.0 httptools==0.9.0 \
	python-multipart==0.0.34 ftfy==6.3.1 wcwidth==0.9.4 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2 orjson==3.13.0
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))

gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	du -sh .whl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
