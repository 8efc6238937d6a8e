# One entry point for developers and CI. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REQS := services/api/requirements.txt services/model/requirements.txt services/model/requirements-cpu.txt requirements-dev.txt
TINY := .cache/tiny-qwen3-vl
# CUDA machines get the registry's CUDA torch; everything else the pinned CPU wheel (never torchvision).
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint format run tiny-model bench gpu-check gpu-wheels up up-cpu down k8s-check clean playground-screenshot

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

$(STAMP): $(REQS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(HAS_CUDA),1)
	$(BIN)/pip install -q torch torchvision
else
	$(BIN)/pip install -q -r services/model/requirements-cpu.txt
endif
	$(BIN)/pip install -q -r services/api/requirements.txt -r services/model/requirements.txt -r requirements-dev.txt
	touch $(STAMP)

# The playground's JS linter (eslint), from the committed lock file into ./node_modules.
NODE_STAMP := node_modules/.installed
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

install: $(STAMP) $(NODE_STAMP) ## create .venv and node_modules, install everything (CPU torch pinned where there is no CUDA)

tiny-model: $(STAMP) ## build the offline tiny Qwen3-VL checkpoint at .cache/tiny-qwen3-vl
	HF_HUB_OFFLINE=1 $(BIN)/python -m services.model.tiny_checkpoint $(TINY)

test: $(STAMP) ## install when needed, then run the whole test suite
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-fast: $(STAMP) ## unit tests only (no real processes)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not integration and not postgres"

lint: $(STAMP) $(NODE_STAMP) ## ruff lint + format check, eslint on the playground's JS
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	node_modules/.bin/eslint --max-warnings 0 services/api/playground eslint.config.js

format: $(STAMP) ## apply ruff format and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

run: $(STAMP) ## start model + api (gunicorn) + nginx edge on loopback, in the foreground (SQLite by default)
	$(BIN)/python -m deploy.local.run

bench: $(STAMP) ## benchmark: raw engine vs full stack vs transformers serve (writes bench/results/)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench

# The GPU check runs where a bare python3 has torch, torchvision and transformers (the lent GPU machines) or in
# .venv; when that python lacks the service's packages, the wheels in .whl/ (make gpu-wheels, on a machine with
# network) are installed into GPU_SITE first.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_SITE ?= /tmp/gpu-check-site
GPU_OUT ?= bench/results/gpu-check.md
GPU_CHECK_ARGS ?=

gpu-check: ## GPU readiness: Qwen3-VL-2B's architecture (random weights) on CUDA; report in GPU_OUT (< 8 min)
	@if ! $(GPU_PY) -c "import fastapi, uvicorn, pydantic_settings, av" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then \
	  echo "installing .whl/*.whl into $(GPU_SITE)"; \
	  $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	    --target $(GPU_SITE) .whl/*.whl || exit 1; \
	  export PYTHONPATH=$(GPU_SITE); \
	fi; \
	HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $(GPU_PY) -m bench.gpu --out $(GPU_OUT) $(GPU_CHECK_ARGS)

gpu-wheels: $(STAMP) ## download the wheels a bare GPU machine lacks (cp312 manylinux x86_64) into .whl/
	$(BIN)/python -m bench.gpu.wheels --dest .whl

COMPOSE := docker compose --env-file $(if $(wildcard .env),.env,.env.example) -f deploy/docker/compose.yaml

up: ## docker compose up on a GPU box (nginx, api, model, postgres, prometheus, grafana)
	$(COMPOSE) up -d --build

up-cpu: ## docker compose up without a GPU (CPU override)
	$(COMPOSE) -f deploy/docker/compose.cpu.yaml up -d --build

down: ## docker compose down (volumes kept)
	POSTGRES_PASSWORD=$${POSTGRES_PASSWORD:-unused-by-down} GRAFANA_ADMIN_PASSWORD=$${GRAFANA_ADMIN_PASSWORD:-unused-by-down} \
	  $(COMPOSE) -f deploy/docker/compose.cpu.yaml down

k8s-check: $(STAMP) ## render the kustomize base and validate it strictly, offline
	$(BIN)/kubectl kustomize deploy/k8s | $(BIN)/kubernetes-validate --strict -k 1.30.0 -

playground-screenshot: $(STAMP) ## regenerate docs/playground.png (the browser test's mid-stream screenshot)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/browser/test_playground.py -k image_prompt
	mkdir -p docs
	cp tmp/playground/playground.png docs/playground.png

clean: ## remove caches and build outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache tmp bench/results/*.json bench/results/*.png
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
