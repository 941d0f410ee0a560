"""MuonClip on the real k2jax.Transformer (scanned layers): QK-Clip, training, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import k2jax.optim as ko
from k2jax import presets
from k2jax.model import Transformer, init_variables
from k2jax.paths import path_str

B, T = 2, 16


def nano():
  return presets.get("k2_nano", num_hidden_layers=3)


def hot_params(cfg):
  """Initial params with q_b and kv_b scaled up so that max logits reach tens."""
  params = init_variables(cfg, jax.random.key(0))["params"]
  for stack in ("dense_layers", "moe_layers"):
    for name in ("q_b", "kv_b"):
      kernel = params[stack]["attn"][name]["kernel"]
      params[stack]["attn"][name]["kernel"] = kernel * 30.0
  return params


def layer_index(cfg, l):
  return ("dense_layers", l) if l < cfg.num_dense_layers else ("moe_layers",
                                                                l - cfg.num_dense_layers)


@pytest.mark.slow
def test_qk_clip_on_real_model():
  cfg = nano()
  variables = init_variables(cfg, jax.random.key(0))
  params = hot_params(cfg)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  max_logits = jax.jit(
    lambda p: Transformer(cfg).apply({**variables, "params": p}, tokens)[1]["max_logits"])
  s_LH = np.asarray(max_logits(params))
  tau = float(np.quantile(s_LH, 0.6))
  clip_LH = s_LH > tau
  assert tau > 0 and clip_LH.any() and not clip_LH.all()

  tx = ko.muonclip(0.0, model_config=cfg, qk_clip_tau=tau, ns_dtype=jnp.float32)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)

  @jax.jit
  def step(params):
    updates, state = tx.update(grads, tx.init(params), params, max_logits=jnp.asarray(s_LH))
    return optax.apply_updates(params, updates), ko.optimizer_metrics(state)

  new, metrics = step(params)
  assert np.array_equal(metrics["qk_clip/clipped_heads"], clip_LH.sum(1))
  np.testing.assert_allclose(metrics["qk_clip/min_gamma"], tau / s_LH.max(), rtol=1e-6)

  # Only q_b and kv_b of the attention can change, and only the clipped heads' columns.
  dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  for (path, old), now in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree.leaves(new)):
    name = path_str(path)
    changed = np.asarray(now != old)
    if not name.endswith(("attn/q_b/kernel", "attn/kv_b/kernel")):
      assert not changed.any(), name
      continue
    stack = name.split("/")[0]
    rows = clip_LH[:cfg.num_dense_layers] if stack == "dense_layers" else clip_LH[
      cfg.num_dense_layers:]
    width, nope = (dn + dr, dn + dr) if "q_b" in name else (dn + dv, dn)
    allowed = np.zeros((*rows.shape, width), bool)
    allowed[..., :nope] = rows[..., None]
    assert not (changed & ~allowed.reshape(rows.shape[0], 1, -1)).any(), name
    assert changed.any() == rows.any(), name

  # Layer l sees the same input when only its own q/k weights are the clipped ones, so its
  # clipped heads' max logit is now tau and every other head's, and every layer before it, is
  # unchanged.
  for l in range(cfg.num_hidden_layers):
    stack, i = layer_index(cfg, l)
    mixed = jax.tree.map(lambda x: x, params)
    for name in ("q_b", "kv_b"):
      kernel = params[stack]["attn"][name]["kernel"]
      mixed[stack]["attn"][name]["kernel"] = kernel.at[i].set(new[stack]["attn"][name]["kernel"][i])
    s_new = np.asarray(max_logits(mixed))
    np.testing.assert_allclose(s_new[l][clip_LH[l]], tau, rtol=1e-4)
    np.testing.assert_array_equal(s_new[l][~clip_LH[l]], s_LH[l][~clip_LH[l]])
    np.testing.assert_array_equal(s_new[:l], s_LH[:l])


@pytest.mark.slow
def test_training_steps_reduce_loss_and_report_metrics():
  cfg = nano()
  variables = init_variables(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (B, T + 1), 0, cfg.vocab_size)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   ko.muonclip(optax.linear_schedule(2e-2, 1e-2, 5), model_config=cfg,
                               qk_clip_tau=0.05))

  def loss_fn(params):
    logits, aux = Transformer(cfg).apply({**variables, "params": params}, tokens[:, :-1])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)
    return jnp.mean(nll), aux

  @jax.jit
  def train_step(params, state):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, max_logits=aux["max_logits"])
    return optax.apply_updates(params, updates), state, loss, aux["max_logits"]

  params = variables["params"]
  state = tx.init(params)
  losses = []
  for _ in range(3):
    params, state, loss, s_LH = train_step(params, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1, losses
  metrics = ko.optimizer_metrics(state)
  assert set(metrics) == {"update_rms/muon", "update_rms/adamw", "qk_clip/clipped_heads",
                          "qk_clip/min_gamma"}
  assert metrics["qk_clip/clipped_heads"].shape == (cfg.num_hidden_layers,)
  np.testing.assert_array_equal(metrics["qk_clip/clipped_heads"], np.sum(s_LH > 0.05, 1))
  assert 0 < float(metrics["qk_clip/min_gamma"]) <= 1
  lr = 2e-2 - 2 * (1e-2 / 5)  # the schedule at the third update
  assert 0.1 * lr < float(metrics["update_rms/muon"]) < 0.25 * lr
  assert float(metrics["update_rms/adamw"]) > 0


def test_no_clip_is_muon_and_foreign_states_have_no_metrics():
  params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((8, 12)), jnp.float32),
            "final_norm": {"scale": jnp.ones(8)}}
  grads = jax.tree.map(lambda p: p * 0.5 + 0.1, params)
  outs = []
  for tx in (ko.muonclip(1e-2, qk_clip_tau=None), ko.muon(1e-2)):
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    outs.append(updates)
  jax.tree.map(np.testing.assert_array_equal, *outs)
  assert ko.optimizer_metrics(optax.adam(1e-3).init(params)) == {}


@pytest.mark.slow  # a compiled cross-check: make test runs it, make test-fast not.
def test_params_straight_from_model_init_are_accepted():
  """flax's boxed params (LogicallyPartitioned from model.init) take the same MuonClip step as
  k2jax.init_variables' plain arrays, and the updates come back boxed."""
  import flax.linen as nn

  cfg = presets.get("k2_nano", num_hidden_layers=2)
  boxed = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  plain = nn.meta.unbox(boxed)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)

  def loss(params, variables):
    logits, aux = Transformer(cfg).apply({**variables, "params": params}, tokens[:, :-1])
    return jnp.mean(logits ** 2), aux["max_logits"]

  tx = ko.muonclip(1e-2, model_config=cfg, qk_clip_tau=0.05)  # some heads clip.
  results = []
  for variables in (boxed, plain):
    grads, max_logits = jax.jit(jax.grad(loss, has_aux=True))(variables["params"], variables)
    updates, state = jax.jit(tx.update)(grads, tx.init(variables["params"]),
                                        variables["params"], max_logits=max_logits)
    results.append((optax.apply_updates(variables["params"], updates), state))
  (new_boxed, s_boxed), (new_plain, s_plain) = results
  assert isinstance(new_boxed["embed"]["embedding"], nn.LogicallyPartitioned)
  jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(new_boxed), new_plain)
  assert int(jnp.sum(ko.optimizer_metrics(s_boxed)["qk_clip/clipped_heads"])) > 0


def test_update_traces_beyond_int32_weights():
  """K2 has 1.02e12 Muon weights: the update-RMS metric must not count them in an int32."""
  big = {"w": jax.ShapeDtypeStruct((65536, 32769), jnp.float32),
         "final_norm": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)}}
  tx = ko.muon(1e-2)
  state = jax.eval_shape(tx.init, big)
  _, state = jax.eval_shape(tx.update, big, state, big)
  assert ko.optimizer_metrics(state)["update_rms/muon"].dtype == jnp.float32
