# Every target bootstraps .venv itself; the stamp is refreshed when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/ganglion/v1/*.proto)

.DEFAULT_GOAL := help
.PHONY: help demo test protos lint typecheck bench clean train

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP) ## run the whole loop: NATS, sensing, decision, controller, 2 executors, 60 jobs
	$(BIN)/ganglion demo $(ARGS)

test: $(STAMP) ## lint, typecheck and the test suite
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest $(ARGS)

protos: $(STAMP) ## regenerate Python stubs and .pyi from protos/
	$(BIN)/python -m ganglion.protogen

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict on libs and services
	$(BIN)/mypy

bench: $(STAMP) ## benchmarks (ratios against baselines measured in the same run)
	$(BIN)/python -m tools.bench $(ARGS)

train: $(STAMP) ## train the default RL policy (PPO, Philly Sep-Oct; ~20 min) and rebuild the shipped model
	$(BIN)/ganglion train --algo ppo --seed 1 --total-steps 60000 --time-budget-s 1200 \
		--models-dir libs/ganglion/rl/default_model --version 1 --force $(ARGS)

clean: ## remove the venv and caches
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
