"""The train step: router-bias balancing, grad accumulation parity, clipping, loss terms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k2jax import optim, presets
from k2jax.model import Transformer
from k2jax.train import init_state, losses, make_train_step
from k2jax.train.schedules import make_schedule
from k2jax.train.step import _micro_batches, make_eval_step

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


@pytest.mark.parametrize("rate, centered", [(0.0, False), (0.01, False), (0.01, True)])
def test_bias_update_balances_a_skewed_router(rate, centered):
  """The weights stay put (SGD at lr 0): only the bias rule can undo the skew."""
  sched = make_schedule("constant", 0.0, 100, 0)
  tx = optax.with_extra_args_support(optax.sgd(0.0))
  step = make_train_step(CFG, tx, sched, bias_update_rate=rate, bias_centered=centered)
  state = _state(tx, skew=0.1)  # larger than the spread of the initial sigmoid scores.
  mean0 = _bias(state).mean(-1)
  ratios = []
  for i in range(16):
    state, m = step(state, _batch(i, T=32))
    ratios.append(float(m["expert_load_max_over_mean"]))
  assert ratios[0] > 3  # of at most E / k = 4: nearly every token picks experts 0 and 1.
  if rate:
    assert np.mean(ratios[-4:]) < 0.5 * ratios[0], ratios
  else:
    assert np.mean(ratios[-4:]) > 0.9 * ratios[0], ratios
  if centered:  # Moonlight's variant moves the biases but not their mean.
    np.testing.assert_allclose(_bias(state).mean(-1), mean0, atol=1e-6)


def test_micro_batches_interleave_rows():
  tokens = jnp.arange(6)[:, None] * jnp.ones((1, 3), jnp.int32)
  micro = _micro_batches({"tokens": tokens, "loss_mask": tokens * 2.0}, 2)
  np.testing.assert_array_equal(micro["tokens"][:, :, 0], [[0, 2, 4], [1, 3, 5]])
  np.testing.assert_array_equal(micro["loss_mask"][:, :, 0], [[0, 4, 8], [2, 6, 10]])


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


def test_masked_loss_is_the_mean_over_the_weighted_targets():
  """Half the targets masked: the loss is the cross-entropy of the other half alone; an all-zero
  mask gives a defined 0 with zero gradients, not NaN."""
  variables = init_state(CFG, optax.with_extra_args_support(optax.sgd(0.0)), seed=0)
  batch = _batch(3)
  mask = np.zeros(batch["tokens"].shape, np.float32)
  mask[:, 9:] = 1.0  # targets 9..16: the second half of each row.
  evaluate = make_eval_step(CFG)
  got = evaluate(variables.params, variables.router, {**batch, "loss_mask": jnp.asarray(mask)})
  logits, _ = jax.jit(Transformer(CFG).apply)({"params": variables.params,
                                               "router": variables.router},
                                              batch["tokens"][:, :-1])
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
  nll = -np.take_along_axis(logp, np.asarray(batch["tokens"])[:, 1:, None], -1)[..., 0]
  assert float(got["cross_entropy"]) == pytest.approx(nll[:, 8:].mean(), rel=1e-5)
  assert float(got["loss"]) == pytest.approx(nll[:, 8:].mean(), rel=1e-5)
  assert float(got["cross_entropy"]) != pytest.approx(nll.mean(), rel=1e-3)
  sched = make_schedule("constant", 1.0, 100, 0)
  tx = optax.with_extra_args_support(optax.sgd(1.0))
  zero = {**batch, "loss_mask": jnp.zeros(batch["tokens"].shape)}
  new, m = make_train_step(CFG, tx, sched)(_state(tx), zero)
  assert float(m["loss"]) == 0.0 and float(m["cross_entropy"]) == 0.0
  assert float(m["grad_norm"]) == 0.0


@pytest.mark.slow  # a compiled cross-check: make test runs it, make test-fast not.
def test_grad_accum_with_masked_micro_batches_matches_one_big_batch():
  """Micro-batches with very different numbers of weighted targets: the accumulated step equals
  one step on the whole batch (the per-term counts come from the whole batch), with QK-Clip
  firing on the max over micro-batches, the router bias moving by the summed load, and clipping."""
  sched = make_schedule("constant", 1e-3, 100, 0)
  mask = np.ones((8, 17), np.float32)
  mask[0::2, :14] = 0.0  # rows of micro-batch 0 keep 3 targets each, micro-batch 1 all 16.
  batch = {**_batch(0), "loss_mask": jnp.asarray(mask)}
  weights = {"cross_entropy": 1.0, "balance": 1e-2}
  tx = optim.muonclip(sched, model_config=CFG, qk_clip_tau=0.07)  # some heads above tau.
  out = {}
  for accum in (1, 2):
    step = make_train_step(CFG, tx, sched, loss_weights=weights, grad_accum=accum, grad_clip=1.0,
                           bias_update_rate=0.01)
    out[accum] = step(_state(tx), batch)
  (s1, m1), (s2, m2) = out[1], out[2]
  for key in ("loss", "cross_entropy", "balance", "grad_norm", "max_logit"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, err_msg=key)
  assert float(m1["balance"]) > 0.5  # the term is live and summed over the MoE layers.
  assert 0 < m1["clipped_heads"] < CFG.num_hidden_layers * CFG.num_attention_heads
  assert m2["clipped_heads"] == m1["clipped_heads"]
  assert float(m2["expert_load_max_over_mean"]) == float(m1["expert_load_max_over_mean"])
  for a, b in zip(jax.tree.leaves((s1.params, s1.router)), jax.tree.leaves((s2.params, s2.router))):
    np.testing.assert_allclose(a, b, atol=1e-4)  # bf16 Newton-Schulz amplifies rounding.


def test_unknown_loss_terms_and_bad_weights_are_refused():
  tx = optax.with_extra_args_support(optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"^config.loss.mtpp is not a loss term \(known: "):
    make_train_step(CFG, tx, lambda s: 1.0, loss_weights={"mtpp": 1.0})
  with pytest.raises(ValueError, match=r"^config.loss.balance must be a number >= 0, got -1"):
    make_train_step(CFG, tx, lambda s: 1.0, loss_weights={"cross_entropy": 1.0, "balance": -1})


def test_target_weights_stop_at_segment_boundaries_and_padding():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0]])
  batch = {"tokens": jnp.zeros((1, 7), jnp.int32), "segment_ids": seg,
           "loss_mask": jnp.asarray([[0, 1, 1, 1, 0.5, 1, 1]])}
  np.testing.assert_array_equal(losses.target_weights(batch), [[1, 1, 0, 0.5, 0, 0]])
