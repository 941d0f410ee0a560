"""The train step: router-bias balancing, grad accumulation parity, clipping, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k2jax import optim, presets
from k2jax.model import Transformer, init_variables
from k2jax.train import init_state, make_train_step, sample_tokens
from k2jax.train.schedules import make_schedule
from k2jax.train.step import _micro_batches

CFG = presets.get("k2_nano", vocab_size=64, hidden_size=64, num_hidden_layers=2,
                  n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.5)


def _batch(seed, B=8, T=16):
  return {"tokens": jax.random.randint(jax.random.key(seed), (B, T + 1), 0, 64, jnp.int32)}


def _state(tx, skew=0.0):
  state = init_state(CFG, tx, seed=0)
  # A router skewed to experts 0 and 1: a bias of +skew on their selection scores.
  router = jax.tree.map(lambda b: b.at[:, :2].add(skew), state.router)
  return state.replace(router=router)


def _bias(state):
  (bias_LE,) = jax.tree.leaves(state.router)
  return np.asarray(bias_LE)


@pytest.mark.slow
@pytest.mark.parametrize("rate, centered", [(0.0, False), (0.005, False), (0.005, True)])
def test_bias_update_balances_a_skewed_router(rate, centered):
  sched = make_schedule("constant", 1e-3, 100, 0)
  tx = optim.muonclip(sched, model_config=CFG)
  step = make_train_step(CFG, tx, sched, bias_update_rate=rate, bias_centered=centered)
  state = _state(tx, skew=0.1)  # larger than the spread of the initial sigmoid scores.
  mean0 = _bias(state).mean(-1)
  ratios = []
  for i in range(30):
    state, m = step(state, _batch(i, T=64))
    ratios.append(float(m["expert_load_max_over_mean"]))
  assert ratios[0] > 3  # of at most E / k = 4: nearly every token picks experts 0 and 1.
  if rate:
    assert np.mean(ratios[-5:]) < 0.5 * ratios[0], ratios
  else:
    assert np.mean(ratios[-5:]) > 0.9 * ratios[0], ratios
  if centered:  # Moonlight's variant moves the biases but not their mean.
    np.testing.assert_allclose(_bias(state).mean(-1), mean0, atol=1e-6)


def test_micro_batches_interleave_rows():
  tokens = jnp.arange(6)[:, None] * jnp.ones((1, 3), jnp.int32)
  np.testing.assert_array_equal(_micro_batches(tokens, 2)[:, :, 0], [[0, 2, 4], [1, 3, 5]])


@pytest.mark.slow
def test_grad_accum_matches_one_big_batch():
  sched = make_schedule("constant", 1e-3, 100, 0)
  tx = optim.muonclip(sched, model_config=CFG, qk_clip_tau=0.07)  # some heads above tau.
  batch = _batch(0)
  out = {}
  for accum in (1, 4):
    step = make_train_step(CFG, tx, sched, grad_accum=accum, grad_clip=1.0,
                           bias_update_rate=0.01)
    out[accum] = step(_state(tx), batch)
  (s1, m1), (s4, m4) = out[1], out[4]
  for key in ("loss", "grad_norm", "max_logit"):
    np.testing.assert_allclose(m4[key], m1[key], rtol=2e-5)
  assert 0 < m1["clipped_heads"] < CFG.num_hidden_layers * CFG.num_attention_heads
  assert m4["clipped_heads"] == m1["clipped_heads"]
  assert float(m4["expert_load_max_over_mean"]) == float(m1["expert_load_max_over_mean"])
  for a, b in zip(jax.tree.leaves((s1.params, s1.router)), jax.tree.leaves((s4.params, s4.router))):
    np.testing.assert_allclose(a, b, atol=1e-4)  # bf16 Newton-Schulz amplifies rounding.


def test_grad_clip_scales_the_gradient_to_the_bound():
  sched = make_schedule("constant", 1.0, 100, 0)
  tx = optax.with_extra_args_support(optax.sgd(1.0))  # SGD: the update is the gradient itself.
  state = _state(tx)
  params0 = jax.tree.map(np.array, state.params)
  new, m = make_train_step(CFG, tx, sched, grad_clip=1e-3)(state, _batch(1))
  assert float(m["grad_norm"]) > 1e-2  # reported before clipping.
  moved = np.sqrt(sum(np.sum((np.asarray(a) - b) ** 2)
                      for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params0))))
  assert moved == pytest.approx(1e-3, rel=1e-3)


def test_greedy_sample_is_the_argmax_of_the_forward_pass():
  variables = init_variables(CFG, 0)
  prompt = [1, 2, 3]
  ids = sample_tokens(CFG, variables, prompt, 6, num_valid=50)
  assert len(ids) == 6 and max(ids) < 50
  logits_1TV, _ = Transformer(CFG).apply(variables, jnp.asarray([prompt + ids]))
  np.testing.assert_array_equal(jnp.argmax(logits_1TV[0, 2:-1, :50], -1), ids)
  hot = sample_tokens(CFG, variables, prompt, 6, temperature=1.0, rng=jax.random.PRNGKey(1),
                      num_valid=50)
  assert len(hot) == 6 and max(hot) < 50
