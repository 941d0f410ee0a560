"""Shared test setup, set before jax is imported: 8 simulated CPU devices, the CPU backend, fast
compiles, and one persistent compilation cache for the whole run (its workers and the
subprocesses they start inherit the directory, so a program compiled once loads everywhere
after)."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

# The suite compiles hundreds of small programs and runs each briefly: LLVM without its costly
# optimisations halves the suite's CPU time, and XLA:CPU's classic fusion emitters instead of its
# MLIR ones halve a train step's compile again (7.8 -> 3.3 CPU-s for test_mtp's). Numerics are
# XLA's either way; subprocesses that choose their own device count keep these flags (`xla_flags`).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int | None = 8) -> str:
  """XLA_FLAGS for a test process: `devices` simulated CPU devices (None: the default one)."""
  count = "" if devices is None else f"--xla_force_host_platform_device_count={devices} "
  return count + FAST_COMPILE


os.environ.setdefault("XLA_FLAGS", xla_flags())
# With libtpu installed (k2jax.aot's tests) jax would look for a TPU first; tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process of the run owns it.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="k2jax-test-jax-cache-")
  os.environ["K2JAX_CACHE_DIR"] = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the matmul peak.
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """Forty small generated Python files: regular enough that a tiny model learns fast."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for i in range(40):
    lines = [f"def f_{i}_{j}(x):\n    return x * {rng.integers(10)} + {j}\n" for j in range(30)]
    (root / f"mod_{i}.py").write_text("".join(lines))
  return str(root)


@pytest.fixture(scope="session")
def tok():
  """A K2-format BPE (1024 ids) trained on expert conversations of the tool worlds: the agent
  loop's and RL's tests' tokenizer (tests/test_chat.py has its own)."""
  from k2jax import agentic, chat, data  # after the environment above is set.
  tasks = agentic.make_tasks("train", 200, seed=3)
  texts = [chat.render(agentic.expert_messages(t), list(t.tools)) for t in tasks]
  return data.train_bpe(texts, 1024)


# The modules that take longest, longest first: `make test` hands whole modules to its two
# workers in collection order (`--dist loadscope`), so these go first and the workers finish
# together instead of one waiting on the other's last long module.
LONGEST_FIRST = ("test_aot.py", "test_train.py", "test_mtp.py", "test_sharding_train.py",
                 "test_decode.py", "test_sft.py", "test_model.py", "test_notebooks.py",
                 "test_train_step.py", "test_sweep.py", "test_rl.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in order.
