# Retrace: set-up, tests, demo, benchmarks. Every target but `clean` runs `setup` first,
# which is idempotent (a stamp file records what was installed).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
HOST := .host/ComfyUI
HOST_WHEEL_VERSION := 2.22.2
STAMP := .host/.setup-stamp
PORT ?= 8188
CKPT ?=
IMAGE ?=
QUICK ?=

.PHONY: setup test test-core test-host test-e2e demo bench serve lint clean

setup: $(STAMP)

$(STAMP): Makefile requirements.txt requirements-dev.txt scripts/setup_host.sh
	bash scripts/setup_host.sh "$(PY)" "$(VENV)" "$(HOST)" "$(HOST_WHEEL_VERSION)"
	touch $(STAMP)

test: setup
	$(VPY) -m pytest -q tests

test-core: setup
	$(VPY) -m pytest -q tests -m core

test-host: setup
	$(VPY) -m pytest -q tests -m host

test-e2e: setup
	$(VPY) -m pytest -q tests -m e2e

demo: setup
	$(VPY) -m scripts.demo --ckpt "$(CKPT)" --image "$(IMAGE)" --out demo_out

bench: setup
	$(VPY) -m bench.run $(if $(QUICK),--quick,)

serve: setup
	cd $(HOST) && ../../$(VPY) main.py --cpu --listen 127.0.0.1 --port $(PORT) --disable-auto-launch

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .host .cache demo_out bench/out tests/out
