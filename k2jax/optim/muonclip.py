"""MuonClip, Muon and the AdamW baseline as optax transforms with one shared role split.

`tx = muonclip(lr, model_config=cfg)`; `state = tx.init(params)`;
`updates, state = tx.update(grads, state, params, max_logits=aux["max_logits"])`;
`params = optax.apply_updates(params, updates)` performs K2's Algorithm 1 (Muon on the "muon"
leaves, AdamW with the same lr and wd on the "adamw" leaves) followed by QK-Clip on the updated
weights. `optimizer_metrics(state)` reads the last step's metrics. Params straight from
`model.init` (flax's LogicallyPartitioned boxes) are accepted: rules match the unboxed paths and
the updates come back boxed like the params.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from k2jax.config import ModelConfig
from k2jax.optim import qk_clip as qk_clip_lib
from k2jax.optim import roles as roles_lib
from k2jax.optim.muon import muon_matrix
from k2jax.optim.newton_schulz import NS_COEFFS


class OptimizerState(NamedTuple):
  """inner: the optax.partition state of the role groups; metrics: the last update's metrics."""

  inner: optax.OptState
  metrics: dict[str, jax.Array]


def _rms_metrics(updates, labels) -> dict[str, jax.Array]:
  """Pooled RMS of the updates of the "muon" and of the "adamw" leaves (0 for an empty group)."""
  metrics = {}
  for role in ("muon", "adamw"):
    leaves = [u for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)) if r == role]
    # A Python float: an int count beyond 2^31 (K2 has 1.02e12 Muon weights) overflows in jit.
    count = float(max(sum(u.size for u in leaves), 1))
    total = sum((jnp.sum(jnp.square(u.astype(jnp.float32))) for u in leaves), jnp.float32(0))
    metrics[f"update_rms/{role}"] = jnp.sqrt(total / count)
  return metrics


def _rebox(boxed, tree):
  """`tree` (plain arrays) in the boxes of `boxed` (flax AxisMetadata: LogicallyPartitioned)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda b, x: b.replace_boxed(x) if is_box(b) else x, boxed, tree,
                      is_leaf=is_box)


def _with_roles(matrix_tx: optax.GradientTransformation, learning_rate, *, weight_decay: float,
                adam_b1: float, adam_b2: float, adam_eps: float, roles, qk_clip_tau,
                model_config: ModelConfig | None,
                qk_clip_targets) -> optax.GradientTransformationExtraArgs:
  """`matrix_tx` on the "muon" leaves, AdamW on the "adamw" leaves, then optional QK-Clip."""
  roles_lib.compile_rules(roles)  # Fails fast on a malformed rule.
  if qk_clip_tau is None:
    targets = None
  else:
    if not qk_clip_tau > 0:
      raise ValueError(f"qk_clip_tau must be positive or None, got {qk_clip_tau}")
    if model_config is not None and qk_clip_targets is not None:
      raise ValueError("qk_clip: give model_config or qk_clip_targets, not both")
    if qk_clip_targets is not None:
      targets = tuple(qk_clip_targets)
    elif model_config is not None:
      targets = qk_clip_lib.mla_targets(model_config)
    else:
      raise ValueError("qk_clip_tau is set but neither model_config nor qk_clip_targets says "
                       "where the query and key weights are (or pass qk_clip_tau=None)")
  label_fn = lambda tree: roles_lib.param_roles(tree, roles)
  inner = optax.partition(
    {"muon": matrix_tx,
     "adamw": optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                          weight_decay=weight_decay),
     "frozen": optax.set_to_zero()},
    label_fn)

  def init_fn(params):
    params = nn.meta.unbox(params)
    metrics = {f"update_rms/{role}": jnp.zeros((), jnp.float32) for role in ("muon", "adamw")}
    if targets is not None:
      _, num_layers = qk_clip_lib.resolve(targets, params)
      metrics["qk_clip/clipped_heads"] = jnp.zeros((num_layers,), jnp.int32)
      metrics["qk_clip/min_gamma"] = jnp.ones((), jnp.float32)
    return OptimizerState(inner.init(params), metrics)

  def update_fn(updates, state, params=None, *, max_logits=None, **extra_args):
    del extra_args
    boxed, updates, params = updates, nn.meta.unbox(updates), nn.meta.unbox(params)
    if targets is not None:
      if params is None:
        raise ValueError("QK-Clip needs params: call tx.update(grads, state, params, ...)")
      if max_logits is None:
        raise ValueError("QK-Clip needs max_logits: tx.update(..., max_logits=aux['max_logits'])")
      matches, num_layers = qk_clip_lib.resolve(targets, params)
      qk_clip_lib.check_max_logits(matches, num_layers, jnp.shape(max_logits))
    labels = label_fn(updates)
    updates, inner_state = inner.update(updates, state.inner, params)
    metrics = _rms_metrics(updates, labels)
    if targets is not None:
      updates, clip_metrics = qk_clip_lib.qk_clip(updates, params, max_logits, qk_clip_tau,
                                                  matches)
      metrics.update(clip_metrics)
    return _rebox(boxed, updates), OptimizerState(inner_state, metrics)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def muonclip(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.1,
             momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
             ns_coeffs=NS_COEFFS, ns_dtype=jnp.bfloat16, rms_scale: float = 0.2,
             adam_b1: float = 0.9, adam_b2: float = 0.95, adam_eps: float = 1e-8,
             qk_clip_tau: float | None = 100.0, model_config: ModelConfig | None = None,
             roles=None, qk_clip_targets=None,
             param_shardings=None) -> optax.GradientTransformationExtraArgs:
  """K2's MuonClip: Muon (RMS-matched to AdamW) + AdamW on embeddings/head/norms + QK-Clip.

  The query/key weights come from `model_config` (k2jax.Transformer's MLA) or, for other models,
  `qk_clip_targets` (e.g. `k2jax.optim.mha_targets(...)`). `qk_clip_tau=None` disables the clip.
  `roles`: (regex, role) rules placed before the defaults (see k2jax.optim.roles).
  `param_shardings`: the params' NamedShardings when they are sharded over a mesh; Newton-Schulz
  then deals the matrices out over the devices (k2jax.optim.muon.orthogonalize_sharded).
  """
  matrix_tx = muon_matrix(learning_rate, weight_decay=weight_decay, momentum=momentum,
                          nesterov=nesterov, ns_steps=ns_steps, ns_coeffs=ns_coeffs,
                          ns_dtype=ns_dtype, rms_scale=rms_scale,
                          param_shardings=param_shardings)
  return _with_roles(matrix_tx, learning_rate, weight_decay=weight_decay, adam_b1=adam_b1,
                     adam_b2=adam_b2, adam_eps=adam_eps, roles=roles, qk_clip_tau=qk_clip_tau,
                     model_config=model_config, qk_clip_targets=qk_clip_targets)


def muon(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.1,
         momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5, ns_coeffs=NS_COEFFS,
         ns_dtype=jnp.bfloat16, rms_scale: float = 0.2, adam_b1: float = 0.9,
         adam_b2: float = 0.95, adam_eps: float = 1e-8, roles=None,
         param_shardings=None) -> optax.GradientTransformationExtraArgs:
  """MuonClip without the clip (`max_logits`, if passed, is ignored)."""
  return muonclip(learning_rate, weight_decay=weight_decay, momentum=momentum,
                  nesterov=nesterov, ns_steps=ns_steps, ns_coeffs=ns_coeffs, ns_dtype=ns_dtype,
                  rms_scale=rms_scale, adam_b1=adam_b1, adam_b2=adam_b2, adam_eps=adam_eps,
                  qk_clip_tau=None, roles=roles, param_shardings=param_shardings)


def adamw(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.1, b1: float = 0.9,
          b2: float = 0.95, eps: float = 1e-8, roles=None, qk_clip_tau: float | None = None,
          model_config: ModelConfig | None = None,
          qk_clip_targets=None) -> optax.GradientTransformationExtraArgs:
  """The AdamW baseline with MuonClip's role split: AdamW on the "muon" leaves too.

  Metrics and frozen leaves are as in `muonclip`, so runs differ only in the optimizer. QK-Clip
  is off unless `qk_clip_tau` is given.
  """
  matrix_tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return _with_roles(matrix_tx, learning_rate, weight_decay=weight_decay, adam_b1=b1, adam_b2=b2,
                     adam_eps=eps, roles=roles, qk_clip_tau=qk_clip_tau,
                     model_config=model_config, qk_clip_targets=qk_clip_targets)


def optimizer_metrics(state) -> dict[str, jax.Array]:
  """The last update's metrics from a muonclip/muon/adamw state (also nested in optax wrappers);
  empty for a state that holds none (another optax transform).

  update_rms/muon, update_rms/adamw: RMS of the update (lr and weight decay included, QK-Clip
  not) over all leaves of that role; with QK-Clip, qk_clip/clipped_heads [L] int32 (heads above
  tau per layer) and qk_clip/min_gamma (smallest gamma applied, 1 when none).
  """
  is_ours = lambda x: isinstance(x, OptimizerState)
  found = [s for s in jax.tree.leaves(state, is_leaf=is_ours) if is_ours(s)]
  return dict(found[0].metrics) if found else {}
