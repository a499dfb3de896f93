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

.PHONY: setup test test-core test-host test-e2e test-browser thumbnails demo bench serve batch lint clean

setup: $(STAMP)

$(STAMP): Makefile requirements.txt requirements-dev.txt requirements-batch.txt scripts/setup_host.sh
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

test-browser: setup
	$(VPY) -m pytest -q tests -m browser

thumbnails: setup
	$(VPY) -m scripts.browser thumbnails

demo: setup
	$(VPY) -m scripts.demo --ckpt "$(CKPT)" --image "$(IMAGE)" --out demo_out

bench: setup
	$(VPY) -m bench.run $(if $(QUICK),--quick,)

serve: setup
	cd $(HOST) && ../../$(VPY) main.py --cpu --listen 127.0.0.1 --port $(PORT) --disable-auto-launch

# make batch WORKFLOW=workflows/x.json IMAGES=folder OUT=folder [ARGS="--set 3.steps=100 --workers 4 ..."]:
# runs a UI-format workflow over every image of a folder with Ray (python -m batch --help lists the options).
ifneq ($(filter batch,$(MAKECMDGOALS)),)
BATCH_MISSING := $(strip $(if $(WORKFLOW),,WORKFLOW) $(if $(IMAGES),,IMAGES) $(if $(OUT),,OUT))
ifneq ($(BATCH_MISSING),)
$(error make batch needs $(BATCH_MISSING): make batch WORKFLOW=workflows/<file>.json IMAGES=<folder of images> OUT=<output folder> [ARGS="--set NODE.INPUT=VALUE ..."])
endif
endif

batch: setup
	@$(VPY) -c "import ray" 2>/dev/null || $(VPY) -m pip install -q -r requirements-batch.txt
	$(VPY) -m batch "$(WORKFLOW)" "$(IMAGES)" "$(OUT)" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .host .cache demo_out bench/out tests/out
