# make run   - the service on :3002 (embedded PostgreSQL unless DATABASE_URL is set)
# make test  - the whole test suite (brings up its own PostgreSQL, S3 and upstream)
# make test-quick - the in-process tests only, for a change's first feedback
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

test: $(VENV)/.dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: $(VENV)/.dev
	BLOOM_TESTS_QUICK=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check bloom tests bench
	$(BIN)/mypy

api-docs: $(VENV)/.runtime
	$(BIN)/python -m bloom.api_reference > docs/API.md

clean:
	rm -rf $(VENV) .pytest_cache
