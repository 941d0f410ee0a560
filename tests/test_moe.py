"""Router selection, balance loss and the auxiliary-loss-free bias update against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import presets
from k2jax.model.moe import balance_loss, select_experts, update_router_bias


def select_reference(scores, bias, cfg):
  T, E = scores.shape
  idx, w = [], []
  for t in range(T):
    choice = scores[t] + bias
    if cfg.n_group > 1:
      groups = choice.reshape(cfg.n_group, -1)
      gscore = np.sort(groups, axis=-1)[:, -2:].sum(-1)
      keep = np.argsort(-gscore)[:cfg.topk_group]
      mask = np.zeros(cfg.n_group, bool)
      mask[keep] = True
      choice = np.where(np.repeat(mask, E // cfg.n_group), choice, -np.inf)
    top = np.argsort(-choice)[:cfg.num_experts_per_tok]
    wt = scores[t, top]
    wt = wt / (wt.sum() + 1e-20) if cfg.norm_topk_prob else wt
    idx.append(top)
    w.append(wt * cfg.routed_scaling_factor)
  return np.array(idx), np.array(w)


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2)])
def test_select_experts_matches_reference_and_bias_only_selects(n_group, topk_group):
  cfg = presets.get("k2_nano", n_group=n_group, topk_group=topk_group, num_experts_per_tok=3)
  rng = np.random.default_rng(0)
  scores = 1 / (1 + np.exp(-rng.standard_normal((64, cfg.n_routed_experts))))
  bias = rng.standard_normal(cfg.n_routed_experts) * 0.5
  idx, w = select_experts(jnp.asarray(scores, jnp.float32), jnp.asarray(bias, jnp.float32), cfg)
  ref_idx, ref_w = select_reference(scores, bias, cfg)
  order, ref_order = np.argsort(np.asarray(idx), -1), np.argsort(ref_idx, -1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, -1),
                                np.take_along_axis(ref_idx, ref_order, -1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                             np.take_along_axis(ref_w, ref_order, -1), rtol=1e-6)
  # The bias changed which experts were chosen, and the weights are unbiased scores.
  unbiased_idx, _ = select_reference(scores, np.zeros_like(bias), cfg)
  assert (np.sort(unbiased_idx, -1) != np.sort(ref_idx, -1)).any()
  np.testing.assert_allclose(np.asarray(w).sum(-1), cfg.routed_scaling_factor, rtol=1e-6)


def test_balance_loss_matches_formula():
  """Per sequence, over its valid tokens only: padding changes neither f nor P."""
  cfg = presets.get("k2_nano")
  rng = np.random.default_rng(2)
  B, S, E, k = 2, 8, cfg.n_routed_experts, cfg.num_experts_per_tok
  scores = 1 / (1 + np.exp(-rng.standard_normal((B, S, E))))
  idx = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(S)]) for _ in range(B)])
  valid = np.ones((B, S))
  valid[1, 5:] = 0  # row 1 ends in padding.
  want = []
  for b in range(B):
    n = int(valid[b].sum())
    f = np.bincount(idx[b, :n].ravel(), minlength=E) * E / (k * n)
    p = (scores[b, :n] / scores[b, :n].sum(-1, keepdims=True)).mean(0)
    want.append((f * p).sum())
  got = balance_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(idx),
                     jnp.asarray(valid, jnp.float32), cfg)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  # A perfectly uniform router scores 1.
  uniform = jnp.full((1, E, E), 0.5)
  assert float(balance_loss(uniform, jnp.arange(E).reshape(1, E, 1).repeat(k, -1) % E,
                            jnp.ones((1, E)), cfg.replace(num_experts_per_tok=k))[0]) == (
      pytest.approx(1.0))


def test_router_bias_update_rule():
  load = jnp.array([[6.0, 2.0, 4.0, 4.0]])
  bias = jnp.zeros((1, 4))
  new = update_router_bias(bias, load, 0.001)
  np.testing.assert_allclose(new, [[-0.001, 0.001, 0.0, 0.0]])
  centered = update_router_bias(bias, jnp.array([[10.0, 2.0, 3.0, 1.0]]), 0.01, centered=True)
  np.testing.assert_allclose(np.asarray(centered).sum(), 0.0, atol=1e-9)
  np.testing.assert_allclose(centered, [[-0.015, 0.005, 0.005, 0.005]], atol=1e-9)
