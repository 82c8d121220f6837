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

.PHONY: install serve test lint bench bench-service clean

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

# tests/deploy run Debian's Prometheus (promtool, and a real scrape of a live server);
# CI runs as root on a fresh machine, so the first `make test` installs it.
PROMETHEUS := /usr/bin/prometheus
$(PROMETHEUS):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

test: install lint $(PROMETHEUS)
	$(PY) -m pytest

bench: install
	$(PY) loadtests/bench_model.py

# The service against the raw model in one run (about 15 minutes on 2 cores): report.md,
# report.json and plots in out/bench. docs/benchmarks.md explains it.
bench-service: install
	$(PY) loadtests/bench.py --model ViT-B-32 --dtype fp32 --repeats 3 --bf16 --out out/bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
