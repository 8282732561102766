# nodegraph: the two commands a fresh machine needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run serve demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

demo: install
	$(BIN)/nodegraph demo --if-no-checkpoint

# The main job: serve the canvas on the demo model (writes the demo model first if no checkpoint exists).
run: install demo
	$(BIN)/nodegraph serve

test: install
	$(BIN)/ruff check nodegraph nodes tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The loop while editing: everything but the browser (e2e) and whole-workflow parity tiers and the
# slow tests (tests/conftest.py: SLOW_FIXTURES, SLOW).
test-fast: install
	$(BIN)/ruff check nodegraph nodes tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not e2e and not parity and not slow"

lint: install
	$(BIN)/ruff check nodegraph nodes tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
