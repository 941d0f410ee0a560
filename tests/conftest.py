"""Shared test setup: 8 simulated CPU devices, the CPU backend (set before jax is imported)."""

import os

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With libtpu installed (k2jax.aot's tests) jax would look for a TPU first; tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """Forty small generated Python files: regular enough that a tiny model learns fast."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for i in range(40):
    lines = [f"def f_{i}_{j}(x):\n    return x * {rng.integers(10)} + {j}\n" for j in range(30)]
    (root / f"mod_{i}.py").write_text("".join(lines))
  return str(root)
