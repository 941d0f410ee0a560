"""Timing helpers: median wall time of a jitted call and this machine's matmul peak (cached)."""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def time_fn(fn: Callable, *args, reps: int = 5) -> float:
  """Median seconds of `fn(*args)` over `reps` calls after one warm-up (blocks until ready)."""
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps}")
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak_flops(dtype=jnp.bfloat16, n: int = 2048, reps: int = 5) -> float:
  """Measured FLOP/s of an [n, n] @ [n, n] matmul in `dtype` accumulating in float32."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  ka, kb = jax.random.split(jax.random.key(0))
  a_NN = jax.random.normal(ka, (n, n), dtype)
  b_NN = jax.random.normal(kb, (n, n), dtype)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2.0 * n**3 / time_fn(matmul, a_NN, b_NN, reps=reps)


def cached_matmul_peak_flops(dtype=jnp.bfloat16) -> float:
  """`matmul_peak_flops(dtype)` measured once per machine (backend, device kind, core count) and
  kept in $K2JAX_CACHE_DIR (default ~/.cache/k2jax)/matmul_peak.json: what train logs MFU against,
  without a benchmark at every start."""
  device = jax.devices()[0]
  key = f"{device.platform}:{device.device_kind}:{os.cpu_count()}:{jnp.dtype(dtype).name}"
  path = pathlib.Path(os.environ.get("K2JAX_CACHE_DIR", pathlib.Path.home() / ".cache" / "k2jax"))
  path = path / "matmul_peak.json"
  try:
    cache = json.loads(path.read_text())
  except (OSError, ValueError):
    cache = {}
  if not isinstance(cache.get(key), float):
    cache[key] = matmul_peak_flops(dtype)
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(f".tmp{os.getpid()}")
      tmp.write_text(json.dumps(cache, indent=1))
      tmp.replace(path)
    except OSError:  # a read-only home still trains.
      pass
  return cache[key]
