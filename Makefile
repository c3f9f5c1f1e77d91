# finetune-operator. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/.cluster/bin:$(PATH)
export KUBECONFIG ?= $(CURDIR)/.cluster/kubeconfig

.PHONY: help venv test test-unit
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## create .venv with the project and its trainer and dev extras

$(VENV)/.installed: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	@touch $@

test: venv ## run every test tier (unit, control plane, end to end)
	bash scripts/test.sh

test-unit: venv ## run the unit tests only (no cluster)
	$(PY) -m pytest tests -m "not cluster and not e2e"

include $(wildcard mk/*.mk)
