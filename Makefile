# The README's two commands: `make demo` (train a small K2 with MuonClip) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
TESTDEPS := $(VENV)/.test-installed

.PHONY: demo test test-fast lint bench clean

$(RUNTIME): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(TESTDEPS): $(RUNTIME) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

demo: $(RUNTIME)
	$(PY) experiments/train.py --config=experiments/configs/k2_nano.py --workdir=workdirs/k2_nano

test: $(TESTDEPS)
	$(VENV)/bin/ruff check k2jax tests experiments benchmarks
	$(PY) -m pytest -q -n 2 --dist loadscope tests

test-fast: $(TESTDEPS)  # the inner loop: everything but the `slow` cross-checks
	$(PY) -m pytest -q -n 2 --dist loadscope -m "not slow" tests

lint: $(TESTDEPS)
	$(VENV)/bin/ruff check k2jax tests experiments benchmarks

bench: $(TESTDEPS)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) workdirs
