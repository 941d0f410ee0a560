"""Building blocks: the matmul every layer uses, Dense, RMSNorm and the SwiGLU MLP.

Every parameter is created with logical axis names (MaxText style); `k2jax.sharding` maps them to
mesh axes. Matmuls cast their operands to the compute dtype and accumulate in float32
(`preferred_element_type`); everything between matmuls stays float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig


def matmul(eq: str, a: jnp.ndarray, b: jnp.ndarray, dtype) -> jnp.ndarray:
  """einsum in `dtype` with float32 accumulation and output (full precision when float32)."""
  dtype = jnp.dtype(dtype)
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jnp.einsum(eq, a.astype(dtype), b.astype(dtype), precision=precision,
                    preferred_element_type=jnp.float32)


def normal_init(cfg: ModelConfig, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


class Dense(nn.Module):
  """y = x @ kernel, kernel [in, out] with logical axes `axes`, no bias."""

  cfg: ModelConfig
  features: int
  axes: tuple[str | None, str | None]

  @nn.compact
  def __call__(self, x_BTi: jnp.ndarray) -> jnp.ndarray:
    kernel_io = self.param("kernel", normal_init(self.cfg, self.axes),
                           (x_BTi.shape[-1], self.features), jnp.dtype(self.cfg.param_dtype))
    return matmul("...i,io->...o", x_BTi, kernel_io, self.cfg.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * scale in float32 (HF DeepseekV3RMSNorm)."""

  cfg: ModelConfig
  eps: float

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.dtype(self.cfg.param_dtype))
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return x * scale.astype(jnp.float32)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); the dense FFN and the shared experts."""

  cfg: ModelConfig
  width: int

  @nn.compact
  def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
    gate = Dense(self.cfg, self.width, ("embed", "mlp"), name="gate")(x_BTD)
    up = Dense(self.cfg, self.width, ("embed", "mlp"), name="up")(x_BTD)
    return Dense(self.cfg, x_BTD.shape[-1], ("mlp", "embed"), name="down")(nn.silu(gate) * up)
