"""Multi-head Latent Attention (MLA), the training / full-sequence path (K2_SPEC §2).

q = q_b(RMSNorm(q_a(x))) (or q_proj(x)); [c | k_pe] = kv_a(x); [k_nope | v] = kv_b(RMSNorm(c)).
The rotary parts (last dr dims of every query head, and the one shared key k_pe) get RoPE.
Also records, per head, the signed maximum pre-softmax logit over causally visible pairs:
QK-Clip's S_max.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from einops import rearrange

from k2jax.config import ModelConfig, softmax_scale
from k2jax.model.layers import Dense, RMSNorm, matmul
from k2jax.model.rope import apply_rope

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm, whatever rms_norm_eps says (HF and DS).


class MLA(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray):
    """Returns (out_BTD, max_logits_H)."""
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
    q_nope_BTHN, q_pe_BTHR = q_BTHK[..., :dn], q_BTHK[..., dn:]

    kv = Dense(cfg, cfg.kv_lora_rank + dr, ("embed", "kv_lora"), name="kv_a")(x_BTD)
    c_BTC, k_pe_BTR = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
    c_BTC = RMSNorm(cfg, LATENT_NORM_EPS, name="kv_a_norm")(c_BTC)
    kv = Dense(cfg, H * (dn + dv), ("kv_lora", "heads"), name="kv_b")(c_BTC)
    kv_BTHK = rearrange(kv, "b t (h k) -> b t h k", h=H)
    k_nope_BTHN, v_BTHV = kv_BTHK[..., :dn], kv_BTHK[..., dn:]

    q_pe_BTHR = apply_rope(q_pe_BTHR, positions_BT, cfg)
    k_pe_BT1R = apply_rope(k_pe_BTR[:, :, None, :], positions_BT, cfg)
    q_BTHK = jnp.concatenate([q_nope_BTHN, q_pe_BTHR], axis=-1)
    k_BTHK = jnp.concatenate(
        [k_nope_BTHN, jnp.broadcast_to(k_pe_BT1R, k_nope_BTHN.shape[:-1] + (dr,))], axis=-1)

    logits_BHTS = matmul("bthk,bshk->bhts", q_BTHK, k_BTHK, cfg.dtype) * softmax_scale(cfg)
    T = x_BTD.shape[1]
    causal_TS = jnp.tril(jnp.ones((T, T), dtype=bool))
    logits_BHTS = jnp.where(causal_TS, logits_BHTS, -jnp.inf)
    max_logits_H = jnp.max(logits_BHTS, axis=(0, 2, 3))
    probs_BHTS = nn.softmax(logits_BHTS, axis=-1)
    out_BTHV = matmul("bhts,bshv->bthv", probs_BHTS, v_BTHV, cfg.dtype)
    out = Dense(cfg, x_BTD.shape[-1], ("heads", "embed"), name="o")(
        rearrange(out_BTHV, "b t h v -> b t (h v)"))
    return out, max_logits_H
