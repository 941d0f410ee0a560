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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import sharding as sharding_lib
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


def orthogonalize_sharded(u: jax.Array, sharding: NamedSharding, **ns_kwargs) -> jax.Array:
  """newton_schulz of one leaf laid out by `sharding`, on the devices that own its matrices.

  A leaf of three or more axes runs one slice of its first (layers) axis at a time (`lax.map`),
  so no more than one layer is ever gathered. Each slice is resharded so that every matrix is
  whole on some devices (`k2jax.sharding.newton_schulz_spec`: the mesh axes of the matrix dims
  move to a batch dim, such as the experts, where they divide, else the matrix is gathered:
  Moonlight's Distributed Muon), orthogonalised there and cut back to `sharding`.
  """
  mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (u.ndim - len(sharding.spec))
  constrain = lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*s)))

  def one(u_, spec_):
    ns_spec = tuple(sharding_lib.newton_schulz_spec(P(*spec_), u_.shape, mesh.shape))
    # Pinning the result to ns_spec keeps the whole iteration there; the cut back is local.
    o = constrain(newton_schulz(constrain(u_, ns_spec), **ns_kwargs), ns_spec)
    return constrain(o, spec_)

  if u.ndim >= 3:
    o = jax.lax.map(lambda u_l: one(u_l, spec[1:]), u)
  else:
    o = one(u, spec)
  return constrain(o, spec).astype(u.dtype)


def orthogonalize(steps: int = 5, coeffs=NS_COEFFS, dtype=jnp.bfloat16, eps: float = 1e-7,
                  param_shardings=None) -> optax.GradientTransformation:
  """Stateless: Newton-Schulz on the last two axes of every leaf, cast back to its dtype.

  `param_shardings` (a tree of NamedSharding like the params): each leaf runs on its own through
  `orthogonalize_sharded` (Distributed Muon); without, leaves of equal matrix shape are batched.
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
