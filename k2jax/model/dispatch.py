"""Routed-expert dispatch: y[t] = sum_k w[t, k] * SwiGLU_{idx[t, k]}(x[t]).

All paths share one picture. The T*K (token, expert) assignments a = t*K + k are sorted by
expert (stable, so token order within an expert); each expert gets a segment of rows in a buffer
(a layout): `src_R` names the assignment feeding each row, `dest_A` the row holding each
assignment. Rows are gathered from x, pushed through their expert's SwiGLU, summed per token.

- "capacity": every expert gets C = ceil(capacity_factor * T*K / E) rows; assignments beyond
  (in token order) are dropped. One batched matmul over [E, C, D].
- "sort": dropless and exact. When every expert's load fits C rows it runs the capacity layout
  (nothing drops); otherwise a block layout: segments padded to whole blocks of `block_size` rows,
  one expert per block, the blocks' weights gathered, one batched matmul over the blocks. Block
  size 0 (the default) picks `auto_block_size`: small blocks waste fewer padded rows, large ones
  gather fewer weight copies; half the mean load is the CPU choice (benchmarks/moe_dispatch.py).
- "ragged": unpadded segments through `jax.lax.ragged_dot` (GPU/TPU; XLA:CPU computes it densely).

"capacity" and "sort" share one custom VJP. Its backward runs every matmul in the compute dtype
too, each in the row-major [M, K] @ [K, N] form XLA:CPU's fast (YNNPACK) bf16 kernel takes, and
moves rows with gathers (no scatters). Each group of rows runs `layers.swiglu_rows_fwd/bwd`, the
same SwiGLU as the dense `layers.swiglu`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from k2jax.config import DISPATCHES
from k2jax.model.layers import fuse_swiglu_weights, swiglu_rows_bwd, swiglu_rows_fwd


class _Sorted(NamedTuple):
  """Assignments sorted by expert; `rank_S` counts within each expert."""

  order_S: jnp.ndarray  # assignment id of each sorted slot
  expert_S: jnp.ndarray
  rank_S: jnp.ndarray
  counts_E: jnp.ndarray


class _Layout(NamedTuple):
  """Rows of an expert buffer, in groups of equal size run by one expert each."""

  src_R: jnp.ndarray  # assignment feeding each row; T*K marks an empty row
  dest_A: jnp.ndarray  # row holding each assignment; R marks a dropped assignment
  expert_G: jnp.ndarray | None  # expert of each group; None: group g is expert g


def sort_assignments(idx_TK: jnp.ndarray, num_experts: int) -> _Sorted:
  """The T*K assignments of idx_TK (values in [0, num_experts)) sorted by expert, stably."""
  expert_A = idx_TK.reshape(-1)
  order_S = jnp.argsort(expert_A, stable=True)
  expert_S = expert_A[order_S]
  counts_E = jnp.bincount(expert_A, length=num_experts)
  start_E = jnp.cumsum(counts_E) - counts_E
  rank_S = jnp.arange(expert_A.shape[0]) - start_E[expert_S]
  return _Sorted(order_S, expert_S, rank_S, counts_E)


def _place(s: _Sorted, seg_start_E, num_rows: int, keep_S=None, expert_G=None) -> _Layout:
  """Sorted slot i goes to row seg_start[expert] + rank, unless `keep_S` drops it."""
  num_assign = s.order_S.shape[0]
  dest_S = seg_start_E[s.expert_S] + s.rank_S
  if keep_S is not None:
    dest_S = jnp.where(keep_S, dest_S, num_rows)
  src_R = jnp.full((num_rows,), num_assign, jnp.int32).at[dest_S].set(
      s.order_S.astype(jnp.int32), mode="drop")
  dest_A = jnp.zeros((num_assign,), jnp.int32).at[s.order_S].set(dest_S.astype(jnp.int32))
  return _Layout(src_R, dest_A, expert_G)


def capacity_layout(s: _Sorted, capacity: int) -> _Layout:
  """Expert e owns rows [e*C, (e+1)*C); its assignments beyond C drop."""
  E = s.counts_E.shape[0]
  return _place(s, jnp.arange(E) * capacity, E * capacity, keep_S=s.rank_S < capacity)


def capacity(num_assignments: int, num_groups: int, capacity_factor: float) -> int:
  """Rows per group (expert, or expert shard) of a capacity buffer: ceil(factor * n / groups)."""
  return max(1, math.ceil(capacity_factor * num_assignments / num_groups))


def buffer_rows(num_assignments: int, num_experts: int, dispatch: str, capacity_factor: float,
                block_size: int = 0) -> int:
  """Rows the dispatch pushes through the experts, padding included: "capacity" E * C; "sort"
  the larger of its two layouts (capacity, and blocks of `block_size` rows, 0 = auto); "ragged"
  the assignments themselves."""
  if dispatch == "ragged":
    return num_assignments
  rows = num_experts * capacity(num_assignments, num_experts, capacity_factor)
  if dispatch == "capacity":
    return rows
  bs = block_size or auto_block_size(num_assignments, num_experts)
  return max(rows, (-(-num_assignments // bs) + num_experts) * bs)


def auto_block_size(num_assignments: int, num_experts: int) -> int:
  """The largest power of two not above half the mean expert load, within [8, 8192].

  About 3 blocks per expert, so about 3 copies of each expert's weights. (A cap of 512 rows
  made it 86 copies of a device's 6 K2 experts under expert parallelism on 512 chips: 40 GiB of
  a v5p chip's temporaries, benchmarks/RESULTS.md.)
  """
  half = num_assignments // (2 * num_experts)
  return min(8192, max(8, 1 << max(0, half.bit_length() - 1)))


def _block_layout(s: _Sorted, block_size: int, num_blocks: int) -> _Layout:
  """Each expert's segment padded to whole blocks; trailing blocks stay empty."""
  E = s.counts_E.shape[0]
  padded_E = -(-s.counts_E // block_size) * block_size
  end_E = jnp.cumsum(padded_E)
  expert_G = jnp.searchsorted(end_E, jnp.arange(num_blocks) * block_size, side="right")
  return _place(s, end_E - padded_E, num_blocks * block_size,
                expert_G=jnp.minimum(expert_G, E - 1))


def _take(a: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """a[index] along axis 0, zero where index is out of range (empty rows, dropped slots)."""
  return jnp.take(a, index, axis=0, mode="fill", fill_value=0)


def _sum_rows(y_GMD: jnp.ndarray, dest_TK: jnp.ndarray) -> jnp.ndarray:
  """out[t] = sum_k row dest[t, k] of y, as K gathers XLA fuses into one pass (a gather to
  [T, K, D] and a reduction would write and re-read T*K*D floats)."""
  y_RD = y_GMD.reshape(-1, y_GMD.shape[-1])
  return sum(_take(y_RD, dest_TK[:, k]) for k in range(dest_TK.shape[1]))


class _Spec(NamedTuple):
  """A layout to build from the sorted assignments: `groups` groups of `rows` rows, one group
  per expert ("capacity") or per block ("block")."""

  kind: str
  rows: int
  groups: int

  def build(self, s: _Sorted) -> _Layout:
    if self.kind == "capacity":
      return capacity_layout(s, self.rows)
    return _block_layout(s, self.rows, self.groups)


def _layout_fwd(x_TD, w_TK, wgu_EDH, wd_EFD, s: _Sorted, *, spec: _Spec, res_rows: int, dtype):
  """The routed SwiGLU through the layout `spec` builds; returns out_TD and the per-row residuals
  (zero-padded to `res_rows` rows)."""
  T, K = w_TK.shape
  lay = spec.build(s)
  src_GM = lay.src_R.reshape(-1, spec.rows)
  w_GM = _take(w_TK.reshape(-1).astype(jnp.float32), src_GM)
  if lay.expert_G is not None:
    wgu_EDH, wd_EFD = wgu_EDH[lay.expert_G], wd_EFD[lay.expert_G]
  y_GMD, gu_GMH = swiglu_rows_fwd(_take(x_TD.astype(dtype), src_GM // K), wgu_EDH, wd_EFD,
                                   w_GM, dtype)
  out_TD = _sum_rows(y_GMD, lay.dest_A.reshape(T, K))
  pad = res_rows - w_GM.size
  return out_TD, (jnp.pad(w_GM.reshape(-1), (0, pad)),
                  jnp.pad(gu_GMH.reshape(w_GM.size, -1), ((0, pad), (0, 0))))


def _layout_bwd(x_TD, w_TK, wgu_EDH, wd_EFD, s: _Sorted, rows, dout_TD, *, spec: _Spec, dtype):
  """Cotangents (dx_TD, dw_TK, dwgu_EDH, dwd_EFD; float32) of `_layout_fwd`."""
  T, K = w_TK.shape
  E = wgu_EDH.shape[0]
  lay = spec.build(s)
  src_GM = lay.src_R.reshape(-1, spec.rows)
  w_R, gu_RH = (r[:src_GM.size] for r in rows)
  if lay.expert_G is not None:
    wgu_EDH, wd_EFD = wgu_EDH[lay.expert_G], wd_EFD[lay.expert_G]
  dx_GMD, dwgu_GDH, dwd_GFD, dw_GM = swiglu_rows_bwd(
      _take(x_TD.astype(dtype), src_GM // K), wgu_EDH, wd_EFD, w_R.reshape(src_GM.shape),
      gu_RH.reshape(*src_GM.shape, -1), _take(dout_TD.astype(dtype), src_GM // K), dtype)
  if lay.expert_G is not None:
    dwgu_GDH = jax.ops.segment_sum(dwgu_GDH, lay.expert_G, E, indices_are_sorted=True)
    dwd_GFD = jax.ops.segment_sum(dwd_GFD, lay.expert_G, E, indices_are_sorted=True)
  dx_TD = _sum_rows(dx_GMD, lay.dest_A.reshape(T, K))
  dw_TK = _take(dw_GM.reshape(-1), lay.dest_A).reshape(T, K)
  return dx_TD, dw_TK, dwgu_GDH, dwd_GFD


def _switch(branch, fns, *args):
  return fns[0](*args) if len(fns) == 1 else jax.lax.switch(branch, fns, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _routed_swiglu(x_TD, w_TK, wg_EDF, wu_EDF, wd_EFD, s, branch, specs, dtype):
  """The routed SwiGLU through the layout specs[branch]. Each branch builds its own layout, so
  the one not taken costs nothing (the backward rebuilds it from the sort: a few index
  scatters); the choice lives inside the VJP, so all layouts share one set of residuals."""
  return _routed_swiglu_fwd(x_TD, w_TK, wg_EDF, wu_EDF, wd_EFD, s, branch, specs, dtype)[0]


def _routed_swiglu_fwd(x_TD, w_TK, wg_EDF, wu_EDF, wd_EFD, s, branch, specs, dtype):
  weights = fuse_swiglu_weights(wg_EDF, wu_EDF, wd_EFD, dtype)
  res_rows = max(spec.rows * spec.groups for spec in specs)
  fns = [functools.partial(_layout_fwd, spec=spec, res_rows=res_rows, dtype=dtype)
         for spec in specs]
  out_TD, rows = _switch(branch, fns, x_TD, w_TK, *weights, s)
  return out_TD, (x_TD, w_TK, wg_EDF, wu_EDF, wd_EFD, s, branch, rows)


def _routed_swiglu_bwd(specs, dtype, res, dout_TD):
  x_TD, w_TK, wg_EDF, wu_EDF, wd_EFD, s, branch, rows = res
  fns = [functools.partial(_layout_bwd, spec=spec, dtype=dtype) for spec in specs]
  dx_TD, dw_TK, dwgu_EDH, dwd_EFD = _switch(
      branch, fns, x_TD, w_TK, *fuse_swiglu_weights(wg_EDF, wu_EDF, wd_EFD, dtype), s, rows,
      dout_TD)
  dwg_EDF, dwu_EDF = jnp.split(dwgu_EDH, 2, axis=-1)
  grads = (dx_TD, dw_TK, dwg_EDF, dwu_EDF, dwd_EFD)
  primals = (x_TD, w_TK, wg_EDF, wu_EDF, wd_EFD)
  return (*(g.astype(p.dtype) for g, p in zip(grads, primals)), None, None)


_routed_swiglu.defvjp(_routed_swiglu_fwd, _routed_swiglu_bwd)


def _ragged_ffn(x_TD, w_TK, s: _Sorted, wg_EDF, wu_EDF, wd_EFD, dtype):
  """Unpadded sorted rows, grouped matmuls over the experts' segments (plain autodiff)."""
  T, K = w_TK.shape
  lay = _place(s, jnp.cumsum(s.counts_E) - s.counts_E, T * K)
  x_AD = _take(x_TD, lay.src_R // K)
  group_sizes = s.counts_E.astype(jnp.int32)
  rdot = lambda a, w: jax.lax.ragged_dot(a.astype(dtype), w.astype(dtype), group_sizes,
                                         preferred_element_type=jnp.float32)
  h_AF = jax.nn.silu(rdot(x_AD, wg_EDF)) * rdot(x_AD, wu_EDF)
  y_TKD = _take(rdot(h_AF, wd_EFD), lay.dest_A).reshape(T, K, -1)
  return jnp.einsum("tkd,tk->td", y_TKD, w_TK.astype(jnp.float32))


def routed_experts(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, *, dispatch: str,
                   capacity_factor: float = 1.25, block_size: int = 0, dtype=jnp.float32):
  """Weighted SwiGLU experts per token; returns (y_TD float32, dropped_frac f32 scalar).

  gate/up [E, D, F], down [E, F, D]; matmuls in `dtype`, accumulated in float32. block_size:
  rows per block of the sort path's block layout (0: `auto_block_size`).
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
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
  if block_size < 0:
    raise ValueError(f"moe_block_size must be >= 0 (0: auto), got {block_size}")
  dtype = jnp.dtype(dtype)
  s = sort_assignments(idx_TK, E)
  if dispatch == "ragged":
    return (_ragged_ffn(x_TD, w_TK, s, wg_EDF, wu_EDF, wd_EFD, dtype),
            jnp.zeros((), jnp.float32))
  rows = capacity(idx_TK.size, E, capacity_factor)
  cap = _Spec("capacity", rows, E)
  weights = (wg_EDF, wu_EDF, wd_EFD)
  if dispatch == "capacity":
    y_TD = _routed_swiglu(x_TD, w_TK, *weights, s, None, (cap,), dtype)
    return y_TD, jnp.mean(s.rank_S >= rows, dtype=jnp.float32)
  block_size = block_size or auto_block_size(idx_TK.size, E)
  blocks = _Spec("block", block_size, -(-idx_TK.size // block_size) + E)
  branch = (jnp.max(s.counts_E) > rows).astype(jnp.int32)
  y_TD = _routed_swiglu(x_TD, w_TK, *weights, s, branch, (cap, blocks), dtype)
  return y_TD, jnp.zeros((), jnp.float32)
