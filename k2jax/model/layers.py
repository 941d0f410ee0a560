"""Building blocks: the matmul every layer uses, Dense, RMSNorm and the SwiGLU MLP.

Every parameter is created with logical axis names (MaxText style); `k2jax.sharding` maps them to
mesh axes. Matmuls cast their operands to the compute dtype and accumulate in float32
(`preferred_element_type`); everything between matmuls stays float32.

`dense` (Dense's matmul) and `swiglu` have custom VJPs whose backward matmuls also run in the
compute dtype (plain autodiff would meet the float32 cotangent and run them in float32) and
return gradients in the operands' dtypes. On XLA:CPU the fast bf16 kernel takes row-major
[M, K] @ [K, N] dots or A @ B^T; a contraction over the leading (row) axis is slow, so weight
gradients transpose one operand with a gather first (`transposed`). Attention's batched einsums
keep plain autodiff (`matmul`): XLA:CPU has no bf16 x bf16 -> f32 kernel for some of the dot
layouts their bf16 backward takes.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig


def matmul(eq: str, a: jnp.ndarray, b: jnp.ndarray, dtype) -> jnp.ndarray:
  """einsum in `dtype` with float32 accumulation and output (full precision when float32).
  Plain autodiff would run its backward matmuls in float32 (the cotangent's dtype): `dense` and
  `swiglu` give theirs custom VJPs; attention keeps plain autodiff."""
  dtype = jnp.dtype(dtype)
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jnp.einsum(eq, a.astype(dtype), b.astype(dtype), precision=precision,
                    preferred_element_type=jnp.float32)


def transposed(a_GIJ: jnp.ndarray) -> jnp.ndarray:
  """a with its last two axes swapped, built by a gather: XLA folds a plain transpose into the
  dot that consumes it, and XLA:CPU then runs that dot in float32, off its fast bf16 kernel."""
  G, I, J = a_GIJ.shape
  start_GJ3 = jnp.stack(jnp.broadcast_arrays(
      jnp.arange(G)[:, None], jnp.zeros((1, J), jnp.int32), jnp.arange(J)[None, :]), axis=-1)
  dnums = jax.lax.GatherDimensionNumbers(offset_dims=(2,), collapsed_slice_dims=(0, 2),
                                         start_index_map=(0, 1, 2))
  return jax.lax.gather(a_GIJ, start_GJ3, dnums, (1, I, 1))


def weight_grad(a_GMI: jnp.ndarray, b_GMJ: jnp.ndarray, dtype) -> jnp.ndarray:
  """a^T @ b per group [G, I, J] (a contraction over rows): transposes the narrower operand."""
  if a_GMI.shape[-1] <= b_GMJ.shape[-1]:
    return matmul("gim,gmj->gij", transposed(a_GMI.astype(dtype)), b_GMJ, dtype)
  return transposed(matmul("gjm,gmi->gji", transposed(b_GMJ.astype(dtype)), a_GMI, dtype))


def dense(x_MI: jnp.ndarray, w_IO: jnp.ndarray, dtype) -> jnp.ndarray:
  """x @ w over x's last axis (any leading axes), as `matmul`, but the backward runs in `dtype`
  too: dx = dy @ w^T, dw = x^T @ dy (`weight_grad`), gradients in the operands' dtypes."""
  return _dense((jnp.dtype(dtype), x_MI.dtype, w_IO.dtype), x_MI, w_IO)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(dtypes, x_MI, w_IO):
  """dtypes: (compute, x's, w's)."""
  return matmul("...i,io->...o", x_MI, w_IO, dtypes[0])


def _dense_fwd(dtypes, x_MI, w_IO):
  return _dense(dtypes, x_MI, w_IO), (x_MI.astype(dtypes[0]), w_IO.astype(dtypes[0]))


def _dense_bwd(dtypes, res, dy_MO):
  (dtype, x_dtype, w_dtype), (x_MI, w_IO) = dtypes, res
  dy_MO = dy_MO.astype(dtype)
  dx_MI = matmul("...o,io->...i", dy_MO, w_IO, dtype)  # A @ B^T: on XLA:CPU's fast path
  dw_IO = weight_grad(x_MI.reshape(1, -1, x_MI.shape[-1]),
                      dy_MO.reshape(1, -1, dy_MO.shape[-1]), dtype)[0]
  return dx_MI.astype(x_dtype), dw_IO.astype(w_dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def fuse_swiglu_weights(wg_GDF, wu_GDF, wd_GFD, dtype):
  """gate|up fused [G, D, 2F] and down [G, F, D], in `dtype`."""
  return jnp.concatenate([wg_GDF, wu_GDF], axis=-1).astype(dtype), wd_GFD.astype(dtype)


def swiglu_rows_fwd(x_GMD, wgu_GDH, wd_GFD, w_GM, dtype):
  """y = (w * silu(x @ gate) * (x @ up)) @ down per group (gate|up fused: wgu [G, D, 2F]);
  returns y float32 and the gate|up pre-activations in `dtype` (the backward's residual)."""
  gu_GMH = matmul("gmd,gdh->gmh", x_GMD, wgu_GDH, dtype)
  g_GMF, u_GMF = jnp.split(gu_GMH, 2, axis=-1)
  h_GMF = jax.nn.silu(g_GMF) * u_GMF * w_GM[..., None]
  return matmul("gmf,gfd->gmd", h_GMF, wd_GFD, dtype), gu_GMH.astype(dtype)


def swiglu_rows_bwd(x_GMD, wgu_GDH, wd_GFD, w_GM, gu_GMH, dy_GMD, dtype):
  """Cotangents (dx, dwgu, dwd, dw per row; float32) of `swiglu_rows_fwd` given dy."""
  dy_GMD = dy_GMD.astype(dtype)
  g_GMF, u_GMF = jnp.split(gu_GMH.astype(jnp.float32), 2, axis=-1)
  sig_GMF = jax.nn.sigmoid(g_GMF)
  act_GMF = g_GMF * sig_GMF
  dwh_GMF = matmul("gmd,gdf->gmf", dy_GMD, transposed(wd_GFD), dtype)
  dw_GM = jnp.sum(act_GMF * u_GMF * dwh_GMF, axis=-1)
  dh_GMF = dwh_GMF * w_GM[..., None]
  dgu_GMH = jnp.concatenate([dh_GMF * u_GMF * sig_GMF * (1 + g_GMF * (1 - sig_GMF)),
                             dh_GMF * act_GMF], axis=-1).astype(dtype)
  dwd_GFD = weight_grad((act_GMF * u_GMF * w_GM[..., None]).astype(dtype), dy_GMD, dtype)
  dx_GMD = matmul("gmh,ghd->gmd", dgu_GMH, transposed(wgu_GDH), dtype)
  return dx_GMD, weight_grad(x_GMD, dgu_GMH, dtype), dwd_GFD, dw_GM


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def swiglu(x_TD, wg_DF, wu_DF, wd_FD, dtype=jnp.float32):
  """SwiGLU down(silu(x @ gate) * (x @ up)), float32 out: the dense FFN, the shared experts and
  (through `swiglu_rows_*`) each routed expert. Matmuls in `dtype` accumulating in float32,
  forward and backward."""
  return _swiglu_fwd(x_TD, wg_DF, wu_DF, wd_FD, dtype)[0]


def _swiglu_fwd(x_TD, wg_DF, wu_DF, wd_FD, dtype):
  wgu_1DH, wd_1FD = fuse_swiglu_weights(wg_DF[None], wu_DF[None], wd_FD[None], dtype)
  w_1T = jnp.ones((1, x_TD.shape[0]), jnp.float32)
  y_1TD, gu_1TH = swiglu_rows_fwd(x_TD.astype(dtype)[None], wgu_1DH, wd_1FD, w_1T, dtype)
  return y_1TD[0], (x_TD, wg_DF, wu_DF, wd_FD, gu_1TH)


def _swiglu_bwd(dtype, res, dy_TD):
  x_TD, wg_DF, wu_DF, wd_FD, gu_1TH = res
  wgu_1DH, wd_1FD = fuse_swiglu_weights(wg_DF[None], wu_DF[None], wd_FD[None], dtype)
  w_1T = jnp.ones((1, x_TD.shape[0]), jnp.float32)
  dx_1TD, dwgu_1DH, dwd_1FD, _ = swiglu_rows_bwd(x_TD.astype(dtype)[None], wgu_1DH, wd_1FD,
                                                 w_1T, gu_1TH, dy_TD[None], dtype)
  grads = (dx_1TD[0], *jnp.split(dwgu_1DH[0], 2, axis=-1), dwd_1FD[0])
  return tuple(g.astype(a.dtype) for g, a in zip(grads, (x_TD, wg_DF, wu_DF, wd_FD)))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def normal_init(cfg: ModelConfig, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def _kernel(module: nn.Module, shape: tuple[int, int], axes) -> jnp.ndarray:
  return module.param("kernel", normal_init(module.cfg, axes), shape,
                      jnp.dtype(module.cfg.param_dtype))


class Kernel(nn.Module):
  """Just Dense's weight (same name, shape and axes), for layers that do their own matmuls."""

  cfg: ModelConfig
  shape: tuple[int, int]
  axes: tuple[str | None, str | None]

  @nn.compact
  def __call__(self) -> jnp.ndarray:
    return _kernel(self, self.shape, self.axes)


class Dense(nn.Module):
  """y = x @ kernel, kernel [in, out] with logical axes `axes`, no bias."""

  cfg: ModelConfig
  features: int
  axes: tuple[str | None, str | None]

  @nn.compact
  def __call__(self, x_BTi: jnp.ndarray) -> jnp.ndarray:
    kernel_io = _kernel(self, (x_BTi.shape[-1], self.features), self.axes)
    return dense(x_BTi, kernel_io, self.cfg.dtype)


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
  """SwiGLU: down(silu(gate(x)) * up(x)); the dense FFN and the shared experts (`swiglu`)."""

  cfg: ModelConfig
  width: int

  @nn.compact
  def __call__(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
    cfg, D, F = self.cfg, x_BTD.shape[-1], self.width
    wg_DF = Kernel(cfg, (D, F), ("embed", "mlp"), name="gate")()
    wu_DF = Kernel(cfg, (D, F), ("embed", "mlp"), name="up")()
    wd_FD = Kernel(cfg, (F, D), ("mlp", "embed"), name="down")()
    y_TD = swiglu(x_BTD.reshape(-1, D), wg_DF, wu_DF, wd_FD, jnp.dtype(cfg.dtype))
    return y_TD.reshape(x_BTD.shape)
