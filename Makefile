# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
AREAS  := core hypervisors transports targets bacula metrics
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck dev clean

$(STAMP): requirements-dev.txt $(foreach a,$(AREAS),$(a)/pyproject.toml) examples/ahvbackup-example-target/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (ahvbackup needs Python 3.11+; set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q $(foreach a,$(AREAS),-e ./$(a)) -r requirements-dev.txt
	$(PY) -m pip install -q -e ./examples/ahvbackup-example-target
	touch $@

dev: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ahvbackup demo

# two workers: the suite mostly waits on real peers (daemons, sockets), so it halves on 2 cores
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy core/src

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
