# Two commands work on a fresh machine: `make serve` and `make test`.
# Both create .venv when missing and install what they need into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,export,bench,test
# Re-install when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(EXTRAS)
DEFAULT_MODEL ?= tiny-sd15
MODELS_DIR ?= models
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: setup browser serve test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

$(MODELS_DIR)/$(DEFAULT_MODEL)/model.json: | $(STAMP)
	$(BIN)/python -m export $(DEFAULT_MODEL) --output $(MODELS_DIR)/$(DEFAULT_MODEL)

serve: $(STAMP) $(MODELS_DIR)/$(DEFAULT_MODEL)/model.json
	$(BIN)/python -m server standalone --models-dir $(MODELS_DIR) --host $(HOST) --port $(PORT) --announce

# A real browser for the playground tests: Debian's chromium, installed when missing and we are root.
# Without it those tests skip and say why; nothing else depends on it.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "make: could not install chromium; the playground browser tests will be skipped"

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
