# Two entry points, each doing all of its own set-up on a fresh Debian 12 machine (root):
#   make demo   the main job: a VM on the built-in test bed
#   make test   lint, types and the test suite
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: setup host-packages image demo test lint clean

setup: host-packages $(VENV)/.installed image

host-packages:
	@tools/setup-host.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

image: host-packages $(VENV)/.installed
	$(BIN)/livemig image build

demo: setup
	$(BIN)/livemig demo

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build guest/src/build
