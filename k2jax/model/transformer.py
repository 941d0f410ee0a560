"""The K2 / DeepSeek-V3 decoder: embed, dense blocks, MoE blocks (each stack scanned), norm, head.

`logits_BTV, aux = Transformer(cfg).apply(variables, tokens_BT, positions_BT, segment_ids_BT)`.
Packed rows pass `segment_ids_BT` (1, 2, ... per sequence, 0 for padding) and `positions_BT`
(restarting at 0 in each sequence): attention never crosses a segment, padding neither attends nor
is attended, and the router's expert load skips padding. Without them a row is one sequence.
Each stack of identical blocks is one `nn.scan` with a leading `layers` axis on its parameters;
`scan_layers=False` unrolls the same scan, so the parameter layout never changes. aux carries what
training and MuonClip read: max_logits [L, H], expert_load [Lm, E], balance_loss [B] (per sequence,
summed over MoE layers, unweighted), dropped_frac.

Decoding: `apply({**variables, "cache": cache}, tokens_BT, positions_BT, decode=True,
mutable=["cache"])` with `cache = init_cache(cfg, batch, length)` writes each token's compressed
MLA cache entry at its position and attends over the cached positions up to it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax import sharding
from k2jax.config import ModelConfig
from k2jax.model.attention import MLA
from k2jax.model.layers import MLP, Dense, RMSNorm
from k2jax.model.moe import MoE

REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Block(nn.Module):
  """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h)).
  Scan body: (x, positions, segment_ids) -> x."""

  cfg: ModelConfig
  moe: bool
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray,
               segment_ids_BT: jnp.ndarray | None):
    cfg = self.cfg
    x_BTD = sharding.constrain(x_BTD, ("batch", "length", "act_embed"))  # under a mesh only
    attn_BTD, max_logits_H = MLA(cfg, self.decode, name="attn")(
        RMSNorm(cfg, cfg.rms_norm_eps, name="attn_norm")(x_BTD), positions_BT, segment_ids_BT)
    h_BTD = x_BTD + attn_BTD
    y_BTD = RMSNorm(cfg, cfg.rms_norm_eps, name="ffn_norm")(h_BTD)
    aux = {"max_logits": max_logits_H}
    if self.moe:
      valid_BT = None if segment_ids_BT is None else segment_ids_BT > 0
      ffn_BTD, moe_aux = MoE(cfg, self.decode, name="moe")(y_BTD, valid_BT)
      aux.update(moe_aux)
    else:
      ffn_BTD = MLP(cfg, cfg.intermediate_size, name="mlp")(y_BTD)
    return h_BTD + ffn_BTD, aux


def block_stack(cfg: ModelConfig, moe: bool, length: int, name: str,
                decode: bool = False) -> nn.Module:
  """`length` Blocks as one scan over a leading `layers` axis (unrolled when not scan_layers)."""
  block = Block
  if cfg.remat != "none":
    block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  scanned = nn.scan(block, variable_axes={"params": 0, "router": 0, "cache": 0},
                    split_rngs={"params": True},
                    in_axes=nn.broadcast, length=length, unroll=1 if cfg.scan_layers else length,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(cfg, moe, decode, name=name)


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray | None = None,
               segment_ids_BT: jnp.ndarray | None = None, decode: bool = False):
    cfg = self.cfg
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    x_BTD = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32,
                     param_dtype=jnp.dtype(cfg.param_dtype), name="embed",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(cfg.init_std), ("vocab", "embed")))(tokens_BT)
    max_logits, aux = [], {}
    if cfg.num_dense_layers:
      x_BTD, dense_aux = block_stack(cfg, False, cfg.num_dense_layers, "dense_layers", decode)(
          x_BTD, positions_BT, segment_ids_BT)
      max_logits.append(dense_aux["max_logits"])
    if cfg.num_moe_layers:
      x_BTD, moe_aux = block_stack(cfg, True, cfg.num_moe_layers, "moe_layers", decode)(
          x_BTD, positions_BT, segment_ids_BT)
      max_logits.append(moe_aux["max_logits"])
      aux = {"expert_load": moe_aux["expert_load"],
             "balance_loss": jnp.sum(moe_aux["balance_loss"], axis=0),
             "dropped_frac": jnp.mean(moe_aux["dropped_frac"])}
    else:
      aux = {"expert_load": jnp.zeros((0, cfg.n_routed_experts), jnp.float32),
             "balance_loss": jnp.zeros(tokens_BT.shape[:1], jnp.float32),
             "dropped_frac": jnp.zeros((), jnp.float32)}
    aux["max_logits"] = jnp.concatenate(max_logits, axis=0)
    x_BTD = RMSNorm(cfg, cfg.rms_norm_eps, name="final_norm")(x_BTD)
    logits_BTV = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="lm_head")(x_BTD)
    logits_BTV = sharding.constrain(logits_BTV, ("batch", "length", "vocab"))
    return logits_BTV, aux


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """The zeroed "cache" collection for `length` positions: per layer stack, the normalised
  latent [L, B, length, kv_lora] and the rotated key [L, B, length, dr], in the compute dtype."""
  dtype = jnp.dtype(cfg.dtype)
  cache = {}
  for name, L in (("dense_layers", cfg.num_dense_layers), ("moe_layers", cfg.num_moe_layers)):
    if L:
      cache[name] = {"attn": {
          "latent": jnp.zeros((L, batch, length, cfg.kv_lora_rank), dtype),
          "rope_key": jnp.zeros((L, batch, length, cfg.qk_rope_head_dim), dtype)}}
  return cache


def _init(cfg: ModelConfig, rng: jax.Array):
  return Transformer(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))


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
