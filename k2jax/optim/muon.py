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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from k2jax.optim.newton_schulz import NS_COEFFS, newton_schulz


def orthogonalize_batched(leaves: list[jax.Array], **ns_kwargs) -> list[jax.Array]:
  """newton_schulz of every leaf's matrices, leaves of equal matrix shape run as one batch.

  Each leaf [..., M, N] is flattened to [-1, m, n] with m <= n (transposing tall matrices);
  leaves sharing (m, n) are concatenated, so there is one batched iteration per matrix shape.
  """
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
    o_KMN = newton_schulz(jnp.concatenate([flat[i] for i in idx]), **ns_kwargs)
    splits = np.cumsum([flat[i].shape[0] for i in idx])[:-1]
    for i, o in zip(idx, jnp.split(o_KMN, splits)):
      u = leaves[i]
      if u.shape[-2] > u.shape[-1]:
        o = jnp.swapaxes(o, -1, -2)
      out[i] = o.reshape(u.shape).astype(u.dtype)
  return out


def orthogonalize(steps: int = 5, coeffs=NS_COEFFS, dtype=jnp.bfloat16,
                  eps: float = 1e-7) -> optax.GradientTransformation:
  """Stateless: Newton-Schulz on the last two axes of every leaf, cast back to its dtype."""

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    leaves = orthogonalize_batched(leaves, steps=steps, coeffs=coeffs, dtype=dtype, eps=eps)
    return jax.tree.unflatten(treedef, leaves), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_rms_match(rms_scale: float = 0.2) -> optax.GradientTransformation:
  """Stateless: scale each matrix [..., A, B] by rms_scale * sqrt(max(A, B)) [ML]."""

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(lambda u: u * (rms_scale * max(u.shape[-2:]) ** 0.5), updates)
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_muon(*, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  ns_coeffs=NS_COEFFS, ns_dtype=jnp.bfloat16,
                  rms_scale: float = 0.2) -> optax.GradientTransformation:
  """Momentum, Newton-Schulz and RMS matching (no lr, no weight decay); one buffer per matrix."""
  if not 0 <= momentum < 1:
    raise ValueError(f"muon momentum must be in [0, 1), got {momentum}")
  if rms_scale <= 0:
    raise ValueError(f"muon rms_scale must be positive, got {rms_scale}")
  return optax.chain(
    optax.trace(decay=momentum, nesterov=nesterov),
    orthogonalize(ns_steps, ns_coeffs, ns_dtype),
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
