# The two commands a user runs first: `make demo` and `make test`.
# Each creates .venv on a fresh machine and installs with constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
DOCS_STAMP := $(VENV)/.installed-docs
PIP := $(PY) -m pip install --quiet -c constraints.txt
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-torch lint format bench bench-all install clean docs docs-serve

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[zoo,dev]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PIP) -e '.[zoo,dev,bench]'
	touch $(BENCH_STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PIP) -e '.[zoo,dev,docs]'
	touch $(DOCS_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/equilibria demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The suite against another torch release, in its own venv (no constraints.txt: it pins torch;
# a CUDA build of an older torch is several GB): make test-torch TORCH=2.4.1
TORCH ?= 2.4.1
test-torch:
	$(PYTHON) -m venv .venv-torch-$(TORCH)
	.venv-torch-$(TORCH)/bin/python -m pip install --quiet torch==$(TORCH) 'numpy<2' -e '.[zoo,dev]'
	.venv-torch-$(TORCH)/bin/python -m pytest -q $(PYTEST_ARGS)

# The documentation site (mkdocs-material + mkdocstrings) into site/; --strict: a broken link,
# reference or missing page fails the build. Its examples run in `make test` (tests/test_docs.py).
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(BENCH_STAMP)
	$(PY) benchmarks/solvers.py

bench-all: bench
	$(PY) benchmarks/compaction.py
	$(PY) benchmarks/stabilisers.py
	$(PY) benchmarks/hamburger.py
	$(PY) benchmarks/hamburger_profile.py
	$(PY) benchmarks/anderson_cost.py
	$(PY) benchmarks/broyden_scales.py
	$(PY) benchmarks/scales.py
	$(PY) benchmarks/porting.py
	$(PY) benchmarks/flow.py
	$(PY) benchmarks/colorize.py
	$(PY) benchmarks/prelax.py
	$(PY) benchmarks/denoise.py --color
	$(PY) benchmarks/denoise_tools.py --sweep
	$(PY) benchmarks/hamburger_jfb.py --runs $(wildcard runs/mosaic-jfb/runs/*)
	$(PY) benchmarks/inversion.py
	$(PY) benchmarks/sampling.py

clean:
	rm -rf $(VENV) .venv-torch-* build site *.egg-info .pytest_cache .ruff_cache
