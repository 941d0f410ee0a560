"""Muon and AdamW updates: parity with torch.optim, stacked matrices, update RMS, state size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import k2jax.optim as ko

SHAPES = {"tall": (48, 16), "wide": (16, 40), "square": (24, 24)}
STEPS = 4
LR = optax.linear_schedule(0.05, 0.02, STEPS)


def make_problem(shapes, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(STEPS)]
  return params, grads


def run_optax(tx, params, grads):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.map(np.asarray, params), state


def run_torch(make_opt, params, grads):
  tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  opt = make_opt(list(tensors.values()))
  for step, g in enumerate(grads):
    for group in opt.param_groups:
      group["lr"] = float(LR(step))
    for k, t in tensors.items():
      t.grad = torch.tensor(g[k])
    opt.step()
  return {k: t.detach().numpy() for k, t in tensors.items()}


def rel(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def assert_parity(got, want, start):
  for k in want:
    assert rel(got[k], want[k]) <= 1e-5, k
    # The parameter change alone, a stricter check than the parameters themselves.
    assert rel(got[k] - start[k], want[k] - start[k]) <= 1e-5, k


def test_muon_matches_torch(monkeypatch):
  params, grads = make_problem(SHAPES)
  got, _ = run_optax(ko.muon(LR, weight_decay=0.1, ns_dtype=jnp.float32), params, grads)
  # torch.optim.Muon casts to bfloat16 inside Newton-Schulz; keep it in float32 here.
  monkeypatch.setattr(torch.Tensor, "bfloat16", lambda t: t.to(torch.float32, copy=True))
  want = run_torch(lambda ps: torch.optim.Muon(ps, lr=0.0, weight_decay=0.1, momentum=0.95,
                                               nesterov=True, adjust_lr_fn="match_rms_adamw"),
                   params, grads)
  assert_parity(got, want, params)


@pytest.mark.parametrize("which", ["adamw_role", "adamw_baseline"])
def test_adamw_matches_torch(which):
  params, grads = make_problem(SHAPES, seed=1)
  if which == "adamw_role":  # muon's AdamW side: embedding, head and norm gains.
    tx = ko.muon(LR, weight_decay=0.1, roles=[(".*", "adamw")])
  else:  # the baseline optimizer, AdamW on every leaf.
    tx = ko.adamw(LR, weight_decay=0.1)
  got, _ = run_optax(tx, params, grads)
  want = run_torch(lambda ps: torch.optim.AdamW(ps, lr=0.0, betas=(0.9, 0.95), eps=1e-8,
                                                weight_decay=0.1), params, grads)
  assert_parity(got, want, params)


@pytest.mark.parametrize("batch", [(3,), (2, 3)], ids=["experts", "layers_x_experts"])
def test_stacked_leaf_is_independent_matrices(batch):
  rng = np.random.default_rng(2)
  shape = (*batch, 20, 12)
  params = {"w": rng.standard_normal(shape).astype(np.float32)}
  grads = [{"w": rng.standard_normal(shape).astype(np.float32)} for _ in range(STEPS)]
  grads[0]["w"][(0,) * len(batch)] *= 100.0  # one slice far larger than the rest
  tx = ko.muon(LR, ns_dtype=jnp.float32)
  got, _ = run_optax(tx, params, grads)
  for idx in np.ndindex(*batch):
    single, _ = run_optax(tx, {"w": params["w"][idx]}, [{"w": g["w"][idx]} for g in grads])
    # Batched and single Newton-Schulz are two programs: equal to float32 rounding (a few ulps).
    np.testing.assert_allclose(got["w"][idx], single["w"], rtol=2e-5, atol=1e-7, err_msg=str(idx))


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 128)])
def test_update_rms_is_rms_scale_times_lr(shape):
  lr = 1e-3
  rng = np.random.default_rng(3)
  params = {"w": jnp.zeros(shape)}
  tx = ko.muon(lr, weight_decay=0.0)
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.asarray(rng.standard_normal(shape))}, state, params)
  rms = float(jnp.sqrt(jnp.mean(jnp.square(updates["w"]))))
  assert 0.85 * 0.2 * lr < rms < 1.05 * 0.2 * lr
  metrics = ko.optimizer_metrics(state)
  np.testing.assert_allclose(metrics["update_rms/muon"], rms, rtol=1e-5)
  assert float(metrics["update_rms/adamw"]) == 0.0


def test_muon_state_is_half_of_adamw():
  params = {"w": jnp.zeros((2, 8, 16)), "v": jnp.zeros((16, 4)),
            "final_norm": {"scale": jnp.zeros(8)}}
  state_size = lambda tx, role: sum(
    x.size for x in jax.tree.leaves(tx.init(params).inner.inner_states[role]) if x.ndim > 0)
  muon_size = lambda tx: state_size(tx, "muon")
  n_muon = 2 * 8 * 16 + 16 * 4
  assert muon_size(ko.muon(1e-3)) == n_muon
  assert muon_size(ko.adamw(1e-3)) == 2 * n_muon
  # The AdamW side of Muon keeps two moments, as AdamW does.
  assert state_size(ko.muon(1e-3), "adamw") == 2 * 8


def test_frozen_leaves_get_zero_updates():
  params = {"w": jnp.ones((4, 4)), "router": {"e_score_correction_bias": jnp.ones((2, 8))}}
  tx = ko.muon(1e-2)
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert np.all(np.asarray(updates["router"]["e_score_correction_bias"]) == 0)
  assert np.any(np.asarray(updates["w"]) != 0)


def test_bad_hyperparameters():
  with pytest.raises(ValueError, match="momentum"):
    ko.muon(1e-3, momentum=1.0)
  with pytest.raises(ValueError, match="rms_scale"):
    ko.muon(1e-3, rms_scale=0.0)
