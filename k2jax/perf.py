"""Timing helpers: median wall time of a jitted call and this machine's matmul peak."""

from __future__ import annotations

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
