"""layers.dense and layers.swiglu: their custom VJPs against autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import presets
from k2jax.model.layers import MLP, dense, swiglu

HIGHEST = jax.lax.Precision.HIGHEST
TOLERANCES = ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2))


def assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max())


def grads(fn, *args):
  """(fn(*args), gradients of sum(fn(*args) * a fixed random cotangent))."""
  out = fn(*args)
  dy = jax.random.normal(jax.random.key(99), out.shape)
  return out, jax.grad(lambda *a: jnp.sum(fn(*a) * dy), argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("x_shape,w_shape", [((2, 5, 6), (6, 7)), ((9, 7), (7, 4))])
def test_dense_vjp_matches_autodiff(x_shape, w_shape):
  kx, kw = jax.random.split(jax.random.key(0))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  want = grads(lambda x, w: jnp.einsum("...i,io->...o", x, w, precision=HIGHEST), x, w)
  for dtype, rtol in TOLERANCES:
    got = grads(lambda x, w, dt=dtype: dense(x, w, dt), x, w)
    assert got[0].dtype == jnp.float32 and got[1][1].dtype == jnp.float32
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(g, w_, rtol)


def test_dense_keeps_operand_dtypes_in_gradients():
  x, w = jnp.ones((4, 3), jnp.bfloat16), jnp.ones((3, 2), jnp.float32)
  dx, dw = jax.grad(lambda x, w: jnp.sum(dense(x, w, jnp.bfloat16)), argnums=(0, 1))(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32


def test_swiglu_vjp_matches_autodiff():
  ks = jax.random.split(jax.random.key(1), 4)
  T, D, F = 9, 8, 12
  args = (jax.random.normal(ks[0], (T, D)), jax.random.normal(ks[1], (D, F)) * D**-0.5,
          jax.random.normal(ks[2], (D, F)) * D**-0.5, jax.random.normal(ks[3], (F, D)) * F**-0.5)

  def plain(x, wg, wu, wd):
    h = jax.nn.silu(jnp.dot(x, wg, precision=HIGHEST)) * jnp.dot(x, wu, precision=HIGHEST)
    return jnp.dot(h, wd, precision=HIGHEST)

  want = grads(plain, *args)
  for dtype, rtol in TOLERANCES:
    got = grads(lambda *a, dt=dtype: swiglu(*a, dt), *args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(g, w, rtol)


def test_mlp_keeps_the_dense_parameter_layout():
  cfg = presets.get("k2_nano")
  x = jnp.ones((2, 3, cfg.hidden_size))
  params = jax.eval_shape(MLP(cfg, 20).init, jax.random.key(0), x)["params"]
  shapes = jax.tree.map(lambda p: p.value.shape, params,
                        is_leaf=lambda p: hasattr(p, "names"))
  D = cfg.hidden_size
  assert shapes == {"gate": {"kernel": (D, 20)}, "up": {"kernel": (D, 20)},
                    "down": {"kernel": (20, D)}}
