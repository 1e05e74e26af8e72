# Two commands work on a fresh machine: `make serve` and `make test`.
# Both create .venv when missing and install what they need into it: `serve` only the server and the
# export of the demo model, `test` everything (the tests, the benchmarks) on top.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVE_EXTRAS ?= cpu,export
TEST_EXTRAS ?= cpu,export,bench,test
# One stamp per set of extras; re-install when pyproject.toml changes.
SERVE_STAMP := $(VENV)/.installed-$(SERVE_EXTRAS)
TEST_STAMP := $(VENV)/.installed-$(TEST_EXTRAS)
DEFAULT_MODEL ?= tiny-sd15
MODELS_DIR ?= models
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: setup browser serve test lint format clean

setup: $(TEST_STAMP)

# pip's own progress shows (a first install downloads about a gigabyte, PyTorch for the export most of it).
$(VENV)/.installed-%: pyproject.toml
	@echo "make: installing sdserve[$*] into $(VENV) (the first time takes minutes; pip's progress follows)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e ".[$*]"
	touch $@

$(MODELS_DIR)/$(DEFAULT_MODEL)/model.json: | $(SERVE_STAMP)
	$(BIN)/python -m export $(DEFAULT_MODEL) --output $(MODELS_DIR)/$(DEFAULT_MODEL)

serve: $(SERVE_STAMP) $(MODELS_DIR)/$(DEFAULT_MODEL)/model.json
	$(BIN)/python -m server standalone --models-dir $(MODELS_DIR) --host $(HOST) --port $(PORT) --announce

# A real browser for the playground tests: Debian's chromium, installed when missing and we are root.
# Without it those tests skip and say why; nothing else depends on it.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "make: could not install chromium; the playground browser tests will be skipped"

test: $(TEST_STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

format: $(TEST_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
