"""RoPE and YaRN against a float64 numpy transcription of DeepSeek's complex-number reference."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import presets
from k2jax.model.rope import apply_rope


def ds_reference(x, positions, dim, base, yarn):
  """DeepSeek-V3 inference/model.py: precompute_freqs_cis + apply_rotary_emb, in float64."""
  freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if yarn is not None:
    factor, orig = yarn["factor"], yarn["original_max_position_embeddings"]

    def corr(rot):
      return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(yarn["beta_fast"])), 0)
    high = min(math.ceil(corr(yarn["beta_slow"])), dim - 1)
    high = high + 0.001 if low == high else high
    smooth = 1 - np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    freqs = freqs / factor * (1 - smooth) + freqs * smooth
  cis = np.exp(1j * positions[..., None] * freqs)[:, :, None, :]
  xc = x[..., 0::2] + 1j * x[..., 1::2]
  y = xc * cis
  return np.stack([y.real, y.imag], axis=-1).reshape(x.shape)


@pytest.mark.parametrize("preset", ["kimi_k2", "deepseek_v3", "moonlight_16b_a3b"])
def test_rope_matches_deepseek_reference(preset):
  cfg = presets.get(preset)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, cfg.qk_rope_head_dim))
  positions = np.array([[0, 1, 2, 3, 4], [100, 2000, 4095, 9000, 60000]])
  got = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), cfg))
  want = ds_reference(x, positions.astype(np.float64), cfg.qk_rope_head_dim, cfg.rope_theta,
                      cfg.rope_scaling)
  # float32 angles at position 6e4 carry ~4e-3 absolute error; small positions are near exact.
  np.testing.assert_allclose(got[0], want[0], atol=2e-5)
  np.testing.assert_allclose(got[1], want[1], atol=2e-2)


def test_rope_preserves_norm_and_relative_position():
  cfg = presets.get("k2_nano")
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, cfg.qk_rope_head_dim)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, cfg.qk_rope_head_dim)), jnp.float32)

  def dot(pq, pk):
    rq, rk = apply_rope(q, jnp.array([[pq]]), cfg), apply_rope(k, jnp.array([[pk]]), cfg)
    return float(jnp.sum(rq * rk))

  assert dot(7, 3) == pytest.approx(dot(104, 100), rel=1e-4)
  assert dot(7, 3) != pytest.approx(dot(7, 4), rel=1e-3)
  rotated = apply_rope(q, jnp.array([[37]]), cfg)
  assert float(jnp.linalg.norm(rotated)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)
