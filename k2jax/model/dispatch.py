"""Routed-expert dispatch: y[t] = sum_k w[t, k] * SwiGLU_{idx[t, k]}(x[t]).

All paths share one picture. The T*K (token, expert) assignments are sorted by expert (stable,
so token order within an expert); each expert's assignments get a segment of rows in a buffer;
`src_R` says which assignment feeds each row, `dest_A` where each assignment's output lands. Rows
are gathered from x, pushed through their expert's SwiGLU, and combined back per token.

- "sort": dropless. Segments padded to multiples of `block_size`; each block of rows is one
  batched matmul with its expert's weights (gathered per block).
- "capacity": every expert gets `C = ceil(capacity_factor * T*K / E)` rows; assignments beyond
  (in token order) are dropped. One batched einsum over [E, C, D].
- "ragged": unpadded segments through `jax.lax.ragged_dot` (GPU/TPU; dense on CPU).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from k2jax.model.layers import matmul

DISPATCHES = ("sort", "capacity", "ragged")


class _Sorted(NamedTuple):
  """Assignments (a = t*K + k) sorted by expert; `rank_S` counts within each expert."""

  order_S: jnp.ndarray  # assignment id of each sorted slot
  expert_S: jnp.ndarray
  rank_S: jnp.ndarray
  counts_E: jnp.ndarray


class _Layout(NamedTuple):
  """Rows of the expert buffer: which assignment feeds each row, where each assignment lands."""

  src_R: jnp.ndarray  # assignment id per row; A marks an empty row
  dest_A: jnp.ndarray  # row per assignment; R marks a dropped assignment


def _sort(idx_TK: jnp.ndarray, num_experts: int) -> _Sorted:
  expert_A = idx_TK.reshape(-1)
  order_S = jnp.argsort(expert_A, stable=True)
  expert_S = expert_A[order_S]
  counts_E = jnp.bincount(expert_A, length=num_experts)
  start_E = jnp.cumsum(counts_E) - counts_E
  rank_S = jnp.arange(expert_A.shape[0]) - start_E[expert_S]
  return _Sorted(order_S, expert_S, rank_S, counts_E)


def _layout(s: _Sorted, seg_start_E: jnp.ndarray, num_rows: int, keep_S=None) -> _Layout:
  """Sorted slot i goes to row seg_start[expert] + rank, unless `keep_S` drops it."""
  num_assign = s.order_S.shape[0]
  dest_S = seg_start_E[s.expert_S] + s.rank_S
  if keep_S is not None:
    dest_S = jnp.where(keep_S, dest_S, num_rows)
  src_R = jnp.full((num_rows,), num_assign, jnp.int32).at[dest_S].set(
      s.order_S.astype(jnp.int32), mode="drop")
  dest_A = jnp.zeros((num_assign,), jnp.int32).at[s.order_S].set(dest_S.astype(jnp.int32))
  return _Layout(src_R, dest_A)


def _gather_rows(x_TD: jnp.ndarray, src_R: jnp.ndarray, k: int) -> jnp.ndarray:
  """Row r holds x of the token of assignment src_R[r]; empty rows are zero."""
  return jnp.take(x_TD, src_R // k, axis=0, mode="fill", fill_value=0)


def _combine(y_RD: jnp.ndarray, dest_A: jnp.ndarray, w_TK: jnp.ndarray) -> jnp.ndarray:
  """y[t] = sum_k w[t, k] * row dest[t*K + k] (dropped assignments add zero)."""
  T, K = w_TK.shape
  y_TKD = jnp.take(y_RD, dest_A, axis=0, mode="fill", fill_value=0).reshape(T, K, -1)
  return jnp.einsum("tkd,tk->td", y_TKD, w_TK.astype(jnp.float32))


def _swiglu(x_GMD, wg_GDF, wu_GDF, wd_GFD, dtype) -> jnp.ndarray:
  """Per-group SwiGLU: group g's rows through group g's weights, float32 out."""
  h_GMF = (jax.nn.silu(matmul("gmd,gdf->gmf", x_GMD, wg_GDF, dtype))
           * matmul("gmd,gdf->gmf", x_GMD, wu_GDF, dtype))
  return matmul("gmf,gfd->gmd", h_GMF, wd_GFD, dtype)


def _sort_ffn(x_TD, s: _Sorted, wg_EDF, wu_EDF, wd_EFD, block_size, dtype):
  """Dropless: segments padded to whole blocks, one expert per block."""
  E, D, _ = wg_EDF.shape
  num_assign = s.order_S.shape[0]
  num_blocks = -(-num_assign // block_size) + E
  padded_E = -(-s.counts_E // block_size) * block_size
  end_E = jnp.cumsum(padded_E)
  lay = _layout(s, end_E - padded_E, num_blocks * block_size)
  block_start_G = jnp.arange(num_blocks) * block_size
  expert_G = jnp.minimum(jnp.searchsorted(end_E, block_start_G, side="right"), E - 1)
  x_GMD = _gather_rows(x_TD, lay.src_R, num_assign // x_TD.shape[0]).reshape(
      num_blocks, block_size, D)
  cast = lambda w: w.astype(dtype)[expert_G]
  y_GMD = _swiglu(x_GMD, cast(wg_EDF), cast(wu_EDF), cast(wd_EFD), dtype)
  return y_GMD.reshape(-1, D), lay.dest_A


def _capacity_ffn(x_TD, s: _Sorted, wg_EDF, wu_EDF, wd_EFD, capacity, dtype):
  """Each expert takes its first `capacity` assignments in token order."""
  E, D, _ = wg_EDF.shape
  keep_S = s.rank_S < capacity
  lay = _layout(s, jnp.arange(E) * capacity, E * capacity, keep_S)
  k = s.order_S.shape[0] // x_TD.shape[0]
  x_ECD = _gather_rows(x_TD, lay.src_R, k).reshape(E, capacity, D)
  y_ECD = _swiglu(x_ECD, wg_EDF, wu_EDF, wd_EFD, dtype)
  dropped = jnp.sum(~keep_S).astype(jnp.float32) / keep_S.shape[0]
  return y_ECD.reshape(-1, D), lay.dest_A, dropped


def _ragged_ffn(x_TD, s: _Sorted, wg_EDF, wu_EDF, wd_EFD, dtype):
  """Unpadded sorted rows, grouped matmuls over the experts' segments."""
  num_assign = s.order_S.shape[0]
  lay = _layout(s, jnp.cumsum(s.counts_E) - s.counts_E, num_assign)
  x_AD = _gather_rows(x_TD, lay.src_R, num_assign // x_TD.shape[0]).astype(dtype)
  gs = s.counts_E.astype(jnp.int32)
  rdot = lambda a, w: jax.lax.ragged_dot(a.astype(dtype), w.astype(dtype), gs,
                                         preferred_element_type=jnp.float32)
  h_AF = jax.nn.silu(rdot(x_AD, wg_EDF)) * rdot(x_AD, wu_EDF)
  return rdot(h_AF, wd_EFD), lay.dest_A


def routed_experts(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, *, dispatch: str,
                   capacity_factor: float = 1.25, block_size: int = 64, dtype=jnp.float32):
  """Weighted SwiGLU experts per token; returns (y_TD float32, dropped_frac f32 scalar).

  gate/up [E, D, F], down [E, F, D]; matmuls in `dtype`, accumulated in float32.
  """
  T, D = x_TD.shape
  E, _, F = wg_EDF.shape
  if dispatch not in DISPATCHES:
    raise ValueError(f"moe_dispatch must be one of {DISPATCHES}, got {dispatch!r}")
  if idx_TK.shape != w_TK.shape or idx_TK.shape[0] != T:
    raise ValueError(f"idx_TK {idx_TK.shape} and w_TK {w_TK.shape} must both be [T={T}, K]")
  if wg_EDF.shape != (E, D, F) or wu_EDF.shape != (E, D, F) or wd_EFD.shape != (E, F, D):
    raise ValueError(f"expert weights gate {wg_EDF.shape}, up {wu_EDF.shape}, down "
                     f"{wd_EFD.shape} must be [E, D={D}, F], [E, D, F], [E, F, D]")
  s = _sort(idx_TK, E)
  dropped = jnp.zeros((), jnp.float32)
  if dispatch == "sort":
    if block_size < 1:
      raise ValueError(f"moe_block_size must be >= 1, got {block_size}")
    y_RD, dest_A = _sort_ffn(x_TD, s, wg_EDF, wu_EDF, wd_EFD, block_size, dtype)
  elif dispatch == "capacity":
    if capacity_factor <= 0:
      raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    capacity = max(1, math.ceil(capacity_factor * idx_TK.size / E))
    y_RD, dest_A, dropped = _capacity_ffn(x_TD, s, wg_EDF, wu_EDF, wd_EFD, capacity, dtype)
  else:
    y_RD, dest_A = _ragged_ffn(x_TD, s, wg_EDF, wu_EDF, wd_EFD, dtype)
  return _combine(y_RD, dest_A, w_TK), dropped
