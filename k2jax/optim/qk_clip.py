"""QK-Clip (K2 report, §2.1): rescale the query/key weights of heads whose max logit exceeds tau.

For layer l and head h with S_max[l, h] > tau, gamma = tau / S_max[l, h]; each head's output
columns of a query or key kernel are scaled, segment by segment, by gamma ** exponent. MLA: the
non-rotary query and key columns by sqrt(gamma), the rotary query columns by gamma; the value
columns of kv_b, q_a and kv_a (with the shared rotary key) are never touched. Plain multi-head
attention: sqrt(gamma) on the head's q and k columns. Every logit of the head is then scaled by
gamma, so its max becomes tau. Heads at or below tau keep their weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig
from k2jax.paths import path_str

EXPONENTS = (0.0, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class QKClipTarget:
  """A query or key kernel [in, H*w] (one layer) or [L', in, H*w] (stacked layers) to rescale.

  pattern: regex `re.search`ed in the '/'-joined parameter path. A named group `layer` in it
    adds that integer to first_layer (for per-layer leaves such as 'layers_3/attn/q/kernel').
  segments: each head's output columns in order, as (width, exponent of gamma), exponent in
    {0, 0.5, 1}; w = sum of widths.
  first_layer: row of max_logits that the leaf's first layer corresponds to.
  """

  pattern: str
  segments: tuple[tuple[int, float], ...]
  first_layer: int = 0

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"QKClipTarget pattern {self.pattern!r} does not compile: {e}") from None
    if not self.segments or any(w <= 0 or e not in EXPONENTS for w, e in self.segments):
      raise ValueError(f"QKClipTarget {self.pattern!r}: segments must be (width > 0, exponent in "
                       f"{EXPONENTS}) pairs, got {self.segments!r}")
    if self.first_layer < 0:
      raise ValueError(f"QKClipTarget {self.pattern!r}: first_layer must be >= 0, "
                       f"got {self.first_layer}")

  @property
  def head_width(self) -> int:
    return sum(w for w, _ in self.segments)


def mla_targets(cfg: ModelConfig) -> tuple[QKClipTarget, ...]:
  """Targets for k2jax.Transformer(cfg): q_b (or q_proj) and kv_b of the dense and MoE stacks and
  of the multi-token-prediction layers' blocks (max_logits rows after the main layers')."""
  dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  q_name = "q_b" if cfg.q_lora_rank is not None else "q_proj"
  targets = []
  for stack, first, count in (("dense_layers", 0, cfg.num_dense_layers),
                              ("moe_layers", cfg.num_dense_layers, cfg.num_moe_layers),
                              ("mtp_layers/block", cfg.num_hidden_layers,
                               cfg.num_nextn_predict_layers)):
    if count:
      targets.append(QKClipTarget(rf"(^|/){stack}/attn/{q_name}/kernel$", ((dn, 0.5), (dr, 1.0)),
                                  first))
      targets.append(QKClipTarget(rf"(^|/){stack}/attn/kv_b/kernel$", ((dn, 0.5), (dv, 0.0)),
                                  first))
  return tuple(targets)


def mha_targets(q_pattern: str, k_pattern: str, head_dim: int,
                first_layer: int = 0) -> tuple[QKClipTarget, ...]:
  """Targets for plain multi-head attention: sqrt(gamma) on each head's q and k columns."""
  return (QKClipTarget(q_pattern, ((head_dim, 0.5),), first_layer),
          QKClipTarget(k_pattern, ((head_dim, 0.5),), first_layer))


@dataclasses.dataclass(frozen=True)
class _Match:
  target: QKClipTarget
  first_row: int
  num_layers: int
  stacked: bool
  columns: int


def resolve(targets, params) -> tuple[dict[str, _Match], int]:
  """{path: match} for the leaves the targets select, and the number of layers they cover."""
  compiled = [(t, re.compile(t.pattern)) for t in targets]
  matches, used = {}, set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    for target, pattern in compiled:
      m = pattern.search(name)
      if m is None:
        continue
      if name in matches:
        raise ValueError(f"QK-Clip: {name!r} is matched by {target.pattern!r} and "
                         f"{matches[name].target.pattern!r}")
      if leaf.ndim not in (2, 3):
        raise ValueError(f"QK-Clip: {name!r} must be [in, H*w] or [layers, in, H*w], "
                         f"got shape {leaf.shape}")
      if leaf.shape[-1] % target.head_width:
        raise ValueError(f"QK-Clip: {name!r} has {leaf.shape[-1]} output columns, not a multiple "
                         f"of the head width {target.head_width}")
      first = target.first_layer + (int(m.group("layer")) if "layer" in pattern.groupindex else 0)
      stacked = leaf.ndim == 3
      matches[name] = _Match(target, first, leaf.shape[0] if stacked else 1, stacked,
                             leaf.shape[-1])
      used.add(target.pattern)
  missing = [t.pattern for t in targets if t.pattern not in used]
  if missing:
    raise ValueError(f"QK-Clip: target pattern(s) {missing} match no parameter")
  num_layers = max((m.first_row + m.num_layers for m in matches.values()), default=0)
  return matches, num_layers


def check_max_logits(matches: dict[str, _Match], num_layers: int, shape) -> None:
  """ValueError unless max_logits of `shape` is [num_layers, H] with H heads in every target."""
  if len(shape) != 2 or shape[0] != num_layers:
    raise ValueError(f"max_logits must be [{num_layers}, heads] (the layers the QK-Clip targets "
                     f"cover), got shape {tuple(shape)}")
  for name, m in matches.items():
    if m.columns != shape[1] * m.target.head_width:
      raise ValueError(f"QK-Clip: {name!r} has {m.columns} output columns, not {shape[1]} heads "
                       f"x {m.target.head_width} (max_logits has {shape[1]} heads)")


def clip_gamma(max_logits_LH: jax.Array, tau: float) -> jax.Array:
  """gamma [L, H] = tau / S_max where S_max > tau, else exactly 1."""
  s_LH = max_logits_LH.astype(jnp.float32)
  return jnp.where(s_LH > tau, tau / jnp.where(s_LH > tau, s_LH, 1.0), 1.0)


def _column_scale(gamma_NH: jax.Array, segments) -> jax.Array:
  """[N, H*w] scale of every output column: gamma ** exponent per head segment."""
  parts = []
  for width, exponent in segments:
    g_NH = {0.0: jnp.ones_like(gamma_NH), 0.5: jnp.sqrt(gamma_NH), 1.0: gamma_NH}[exponent]
    parts.append(jnp.broadcast_to(g_NH[..., None], (*g_NH.shape, width)))
  s_NHW = jnp.concatenate(parts, axis=-1)
  return s_NHW.reshape(s_NHW.shape[0], -1)


def qk_clip(updates, params, max_logits_LH: jax.Array, tau: float,
            matches: dict[str, _Match]):
  """Updates whose apply_updates gives the clipped updated weights; plus clip metrics.

  Columns that are not clipped keep their update unchanged, so apply_updates gives them exactly
  params + updates.
  """
  gamma_LH = clip_gamma(max_logits_LH, tau)

  def clip_leaf(path, u, p):
    match = matches.get(path_str(path))
    if match is None:
      return u
    gamma_NH = gamma_LH[match.first_row:match.first_row + match.num_layers]
    scale_NC = _column_scale(gamma_NH, match.target.segments)
    scale = scale_NC[:, None, :] if match.stacked else scale_NC
    w_new = (p.astype(jnp.float32) + u.astype(jnp.float32)) * scale
    return jnp.where(scale != 1.0, (w_new - p.astype(jnp.float32)).astype(u.dtype), u)

  updates = jax.tree_util.tree_map_with_path(clip_leaf, updates, params)
  clipped_LH = max_logits_LH > tau
  metrics = {"qk_clip/clipped_heads": jnp.sum(clipped_LH, axis=-1, dtype=jnp.int32),
             "qk_clip/min_gamma": jnp.min(gamma_LH)}
  return updates, metrics
