# Retrace: set-up, tests, demo, benchmarks. Every target but `clean` builds its test host first (idempotent: a
# stamp file records what was installed).
#
# Test hosts live in .host/<name>/ (ComfyUI/ and its own venv/). HOST picks one: 0.33.0 (the newest, the default),
# 0.3.75 (the oldest supported), path:/a/ComfyUI or git:<commit> (scripts/setup_host.sh). `make test` without HOST
# runs the full suite on the newest host and the core, host and end-to-end layers on the oldest.
SHELL := /bin/bash
PY ?= python3
NEWEST_HOST := 0.33.0
OLDEST_HOST := 0.3.75
HOST ?=
PORT ?= 8188
CKPT ?=
IMAGE ?=
SOURCE ?=
TARGET ?=
QUICK ?=

host_name = $(if $(findstring :,$(1)),custom-$(shell printf '%s' '$(1)' | sha1sum | cut -c1-12),$(1))
SPEC := $(or $(HOST),$(NEWEST_HOST))
NAME := $(call host_name,$(SPEC))
VENV := .host/$(NAME)/venv
VPY := $(VENV)/bin/python
HOSTDIR := .host/$(NAME)/ComfyUI
SETUP_INPUTS := Makefile requirements.txt requirements-dev.txt requirements-batch.txt scripts/setup_host.sh
# ensure_host SPEC NAME: build .host/NAME unless its stamp is newer than what it was built from.
ensure_host = stamp=.host/$(2)/.setup-stamp; \
	if [[ ! -f $$stamp || -n "$$(find $(SETUP_INPUTS) -newer $$stamp)" ]]; then \
	  bash scripts/setup_host.sh "$(PY)" "$(1)" ".host/$(2)" && touch $$stamp; \
	else true; fi
# The newest host's venv is also .venv (README's commands use it).
link_venv = if [[ "$(1)" == "$(NEWEST_HOST)" ]]; then ln -sfn .host/$(NEWEST_HOST)/venv .venv; fi

.PHONY: setup test test-core test-host test-e2e test-browser thumbnails demo bench serve batch lint clean

setup:
	@$(call ensure_host,$(SPEC),$(NAME))
	@$(call link_venv,$(SPEC))

# One line per host at the end, with its per-layer counts; a host the set-up cannot obtain is reported, and fails.
test:
ifeq ($(HOST),)
	@bash scripts/test_hosts.sh "$(PY)" "$(NEWEST_HOST)=all" "$(OLDEST_HOST)=core or host or e2e"
else
	@bash scripts/test_hosts.sh "$(PY)" "$(HOST)=all"
endif

test-core: setup
	RETRACE_HOST=$(HOSTDIR) $(VPY) -m pytest -q tests -m core

test-host: setup
	RETRACE_HOST=$(HOSTDIR) $(VPY) -m pytest -q tests -m host

test-e2e: setup
	RETRACE_HOST=$(HOSTDIR) $(VPY) -m pytest -q tests -m e2e

test-browser: setup
	RETRACE_HOST=$(HOSTDIR) $(VPY) -m pytest -q tests -m browser

thumbnails: setup
	RETRACE_HOST=$(HOSTDIR) $(VPY) -m scripts.browser thumbnails

demo: setup
	RETRACE_HOST=$(HOSTDIR) $(VPY) -m scripts.demo --ckpt "$(CKPT)" --image "$(IMAGE)" --source "$(SOURCE)" \
	  --target "$(TARGET)" --out demo_out

bench: setup
	RETRACE_HOST=$(HOSTDIR) $(VPY) -m bench.run $(if $(QUICK),--quick,)

serve: setup
	cd $(HOSTDIR) && ../venv/bin/python main.py --cpu --listen 127.0.0.1 --port $(PORT) --disable-auto-launch

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
	RETRACE_HOST=$(HOSTDIR) $(VPY) -m batch "$(WORKFLOW)" "$(IMAGES)" "$(OUT)" $(ARGS)

# ruff with the host's rule set, and comfy-import-guard against both hosts (the pack stays inside their comfy.*).
lint: setup
	$(VENV)/bin/ruff check .
	@$(call ensure_host,$(OLDEST_HOST),$(OLDEST_HOST))
	bash scripts/import_guard.sh $(VPY) $(HOSTDIR)
	bash scripts/import_guard.sh .host/$(OLDEST_HOST)/venv/bin/python .host/$(OLDEST_HOST)/ComfyUI

clean:
	rm -rf .venv .host .cache demo_out bench/out tests/out
