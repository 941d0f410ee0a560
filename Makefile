# The README's commands: `make demo` (train a small K2 with MuonClip), `make test`, and
# `make sft-demo` (agentic SFT: synthesise, pretrain, SFT, evaluate as an agent) and `make rl-demo`
# (RL from that SFT checkpoint in the tool worlds).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
TESTDEPS := $(VENV)/.test-installed

.PHONY: demo sft-demo rl-demo test test-fast lint bench clean

# pip --no-compile: byte-compiling every installed file up front (torch alone has thousands)
# costs about 20 s of a fresh setup; Python compiles the modules it imports, once, and caches
# them: the export below keeps that cache on where PYTHONDONTWRITEBYTECODE=1 turned it off (an
# empty value is "unset" to Python). Without it every process of the suite (dozens) recompiles
# jax, torch and transformers from source: 13 CPU-s per process instead of 5.
export PYTHONDONTWRITEBYTECODE :=
$(RUNTIME): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-compile --no-deps -e .
	touch $@

$(TESTDEPS): $(RUNTIME) requirements-test.txt
	$(PY) -m pip install -q --no-compile -r requirements-test.txt
	touch $@

demo: $(RUNTIME)
	$(PY) experiments/train.py --config=experiments/configs/k2_nano.py --workdir=workdirs/k2_nano

SFT := workdirs/sft_demo
sft-demo: $(RUNTIME)
	$(PY) experiments/synthesize.py --out=$(SFT)/data --train=20000 --tokenizer_vocab=2048
	$(PY) experiments/train.py --config=experiments/configs/k2_nano_sft.py:pretrain \
	    --config.data.tokenizer_path=$(SFT)/data/tokenizer --workdir=$(SFT)/pretrain
	$(PY) experiments/train.py --config=experiments/configs/k2_nano_sft.py \
	    --config.init_from=$(SFT)/pretrain --config.data.source=$(SFT)/data/train.jsonl \
	    --workdir=$(SFT)/sft
	$(PY) experiments/agent_eval.py --workdir=$(SFT)/pretrain --workdir=$(SFT)/sft --out=$(SFT)/eval

rl-demo: $(RUNTIME)  # after sft-demo
	$(PY) experiments/rl.py --config=experiments/configs/k2_nano_rl.py \
	    --config.init_from=$(SFT)/sft --config.data.source=$(SFT)/data/train.jsonl \
	    --workdir=workdirs/rl_demo

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
