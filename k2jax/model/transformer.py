"""The K2 / DeepSeek-V3 decoder: embed, dense blocks, MoE blocks (each stack scanned), norm, head;
optionally DeepSeek-V3's multi-token-prediction (MTP) layers after them.

`logits_BTV, aux = Transformer(cfg).apply(variables, tokens_BT, positions_BT, segment_ids_BT)`.
Packed rows pass `segment_ids_BT` (1, 2, ... per sequence, 0 for padding) and `positions_BT`
(restarting at 0 in each sequence): attention never crosses a segment, padding neither attends nor
is attended, and the router's expert load skips padding. Without them a row is one sequence.
Each stack of identical blocks is one `nn.scan` with a leading `layers` axis on its parameters;
`scan_layers=False` unrolls the same scan, so the parameter layout never changes. aux carries what
training and MuonClip read: max_logits [L + K, H], expert_load [Lm + K, E] (K MTP layers last),
balance_loss [B] (per sequence, summed over MoE layers, unweighted), dropped_frac.

With K = cfg.num_nextn_predict_layers > 0, `next_tokens_BT` (the token after each position, a
train batch's targets; with packing also `next_segment_ids_BT`) runs the MTP layers
(k2jax.model.mtp) on the normed last hidden state and adds aux["mtp_logits"] [K, B, T, V]: depth k's
prediction of the token k + 1 ahead of each position. The main logits do not depend on it.

Decoding: `apply({**variables, "cache": cache}, tokens_BT, positions_BT, decode=True,
mutable=["cache"])` with `cache = init_cache(cfg, batch, length)` writes each token's compressed
MLA cache entry at its position and attends over the cached positions up to it. With "intermediates"
mutable too, `hidden_BTD` there is the last hidden state after the final norm (what the MTP reads).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax import sharding
from k2jax.config import ModelConfig
from k2jax.model import mtp
from k2jax.model.attention import mla_cache
from k2jax.model.block import block_stack
from k2jax.model.layers import Kernel, RMSNorm, dense
from k2jax.model.moe import update_router_bias

MOE_STACKS = ("moe_layers", "mtp_layers")  # the order of aux["expert_load"]'s rows.


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray | None = None,
               segment_ids_BT: jnp.ndarray | None = None, decode: bool = False,
               next_tokens_BT: jnp.ndarray | None = None,
               next_segment_ids_BT: jnp.ndarray | None = None):
    cfg = self.cfg
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32,
                     param_dtype=jnp.dtype(cfg.param_dtype), name="embed",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(cfg.init_std), ("vocab", "embed")))
    x_BTD = embed(tokens_BT)
    max_logits, moe_aux = [], []
    if cfg.num_dense_layers:
      x_BTD, dense_aux = block_stack(cfg, False, cfg.num_dense_layers, "dense_layers", decode)(
          x_BTD, positions_BT, segment_ids_BT)
      max_logits.append(dense_aux["max_logits"])
    if cfg.num_moe_layers:
      x_BTD, aux = block_stack(cfg, True, cfg.num_moe_layers, "moe_layers", decode)(
          x_BTD, positions_BT, segment_ids_BT)
      max_logits.append(aux["max_logits"])
      moe_aux.append(aux)
    x_BTD = RMSNorm(cfg, cfg.rms_norm_eps, name="final_norm")(x_BTD)
    self.sow("intermediates", "hidden_BTD", x_BTD)
    head_DV = Kernel(cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), name="lm_head")()
    logits_BTV = sharding.constrain(dense(x_BTD, head_DV, cfg.dtype), ("batch", "length", "vocab"))
    mtp_logits = {}
    if next_tokens_BT is not None:
      if not cfg.num_nextn_predict_layers:
        raise ValueError("Transformer: next_tokens_BT feeds the MTP layers, but "
                         "ModelConfig.num_nextn_predict_layers is 0")
      tokens_KBT, segment_ids_KBT = mtp.lookahead(next_tokens_BT, cfg.num_nextn_predict_layers,
                                                  segment_ids_BT, next_segment_ids_BT)
      _, (y_KBTD, aux) = mtp.mtp_stack(cfg, decode, name="mtp_layers")(
          x_BTD, (embed(tokens_KBT), segment_ids_KBT), positions_BT)
      max_logits.append(aux["max_logits"])
      moe_aux.append(aux)
      mtp_logits["mtp_logits"] = sharding.constrain(dense(y_KBTD, head_DV, cfg.dtype),
                                                    (None, "batch", "length", "vocab"))
    if moe_aux:
      cat = lambda key: jnp.concatenate([a[key] for a in moe_aux], axis=0)
      aux = {"expert_load": cat("expert_load"),
             "balance_loss": jnp.sum(cat("balance_loss"), axis=0),
             "dropped_frac": jnp.mean(cat("dropped_frac"))}
    else:
      aux = {"expert_load": jnp.zeros((0, cfg.n_routed_experts), jnp.float32),
             "balance_loss": jnp.zeros(tokens_BT.shape[:1], jnp.float32),
             "dropped_frac": jnp.zeros((), jnp.float32)}
    aux["max_logits"] = jnp.concatenate(max_logits, axis=0)
    return logits_BTV, {**aux, **mtp_logits}


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """The zeroed "cache" collection of the main model for `length` positions: per layer stack, the
  normalised latent [L, B, length, kv_lora] and the rotated key [L, B, length, dr], in the compute
  dtype (the MTP layers' own cache: `k2jax.model.mtp.init_cache`)."""
  return {name: {"attn": mla_cache(cfg, L, batch, length)}
          for name, L in (("dense_layers", cfg.num_dense_layers),
                          ("moe_layers", cfg.num_moe_layers)) if L}


def update_router(router: dict, load_LE: jnp.ndarray, rate: float, centered: bool = False) -> dict:
  """The "router" collection after auxiliary-loss-free balancing (`update_router_bias`), each MoE
  stack's correction bias moved by its own rows of aux["expert_load"]."""
  router, row = dict(router), 0
  for name in MOE_STACKS:
    if name in router:
      n = jax.tree.leaves(router[name])[0].shape[0]
      rows_LE = load_LE[row:row + n]
      router[name] = jax.tree.map(
          lambda b, rows_LE=rows_LE: update_router_bias(b, rows_LE, rate, centered), router[name])
      row += n
  return router


def _init(cfg: ModelConfig, rng: jax.Array):
  tokens_BT = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(rng, tokens_BT,
                               next_tokens_BT=tokens_BT if cfg.num_nextn_predict_layers else None)


def init_variables(cfg: ModelConfig, rng: jax.Array | int = 0) -> dict:
  """Freshly initialised variables {"params", "router"} as plain arrays."""
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  return nn.meta.unbox(jax.jit(_init, static_argnums=0)(cfg, rng))


def abstract_variables(cfg: ModelConfig) -> dict:
  """ShapeDtypeStructs of the variables, without allocating anything."""
  return nn.meta.unbox(jax.eval_shape(functools.partial(_init, cfg), jax.random.key(0)))


def logical_axes(cfg: ModelConfig) -> dict:
  """The variables' tree with a tuple of logical axis names per leaf."""
  boxed = jax.eval_shape(functools.partial(_init, cfg), jax.random.key(0))
  return jax.tree.map(lambda p: tuple(p.names), boxed,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
