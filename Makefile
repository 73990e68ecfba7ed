# regcache — every target creates the virtual environment first if there is none.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= vits_reg
DATA   ?=
ARGS   ?=

.PHONY: help venv test extract bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed  ## create .venv and install regcache with its test tools

test: venv  ## run the test suite
	$(BIN)/python -m pytest -q -n 2 --durations=10

extract: venv  ## make extract MODEL=vitl_reg DATA=manifests/NAME.yaml [ARGS='--precision bf16 ...']
	@test -n "$(DATA)" || { echo "usage: make extract MODEL=vitl_reg DATA=manifests/NAME.yaml"; exit 2; }
	$(BIN)/regcache extract --model $(MODEL) --data $(DATA) $(ARGS)

bench: venv  ## extraction benchmark (see BENCHMARKS.md)
	$(BIN)/python bench/extract.py $(ARGS)

clean:  ## remove the virtual environment and caches of the tools
	rm -rf $(VENV) .pytest_cache .hypothesis
