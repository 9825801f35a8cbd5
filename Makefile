# rapido: every target creates .venv when missing. torch is pinned to 2.13.0: on these
# machines pip takes the CPU build from local disk, an unpinned torch pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
ARGS ?=

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m rapido serve $(ARGS)

# System tools some tests run (nginx, chromium, ...): installed when root and missing,
# otherwise those tests skip and say which package they need.
test: $(STAMP)
	@bash scripts/install-test-deps.sh || echo "test tools: install failed; the tests that need them will skip"
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check rapido tests
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m rapido bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
