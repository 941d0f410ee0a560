"""Routed-expert dispatch paths and the dense SwiGLU against a naive per-assignment reference."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.model.dispatch import DISPATCHES, auto_block_size, routed_experts
from k2jax.model.layers import swiglu

T, D, E, K, F = 48, 16, 8, 2, 12
HIGHEST = jax.lax.Precision.HIGHEST
BALANCED_IDX_TK = (jnp.arange(T)[:, None] * K + jnp.arange(K)[None, :]) % E  # T*K/E rows each


def reference(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD):
  """Per (token, k): the chosen expert's weights gathered per token, float32, full precision."""
  y_TD = jnp.zeros(x_TD.shape, jnp.float32)
  for k in range(idx_TK.shape[1]):
    e_T = idx_TK[:, k]
    g_TF = jnp.einsum("td,tdf->tf", x_TD, wg_EDF[e_T], precision=HIGHEST)
    u_TF = jnp.einsum("td,tdf->tf", x_TD, wu_EDF[e_T], precision=HIGHEST)
    h_TF = jax.nn.silu(g_TF) * u_TF
    y_TD += w_TK[:, k:k + 1] * jnp.einsum("tf,tfd->td", h_TF, wd_EFD[e_T], precision=HIGHEST)
  return y_TD


def make_inputs(seed=0, skew=0.0, t=T, e=E, k=K):
  """Routing = top-k of random logits; `skew` adds to expert 0's logit (many tokens pick it)."""
  ks = jax.random.split(jax.random.key(seed), 6)
  logits_TE = jax.random.normal(ks[0], (t, e)).at[:, 0].add(skew)
  w_TK, idx_TK = jax.lax.top_k(jax.nn.sigmoid(logits_TE), k)
  return dict(
      x_TD=jax.random.normal(ks[1], (t, D)),
      idx_TK=idx_TK,
      w_TK=w_TK / jnp.sum(w_TK, axis=-1, keepdims=True),
      wg_EDF=jax.random.normal(ks[2], (e, D, F)) * D**-0.5,
      wu_EDF=jax.random.normal(ks[3], (e, D, F)) * D**-0.5,
      wd_EFD=jax.random.normal(ks[4], (e, F, D)) * F**-0.5,
      dy_TD=jax.random.normal(ks[5], (t, D)))


DIFF_ARGS = ("x_TD", "w_TK", "wg_EDF", "wu_EDF", "wd_EFD")


@functools.lru_cache
def _grad_fn(fn):
  def loss(x_TD, w_TK, wg_EDF, wu_EDF, wd_EFD, idx_TK, dy_TD):
    y_TD = fn(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD)
    return jnp.sum(y_TD * dy_TD), y_TD
  return jax.jit(jax.grad(loss, argnums=range(5), has_aux=True))


def value_and_grads(fn, inp):
  """fn(x, idx, w, wg, wu, wd) -> y; returns y and d<y, dy>/d(x, w, wg, wu, wd)."""
  grads, y_TD = _grad_fn(fn)(*(inp[n] for n in DIFF_ARGS), inp["idx_TK"], inp["dy_TD"])
  return y_TD, dict(zip(DIFF_ARGS, grads))


def run(inp, **kwargs):
  """routed_experts jitted (routing traced): (y_TD, dropped_frac)."""
  fn = jax.jit(functools.partial(routed_experts, **kwargs))
  return fn(*(inp[n] for n in ("x_TD", "idx_TK", "w_TK", "wg_EDF", "wu_EDF", "wd_EFD")))


def assert_close(got, want, rtol):
  """Max abs error relative to the reference's max magnitude."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.max(np.abs(got - want)) <= rtol * np.max(np.abs(want)), (
      f"max err {np.max(np.abs(got - want)):.3g} vs scale {np.max(np.abs(want)):.3g}")


def check_against_reference(inp, rtol=1e-5, **kwargs):
  y, g = value_and_grads(lambda *a: routed_experts(*a, **kwargs)[0], inp)
  y_ref, g_ref = value_and_grads(reference, inp)
  assert_close(y, y_ref, rtol)
  for name in DIFF_ARGS:
    assert_close(g[name], g_ref[name], rtol)


def expert_loads(idx_TK):
  return np.bincount(np.asarray(idx_TK).reshape(-1), minlength=E)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_paths_match_reference_when_nothing_drops(dispatch):
  inp = make_inputs(seed=1)
  check_against_reference(inp, dispatch=dispatch, capacity_factor=float(E), block_size=4)
  assert float(run(inp, dispatch=dispatch, capacity_factor=float(E))[1]) == 0.0


@pytest.mark.parametrize("block_size", [0, 1, 5, 64])
def test_sort_skewed_routing_takes_block_layout_and_stays_exact(block_size):
  inp = make_inputs(seed=2, skew=4.0)
  loads = expert_loads(inp["idx_TK"])
  capacity = math.ceil(1.25 * T * K / E)
  assert loads.max() > capacity  # the overloaded expert forces the block layout
  check_against_reference(inp, dispatch="sort", capacity_factor=1.25, block_size=block_size)


def test_sort_balanced_routing_takes_capacity_layout_and_stays_exact():
  inp = {**make_inputs(seed=3), "idx_TK": BALANCED_IDX_TK}
  assert expert_loads(BALANCED_IDX_TK).max() <= math.ceil(1.0 * T * K / E)
  check_against_reference(inp, dispatch="sort", capacity_factor=1.0, block_size=7)


def test_auto_block_size_is_a_power_of_two_near_half_the_mean_load():
  assert auto_block_size(8 * 512 * 8, 64) == 256  # mean load 512 (benchmarks/moe_dispatch.py)
  assert auto_block_size(4 * 512 * 8, 64) == 128
  assert auto_block_size(1000, 64) == 8  # mean 15.6: clamped up
  assert auto_block_size(10**7, 8) == 8192  # clamped down
  assert auto_block_size(40960, 6) == 2048  # K2 on 512 chips, expert=64: 26 blocks, not 86
  for a, e in [(300, 4), (4096, 384), (77777, 13)]:
    b = auto_block_size(a, e)
    assert b & (b - 1) == 0 and 8 <= b <= 8192
    assert b in (8, 8192) or b <= a / (2 * e) < 2 * b


def test_capacity_drops_overflow_in_token_order():
  inp = make_inputs(seed=4, skew=2.0)
  capacity_factor = 0.5
  capacity = math.ceil(capacity_factor * T * K / E)
  idx = np.asarray(inp["idx_TK"])
  keep = np.zeros(idx.shape, bool)
  for e in range(E):
    t_k = np.argwhere(idx == e)  # row-major: token order
    keep[tuple(t_k[:capacity].T)] = True
  assert (~keep).sum() > 0
  kept = {**inp, "w_TK": jnp.where(jnp.asarray(keep), inp["w_TK"], 0.0)}
  y, g = value_and_grads(lambda *a: routed_experts(
      *a, dispatch="capacity", capacity_factor=capacity_factor)[0], inp)
  y_ref, g_ref = value_and_grads(reference, kept)
  assert_close(y, y_ref, 1e-5)
  for name in ("x_TD", "wg_EDF", "wu_EDF", "wd_EFD"):
    assert_close(g[name], g_ref[name], 1e-5)
  assert_close(np.where(keep, g["w_TK"], 0.0), np.where(keep, g_ref["w_TK"], 0.0), 1e-5)
  np.testing.assert_array_equal(np.asarray(g["w_TK"])[~keep], 0.0)
  dropped = run(inp, dispatch="capacity", capacity_factor=capacity_factor)[1]
  assert float(dropped) == pytest.approx((~keep).sum() / keep.size, abs=1e-7)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_bfloat16_compute_close_to_float32_reference(dispatch):
  inp = make_inputs(seed=5, skew=1.0)
  check_against_reference(inp, rtol=3e-2, dispatch=dispatch, dtype=jnp.bfloat16,
                          capacity_factor=float(E), block_size=8)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_one_compilation_serves_any_routing(dispatch):
  capacity_factor = float(E) if dispatch == "capacity" else 1.0  # nothing drops
  fn = jax.jit(functools.partial(routed_experts, dispatch=dispatch,
                                 capacity_factor=capacity_factor))
  balanced = {**make_inputs(seed=8), "idx_TK": BALANCED_IDX_TK}
  for inp in (balanced, make_inputs(seed=9, skew=5.0)):  # "sort": capacity, then block layout
    args = [inp[n] for n in ("x_TD", "idx_TK", "w_TK", "wg_EDF", "wu_EDF", "wd_EFD")]
    assert_close(fn(*args)[0], reference(*args), 1e-5)
  assert fn._cache_size() == 1


def test_dense_swiglu_matches_reference_in_both_dtypes():
  inp = make_inputs(seed=7, e=1, k=1)
  wg, wu, wd = inp["wg_EDF"][0], inp["wu_EDF"][0], inp["wd_EFD"][0]
  ones = {**inp, "w_TK": jnp.ones_like(inp["w_TK"]), "idx_TK": jnp.zeros_like(inp["idx_TK"])}
  y_ref, g_ref = value_and_grads(reference, ones)
  for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    y, g = value_and_grads(lambda x, i, w, a, b, c, dt=dtype: swiglu(x, a[0], b[0], c[0], dt),
                           {**ones, "wg_EDF": wg[None], "wu_EDF": wu[None], "wd_EFD": wd[None]})
    assert_close(y, y_ref, rtol)
    for name in ("x_TD", "wg_EDF", "wu_EDF", "wd_EFD"):
      assert_close(g[name], g_ref[name], rtol)


def test_bad_arguments_raise():
  inp = make_inputs()
  args = [inp[n] for n in ("x_TD", "idx_TK", "w_TK", "wg_EDF", "wu_EDF", "wd_EFD")]
  with pytest.raises(ValueError, match="moe_dispatch"):
    routed_experts(*args, dispatch="scatter")
  with pytest.raises(ValueError, match="capacity_factor"):
    routed_experts(*args, dispatch="capacity", capacity_factor=0.0)
  with pytest.raises(ValueError, match="moe_block_size"):
    routed_experts(*args, dispatch="sort", block_size=-1)
  with pytest.raises(ValueError, match="idx_TK"):
    routed_experts(args[0], args[1][:, :1], *args[2:], dispatch="sort")
  with pytest.raises(ValueError, match="expert weights"):
    routed_experts(*args[:4], args[4][:, :, :-1], args[5], dispatch="sort")
