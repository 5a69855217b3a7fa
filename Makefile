# make run   - the service on :3002 (embedded PostgreSQL unless DATABASE_URL is set)
# make test  - the whole test suite (brings up its own PostgreSQL, S3 and upstream)
# make test-quick - the tests that start no server or process (about a minute), for a change's first feedback
# make lint  - ruff and mypy (CI runs it before the tests)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test test-quick lint init-db api-docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt constraints.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt constraints.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

run: $(VENV)/.runtime
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

init-db: $(VENV)/.runtime
	$(BIN)/flask --app wsgi init-db

# Tests run in TEST_PROCESSES pytest-xdist processes (most of a test's time is waiting on
# a server, not computing), a test module's tests in one process (its servers start once).
TEST_PROCESSES ?= 4
PYTEST := $(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadscope

test: $(VENV)/.dev
	$(PYTEST) $(PYTEST_ARGS)

test-quick: $(VENV)/.dev
	BLOOM_TESTS_QUICK=1 $(PYTEST) -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check bloom tests bench
	$(BIN)/mypy

api-docs: $(VENV)/.runtime
	$(BIN)/python -m bloom.api_reference > docs/API.md

clean:
	rm -rf $(VENV) .pytest_cache
