"""Decoupled RoPE of MLA with optional YaRN frequency interpolation (DeepSeek-V3).

Only the last `qk_rope_head_dim` dims of each query head and the shared key `k_pe` rotate. Pairs are
interleaved, (2i, 2i+1), DeepSeek's complex form. YaRN follows DeepSeek's `find_correction_dim` /
linear-ramp formulas as Hugging Face implements them, including its `attention_factor` on cos/sin.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig, yarn_mscale


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [dr/2] (float32) and the cos/sin scale (`attention_factor`)."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  rs = cfg.rope_scaling
  if rs is None:
    return inv_freq.astype(np.float32), 1.0
  factor = float(rs["factor"])
  orig = rs["original_max_position_embeddings"]
  beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
  attention_factor = rs.get("attention_factor")
  if attention_factor is None:
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
      attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
      attention_factor = yarn_mscale(factor)

  def correction_dim(rotations):
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if rs.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
  return inv_freq.astype(np.float32), float(attention_factor)


def apply_rope(x_BTHR: jnp.ndarray, positions_BT: jnp.ndarray, cfg: ModelConfig) -> jnp.ndarray:
  """Rotates interleaved pairs of the last axis by position; computed in float32."""
  inv_freq, scale = rope_frequencies(cfg)
  angles_BTR = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  cos = (jnp.cos(angles_BTR) * scale)[:, :, None, :]
  sin = (jnp.sin(angles_BTR) * scale)[:, :, None, :]
  x = x_BTHR.astype(jnp.float32)
  x1, x2 = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.reshape(x.shape)
