"""Newton-Schulz orthogonalisation of batches of matrices (Keller Jordan's Muon, Moonlight).

The last two axes of the input are the matrix; any leading axes (scanned layers, experts) are a
batch, each slice orthogonalised on its own. The iteration runs in `dtype` with float32
accumulation, as the bfloat16 references do on accelerators; float32 runs at full precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _matmul(x_BMK: jax.Array, y_BKN: jax.Array, dtype) -> jax.Array:
  """Batched x @ y with inputs cast to `dtype`, accumulated and returned in float32."""
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jnp.matmul(x_BMK.astype(dtype), y_BKN.astype(dtype), precision=precision,
                    preferred_element_type=jnp.float32)


def newton_schulz(x: jax.Array, *, steps: int = 5, coeffs=NS_COEFFS, dtype=jnp.bfloat16,
                  eps: float = 1e-7) -> jax.Array:
  """Approximate U V^T of each matrix x[..., M, N] = U S V^T; returns float32 of x's shape.

  X = x / (||x||_F + eps), transposed so rows <= cols, then `steps` times
  X = a X + (b A + c A A) X with A = X X^T. Matmul inputs are `dtype`, accumulation float32.
  """
  if x.ndim < 2:
    raise ValueError(f"newton_schulz needs a matrix (ndim >= 2), got shape {x.shape}")
  if steps < 0:
    raise ValueError(f"newton_schulz steps must be >= 0, got {steps}")
  if len(coeffs) != 3:
    raise ValueError(f"newton_schulz coeffs must be (a, b, c), got {coeffs!r}")
  dtype = jnp.dtype(dtype)
  a, b, c = coeffs
  tall = x.shape[-2] > x.shape[-1]
  x_BMN = jnp.swapaxes(x, -1, -2) if tall else x
  x_BMN = x_BMN.astype(jnp.float32)
  norm_B11 = jnp.sqrt(jnp.sum(jnp.square(x_BMN), axis=(-2, -1), keepdims=True))
  x_BMN = (x_BMN / (norm_B11 + eps)).astype(dtype)
  for _ in range(steps):
    a_BMM = _matmul(x_BMN, jnp.swapaxes(x_BMN, -1, -2), dtype)
    b_BMM = b * a_BMM + c * _matmul(a_BMM, a_BMM, dtype)
    x_BMN = (a * x_BMN.astype(jnp.float32) + _matmul(b_BMM, x_BMN, dtype)).astype(dtype)
  x_BMN = x_BMN.astype(jnp.float32)
  return jnp.swapaxes(x_BMN, -1, -2) if tall else x_BMN


def newton_schulz_flops(shape: tuple[int, ...], steps: int = 5) -> int:
  """Matmul FLOPs of `newton_schulz` on an array of `shape` (2 per multiply-add)."""
  if len(shape) < 2:
    raise ValueError(f"newton_schulz_flops needs a matrix shape, got {shape}")
  m, n = sorted(shape[-2:])
  batch = 1
  for d in shape[:-2]:
    batch *= d
  # X X^T: m*m*n; A A: m*m*m; B X: m*m*n.
  return batch * steps * 2 * (2 * m * m * n + m * m * m)
