# Two commands on a fresh machine (Python 3.10+, no GPU needed):
#
#   make demo   install protperf into .venv, then run it end to end on real proteins
#               (scripts/demo.sh: prepare-data, train, evaluate, embed, generate; outputs in demo/)
#   make test   install protperf into .venv, then run the test suite (the README's command,
#               the same steps as .ci/run)
#
# Overridable: make demo PYTHON=python3.12 VENV=/tmp/protperf-venv

PYTHON ?= python3
VENV ?= .venv
# torch goes in first, as the CPU wheel (pip's find-links has it on local disk): protperf's torch
# range is then already met and pip never fetches a CUDA build. Never a bare `torch` requirement.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,bench,hf

BIN := $(VENV)/bin
# Written after a complete install; pyproject.toml changing (new dependencies) redoes it. The
# install is editable, so code changes need nothing.
INSTALLED := $(VENV)/.protperf-installed

.PHONY: demo test install lint clean-demo

demo: install
	. $(BIN)/activate && bash scripts/demo.sh

test: install
	. $(BIN)/activate && python -m pytest -q

install: $(INSTALLED)

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

lint: install
	. $(BIN)/activate && ruff check protperf tests benchmarks && ruff format --check protperf tests benchmarks

clean-demo:
	rm -rf demo
