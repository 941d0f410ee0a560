"""Multi-head Latent Attention (MLA): full-sequence and compressed-cache paths.

q = q_b(RMSNorm(q_a(x))) (or q_proj(x)); [c | k_pe] = kv_a(x); [k_nope | v] = kv_b(RMSNorm(c)).
The rotary parts (last dr dims of every query head, and the one shared key k_pe) get RoPE.
Also records, per head, the signed maximum pre-softmax logit over the visible pairs: QK-Clip's
S_max. Visible: causal and, for packed rows (`segment_ids`), inside one segment, never padding.

With `decode=True` only RMSNorm(c) and RoPE(k_pe) are cached per token (the "cache" collection:
latent [B, S, kv_lora], rope_key [B, S, dr]); kv_b's key rows are absorbed into the query and its
value rows applied after attention, so keys and values are never expanded per head.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from einops import rearrange

from k2jax.config import ModelConfig, softmax_scale
from k2jax.model.layers import Dense, Kernel, RMSNorm, dense, matmul
from k2jax.model.rope import apply_rope

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm, whatever rms_norm_eps says (HF and DS).


def visible_pairs(T: int, segment_ids_BT: jnp.ndarray | None) -> jnp.ndarray:
  """[B or 1, T, T] bool: query t sees key s when s <= t and, with packed segments, both lie in the
  same segment and it is not padding (segment 0)."""
  causal_1TS = jnp.tril(jnp.ones((1, T, T), dtype=bool))
  if segment_ids_BT is None:
    return causal_1TS
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_1TS & same_BTS & (segment_ids_BT > 0)[:, :, None]


def masked_softmax(logits_BHTS: jnp.ndarray, visible_BTS: jnp.ndarray):
  """(probs_BHTS, max_logits_H): softmax over visible keys and the per-head max visible logit.

  A query that sees no key (padding) gets all-zero probabilities, with finite gradients.
  """
  visible_BHTS = visible_BTS[:, None]
  max_logits_H = jnp.max(jnp.where(visible_BHTS, logits_BHTS, -jnp.inf), axis=(0, 2, 3))
  logits_BHTS = jnp.where(visible_BHTS, logits_BHTS, jnp.finfo(jnp.float32).min)
  return nn.softmax(logits_BHTS, axis=-1) * visible_BHTS, max_logits_H


def absorbed_attention(q_nope_BTHN, q_pe_BTHR, latent_BSC, rope_key_BSR, visible_BTS,
                       w_kv_CHK, cfg: ModelConfig):
  """MLA over cached latents with kv_b absorbed: (out_BTHV, max_logits_H).

  With kv_b's kernel W [C, H, dn+dv] = [W_k | W_v]: q.k_nope = (q_nope W_k^T) . latent and
  probs @ v = (probs @ latent) W_v.
  """
  dn = cfg.qk_nope_head_dim
  w_k_CHN, w_v_CHV = w_kv_CHK[..., :dn], w_kv_CHK[..., dn:]
  q_lat_BTHC = matmul("bthn,chn->bthc", q_nope_BTHN, w_k_CHN, cfg.dtype)
  logits_BHTS = (matmul("bthc,bsc->bhts", q_lat_BTHC, latent_BSC, cfg.dtype)
                 + matmul("bthr,bsr->bhts", q_pe_BTHR, rope_key_BSR, cfg.dtype))
  probs_BHTS, max_logits_H = masked_softmax(logits_BHTS * softmax_scale(cfg), visible_BTS)
  # (b, h, t) order: XLA:CPU has no bfloat16 kernel for this contraction into (b, t, h) at b > 1.
  out_BHTC = matmul("bhts,bsc->bhtc", probs_BHTS, latent_BSC, cfg.dtype)
  return matmul("bhtc,chv->bthv", out_BHTC, w_v_CHV, cfg.dtype), max_logits_H


def mla_cache(cfg: ModelConfig, layers: int, batch: int, length: int) -> dict:
  """The zeroed decode cache of `layers` stacked MLA layers for `length` positions: the normalised
  latent [layers, B, length, kv_lora] and the rotated key [layers, B, length, dr], compute dtype."""
  dtype = jnp.dtype(cfg.dtype)
  return {"latent": jnp.zeros((layers, batch, length, cfg.kv_lora_rank), dtype),
          "rope_key": jnp.zeros((layers, batch, length, cfg.qk_rope_head_dim), dtype)}


class MLA(nn.Module):
  cfg: ModelConfig
  decode: bool = False  # attend over the "cache" collection, written at positions_BT.

  @nn.compact
  def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray,
               segment_ids_BT: jnp.ndarray | None = None):
    """Returns (out_BTD, max_logits_H). `segment_ids_BT` (packed rows, 0 = padding): attention
    stays inside each segment; `positions_BT` restart in each segment (RoPE)."""
    cfg = self.cfg
    H, dn, dr, dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                     cfg.v_head_dim)
    if cfg.q_lora_rank is None:
      q = Dense(cfg, H * (dn + dr), ("embed", "heads"), name="q_proj")(x_BTD)
    else:
      q = Dense(cfg, cfg.q_lora_rank, ("embed", "q_lora"), name="q_a")(x_BTD)
      q = RMSNorm(cfg, LATENT_NORM_EPS, name="q_a_norm")(q)
      q = Dense(cfg, H * (dn + dr), ("q_lora", "heads"), name="q_b")(q)
    q_BTHK = rearrange(q, "b t (h k) -> b t h k", h=H)
    q_nope_BTHN = q_BTHK[..., :dn]
    q_pe_BTHR = apply_rope(q_BTHK[..., dn:], positions_BT, cfg)

    kv = Dense(cfg, cfg.kv_lora_rank + dr, ("embed", "kv_lora"), name="kv_a")(x_BTD)
    c_BTC = RMSNorm(cfg, LATENT_NORM_EPS, name="kv_a_norm")(kv[..., :cfg.kv_lora_rank])
    k_pe_BTR = apply_rope(kv[:, :, None, cfg.kv_lora_rank:], positions_BT, cfg)[:, :, 0]
    w_kv_CK = Kernel(cfg, (cfg.kv_lora_rank, H * (dn + dv)), ("kv_lora", "heads"), name="kv_b")()

    if self.decode:
      if not self.has_variable("cache", "latent"):
        raise ValueError("MLA(decode=True) needs variables['cache'] from "
                         "k2jax.model.transformer.init_cache")
      rows_B1 = jnp.arange(x_BTD.shape[0])[:, None]
      latent_BSC = self.get_variable("cache", "latent")
      rope_key_BSR = self.get_variable("cache", "rope_key")
      latent_BSC = latent_BSC.at[rows_B1, positions_BT].set(c_BTC.astype(latent_BSC.dtype))
      rope_key_BSR = rope_key_BSR.at[rows_B1, positions_BT].set(
          k_pe_BTR.astype(rope_key_BSR.dtype))
      self.put_variable("cache", "latent", latent_BSC)
      self.put_variable("cache", "rope_key", rope_key_BSR)
      visible_BTS = jnp.arange(latent_BSC.shape[1]) <= positions_BT[..., None]
      out_BTHV, max_logits_H = absorbed_attention(q_nope_BTHN, q_pe_BTHR, latent_BSC,
                                                  rope_key_BSR, visible_BTS,
                                                  rearrange(w_kv_CK, "c (h k) -> c h k", h=H), cfg)
    else:
      kv_BTHK = rearrange(dense(c_BTC, w_kv_CK, cfg.dtype), "b t (h k) -> b t h k", h=H)
      k_nope_BTHN, v_BTHV = kv_BTHK[..., :dn], kv_BTHK[..., dn:]
      q_BTHK = jnp.concatenate([q_nope_BTHN, q_pe_BTHR], axis=-1)
      k_BTHK = jnp.concatenate(
          [k_nope_BTHN, jnp.broadcast_to(k_pe_BTR[:, :, None], k_nope_BTHN.shape[:-1] + (dr,))],
          axis=-1)
      logits_BHTS = matmul("bthk,bshk->bhts", q_BTHK, k_BTHK, cfg.dtype) * softmax_scale(cfg)
      visible_BTS = visible_pairs(x_BTD.shape[1], segment_ids_BT)
      probs_BHTS, max_logits_H = masked_softmax(logits_BHTS, visible_BTS)
      out_BTHV = matmul("bhts,bshv->bthv", probs_BHTS, v_BTHV, cfg.dtype)
    out = Dense(cfg, x_BTD.shape[-1], ("heads", "embed"), name="o")(
        rearrange(out_BTHV, "b t h v -> b t (h v)"))
    return out, max_logits_H
