"""Newton-Schulz: parity with a float64 numpy iteration, singular values, batching, FLOPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.optim.newton_schulz import NS_COEFFS, newton_schulz, newton_schulz_flops

SHAPES = [(32, 96), (96, 32), (64, 64)]


def ns_numpy(x, steps=5, coeffs=NS_COEFFS, eps=1e-7):
  """The reference iteration in float64 (Keller Jordan's Muon)."""
  x = np.asarray(x, np.float64)
  tall = x.shape[0] > x.shape[1]
  x = x.T if tall else x
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = coeffs
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def full_rank(shape, seed, lo=0.05):
  """Random matrix with random singular vectors and singular values uniform in [lo, 1]."""
  rng = np.random.default_rng(seed)
  m, n = shape
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((n, k)))[0]
  return ((u * rng.uniform(lo, 1.0, k)) @ v.T).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_float64_reference(shape):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3.0
  got = np.asarray(newton_schulz(jnp.asarray(x), dtype=jnp.float32))
  want = ns_numpy(x)
  assert got.shape == shape and got.dtype == np.float32
  assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_singular_values_near_one(shape, dtype):
  x = full_rank(shape, seed=1)
  sv = np.linalg.svd(np.asarray(newton_schulz(jnp.asarray(x), dtype=dtype)), compute_uv=False)
  assert sv.min() >= 0.6 and sv.max() <= 1.25, (sv.min(), sv.max())


def test_bfloat16_close_to_float32():
  x = full_rank((48, 80), seed=2)
  lo = np.asarray(newton_schulz(jnp.asarray(x), dtype=jnp.bfloat16))
  hi = np.asarray(newton_schulz(jnp.asarray(x), dtype=jnp.float32))
  assert np.linalg.norm(lo - hi) / np.linalg.norm(hi) < 0.05


def test_leading_axes_are_a_batch():
  x = np.random.default_rng(3).standard_normal((2, 3, 24, 40)).astype(np.float32)
  x[1, 2] *= 1e3  # each slice is normalised on its own
  got = np.asarray(newton_schulz(jnp.asarray(x), dtype=jnp.float32))
  for i in range(2):
    for j in range(3):
      want = ns_numpy(x[i, j])
      assert np.linalg.norm(got[i, j] - want) / np.linalg.norm(want) <= 1e-5


def test_scale_invariant_and_zero_safe():
  x = full_rank((16, 24), seed=4)
  one = np.asarray(newton_schulz(jnp.asarray(x), dtype=jnp.float32))
  big = np.asarray(newton_schulz(jnp.asarray(x * 1e4), dtype=jnp.float32))
  np.testing.assert_allclose(big, one, rtol=0, atol=1e-5)
  zero = np.asarray(newton_schulz(jnp.zeros((8, 4)), dtype=jnp.float32))
  assert np.all(zero == 0)


def test_flops_formula():
  # rows <= cols after transposing: m=32, n=96; per step 2*(2*m*m*n + m^3).
  assert newton_schulz_flops((96, 32)) == 5 * 2 * (2 * 32 * 32 * 96 + 32**3)
  assert newton_schulz_flops((4, 96, 32), steps=3) == 4 * 3 * 2 * (2 * 32 * 32 * 96 + 32**3)


def test_bad_input():
  with pytest.raises(ValueError, match="matrix"):
    newton_schulz(jnp.ones(5))
  with pytest.raises(ValueError, match="coeffs"):
    newton_schulz(jnp.ones((2, 2)), coeffs=(1.0, 2.0))


@pytest.mark.parametrize("batch_size", [None, 16])
def test_orthogonalize_batched_equals_newton_schulz_per_leaf(batch_size):
  """Leaves of one matrix shape (a tall one transposed) run as one batch, in lax.map batches
  (CPU's default CPU_NS_BATCH, or 16) with a remainder: each leaf's result is its own
  newton_schulz."""
  from k2jax.optim.muon import CPU_NS_BATCH, orthogonalize_batched
  rng = np.random.default_rng(5)
  leaves = [jnp.asarray(rng.standard_normal(s), jnp.float32)
            for s in [(5, 14, 16, 24), (3, 24, 16), (8, 8)]]
  assert (5 * 14 + 3) % 16 and 5 * 14 + 3 > 2 * CPU_NS_BATCH
  ns = functools.partial(newton_schulz, dtype=jnp.float32)
  got = jax.jit(functools.partial(orthogonalize_batched, batch_size=batch_size,
                                  dtype=jnp.float32))(leaves)
  want = [ns(leaves[0]), jnp.swapaxes(ns(jnp.swapaxes(leaves[1], 1, 2)), 1, 2), ns(leaves[2])]
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
