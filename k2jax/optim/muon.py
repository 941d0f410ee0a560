"""The Muon update of K2's Algorithm 1 for the Muon leaves, built from optax pieces.

For each matrix W [A, B] (the last two axes of a leaf; leading axes are a batch of matrices):
M = mu M + G; U = G + mu M (Nesterov); O = NewtonSchulz(U);
update = -lr (rms_scale sqrt(max(A, B)) O + wd W).
optax.contrib.muon differs from this reference in three ways, so it is not used whole: its
momentum is a bias-corrected EMA (which reweights G against M in the Nesterov step), its default
scale is Keller Jordan's sqrt(max(1, B/A)) rather than RMS matching, and its Newton-Schulz runs in
the parameter dtype. Its weight decay is lr * wd * W, as here and in K2. Its shape scaling
(`consistent_rms`) is what `scale_by_rms_match` does, but optax does not export it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax.optim.newton_schulz import NS_COEFFS, newton_schulz
from k2jax.paths import path_str

# XLA:CPU runs a batched dot over many small matrices far below its matmul peak; a loop over
# batches of 32 matrices gives the same numbers faster (benchmarks/optimizer_step.py measures
# both). Accelerators take the whole batch at once.
CPU_NS_BATCH = 32


def orthogonalize_batched(leaves: list[jax.Array], *, batch_size: int | None = None,
                          **ns_kwargs) -> list[jax.Array]:
  """newton_schulz of every leaf's matrices, leaves of equal matrix shape run as one batch.

  Each leaf [..., M, N] is flattened to [-1, m, n] with m <= n (transposing tall matrices);
  leaves sharing (m, n) are concatenated, so there is one batched iteration per matrix shape,
  run by `lax.map` in batches of `batch_size` matrices (None: `CPU_NS_BATCH` on CPU, all at once
  elsewhere).
  """
  if batch_size is None and jax.default_backend() == "cpu":
    batch_size = CPU_NS_BATCH
  ns = functools.partial(newton_schulz, **ns_kwargs)
  if batch_size is not None:
    ns = functools.partial(jax.lax.map, ns, batch_size=batch_size)
  groups: dict[tuple[int, int], list[int]] = {}
  flat = []
  for i, u in enumerate(leaves):
    u_KMN = u.reshape(-1, *u.shape[-2:])
    if u.shape[-2] > u.shape[-1]:
      u_KMN = jnp.swapaxes(u_KMN, -1, -2)
    flat.append(u_KMN)
    groups.setdefault(u_KMN.shape[1:], []).append(i)
  out = [None] * len(leaves)
  for idx in groups.values():
    o_KMN = ns(jnp.concatenate([flat[i] for i in idx]))
    splits = np.cumsum([flat[i].shape[0] for i in idx])[:-1]
    for i, o in zip(idx, jnp.split(o_KMN, splits)):
      u = leaves[i]
      if u.shape[-2] > u.shape[-1]:
        o = jnp.swapaxes(o, -1, -2)
      out[i] = o.reshape(u.shape).astype(u.dtype)
  return out


# Newton-Schulz of a sharded leaf runs in chunks of about this many float32 bytes per device.
NS_CHUNK_BYTES = 2**30


class NewtonSchulzLayout(NamedTuple):
  """How `orthogonalize_sharded` deals a leaf's matrices out whole over the mesh.

  A device's block holds `local` matrices (its share of the leading axes), split over the
  `rows` and `cols` mesh axes and identical over the `spread` axes (those the leaf does not
  use). They go in `chunks` rounds: in each, every device of a spread group takes its own
  rows x cols x `per_chunk` of them (zeros past the end), an all_to_all over rows and cols makes
  each device's `per_chunk` matrices whole, it orthogonalises them, and the same all_to_all
  brings them back; a psum over spread (each matrix is non-zero on one device) makes the block
  whole again. No matrix is done twice.
  """

  spread: tuple[str, ...]
  rows: tuple[str, ...]
  cols: tuple[str, ...]
  local: int
  per_chunk: int
  chunks: int

  @property
  def per_device(self) -> int:
    """Matrices one device orthogonalises (zero padding included)."""
    return self.per_chunk * self.chunks


def newton_schulz_layout(spec, shape, mesh_shape, chunk_bytes: int = NS_CHUNK_BYTES
                         ) -> NewtonSchulzLayout:
  """The `NewtonSchulzLayout` of a leaf of `shape` laid out by PartitionSpec `spec`."""
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  axes = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  used = {a for e in entries for a in axes(e)}
  ways = lambda names: math.prod(mesh_shape[a] for a in names)
  spread = tuple(a for a in mesh_shape if a not in used and mesh_shape[a] > 1)
  rows, cols = axes(entries[-2]), axes(entries[-1])
  local = math.prod(shape[:-2]) // ways([a for e in entries[:-2] for a in axes(e)])
  per_device = -(-local // (ways(spread) * ways(rows) * ways(cols)))
  most = max(1, chunk_bytes // (4 * shape[-2] * shape[-1]))
  chunks = -(-per_device // most)
  return NewtonSchulzLayout(spread, rows, cols, local, -(-per_device // chunks), chunks)


def orthogonalize_sharded(u: jax.Array, sharding: NamedSharding, **ns_kwargs) -> jax.Array:
  """newton_schulz of one leaf laid out by `sharding`, each matrix once, on one device.

  Moonlight's Distributed Muon gathers each matrix onto the devices that share it and repeats
  the iteration on each of them; here the matrices are dealt out instead (`NewtonSchulzLayout`),
  so a replicated or FSDP-split leaf costs each device 1/(devices) of the work, in chunks of
  bounded memory. With a bfloat16 iteration the results travel back in bfloat16, which holds
  them exactly.
  """
  mesh, spec = sharding.mesh, P(*sharding.spec)
  lay = newton_schulz_layout(spec, u.shape, dict(mesh.shape))
  ways = lambda names: math.prod(mesh.shape[a] for a in names)
  mine = ways(lay.rows) * ways(lay.cols) * lay.per_chunk  # block matrices a device takes
  chunk = ways(lay.spread) * mine
  back = jnp.dtype(ns_kwargs.get("dtype", jnp.bfloat16))

  def body(u_block):
    a, b = u_block.shape[-2:]
    x_NAB = u_block.reshape(-1, a, b)
    me = jax.lax.axis_index(lay.spread) if lay.spread else 0
    index_KM = (jnp.arange(lay.chunks)[:, None] * chunk + me * mine + jnp.arange(mine))

    def one_chunk(index_M):
      x_MAB = jnp.take(x_NAB, index_M, axis=0, mode="fill", fill_value=0)
      if lay.rows:  # [mine, a, b] -> whole rows of fewer matrices
        x_MAB = jax.lax.all_to_all(x_MAB, lay.rows, 0, 1, tiled=True)
      if lay.cols:
        x_MAB = jax.lax.all_to_all(x_MAB, lay.cols, 0, 2, tiled=True)
      o_MAB = newton_schulz(x_MAB, **ns_kwargs).astype(back)
      if lay.cols:
        o_MAB = jax.lax.all_to_all(o_MAB, lay.cols, 2, 0, tiled=True)
      if lay.rows:
        o_MAB = jax.lax.all_to_all(o_MAB, lay.rows, 1, 0, tiled=True)
      return o_MAB

    o_KMAB = jax.lax.map(one_chunk, index_KM)
    if lay.spread:
      o_NAB = jnp.zeros(x_NAB.shape, back).at[index_KM].set(o_KMAB, mode="drop")
      o_NAB = jax.lax.psum(o_NAB, lay.spread)
    else:
      o_NAB = o_KMAB.reshape(-1, a, b)[:lay.local]
    return o_NAB.reshape(u_block.shape).astype(u.dtype)

  # The psum over `spread` makes the result identical on those axes, as out_specs says; the
  # static check cannot see that the axis_index-dependent parts it adds are disjoint.
  return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(u)


def orthogonalize(steps: int = 5, coeffs=NS_COEFFS, dtype=jnp.bfloat16, eps: float = 1e-7,
                  param_shardings=None) -> optax.GradientTransformation:
  """Stateless: Newton-Schulz on the last two axes of every leaf, cast back to its dtype.

  `param_shardings` (a tree of NamedSharding like the params): each leaf runs on its own through
  `orthogonalize_sharded` (its matrices dealt out over the mesh); without, leaves of equal matrix
  shape are batched.
  """
  ns_kwargs = dict(steps=steps, coeffs=coeffs, dtype=dtype, eps=eps)
  by_path = None
  if param_shardings is not None:
    by_path = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))}

  def update_fn(updates, state, params=None):
    del params
    if by_path is None:
      leaves, treedef = jax.tree.flatten(updates)
      leaves = orthogonalize_batched(leaves, **ns_kwargs)
      return jax.tree.unflatten(treedef, leaves), state

    def one_leaf(path, u):
      name = path_str(path)
      if name not in by_path:
        raise ValueError(f"muon: param_shardings has no entry for {name!r}")
      return orthogonalize_sharded(u, by_path[name], **ns_kwargs)

    return jax.tree_util.tree_map_with_path(one_leaf, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_rms_match(rms_scale: float = 0.2) -> optax.GradientTransformation:
  """Stateless: scale each matrix [..., A, B] by rms_scale * sqrt(max(A, B)) [ML]."""

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(lambda u: u * (rms_scale * max(u.shape[-2:]) ** 0.5), updates)
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_muon(*, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  ns_coeffs=NS_COEFFS, ns_dtype=jnp.bfloat16, rms_scale: float = 0.2,
                  param_shardings=None) -> optax.GradientTransformation:
  """Momentum, Newton-Schulz and RMS matching (no lr, no weight decay); one buffer per matrix.

  `param_shardings`: see `orthogonalize` (sharded Newton-Schulz).
  """
  if not 0 <= momentum < 1:
    raise ValueError(f"muon momentum must be in [0, 1), got {momentum}")
  if rms_scale <= 0:
    raise ValueError(f"muon rms_scale must be positive, got {rms_scale}")
  return optax.chain(
    optax.trace(decay=momentum, nesterov=nesterov),
    orthogonalize(ns_steps, ns_coeffs, ns_dtype, param_shardings=param_shardings),
    scale_by_rms_match(rms_scale),
  )


def muon_matrix(learning_rate, *, weight_decay: float = 0.1, **muon_kwargs
                ) -> optax.GradientTransformation:
  """The full Muon update of the matrices: scale_by_muon, decoupled decay, -lr."""
  return optax.chain(
    scale_by_muon(**muon_kwargs),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
