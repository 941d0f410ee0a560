"""The Transformer: max logits vs brute force, scan/remat/precision invariants, overfitting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import presets
from k2jax.config import softmax_scale
from k2jax.model import Transformer, init_variables, logical_axes
from k2jax.model.attention import MLA
from k2jax.model.rope import apply_rope


def rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def brute_force_logits(p, x, cfg, pos=None):
  """All pre-softmax logits [B, H, T, S] of one MLA layer in float64 from its parameters."""
  H, dn, dr = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  B, T, _ = x.shape
  q = rms(x @ p["q_a"]["kernel"], p["q_a_norm"]["scale"], 1e-6) @ p["q_b"]["kernel"]
  q = q.reshape(B, T, H, dn + dr)
  kv = x @ p["kv_a"]["kernel"]
  c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
  k_nope = (rms(c, p["kv_a_norm"]["scale"], 1e-6) @ p["kv_b"]["kernel"]).reshape(B, T, H, -1)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T)) if pos is None else pos
  q_pe = np.asarray(apply_rope(jnp.asarray(q[..., dn:], jnp.float32), pos, cfg), np.float64)
  k_pe = np.asarray(apply_rope(jnp.asarray(k_pe[:, :, None], jnp.float32), pos, cfg), np.float64)
  logits = np.einsum("bthd,bshd->bhts", q[..., :dn], k_nope[..., :dn])
  logits += np.einsum("bthd,bsd->bhts", q_pe, k_pe[:, :, 0])
  return logits * softmax_scale(cfg)


def test_mla_max_logits_are_the_causal_brute_force_max():
  cfg = presets.get("k2_nano", init_std=0.2)
  x = jax.random.normal(jax.random.key(0), (2, 12, cfg.hidden_size))
  # Make the last token's key huge so that a non-causal max would differ from the causal one.
  x = x.at[:, -1].multiply(20.0)
  mla = MLA(cfg)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  params = mla.init(jax.random.key(1), x, pos)["params"]
  _, max_logits = mla.apply({"params": jax.tree.map(lambda a: a.value, params,
                                                     is_leaf=lambda a: hasattr(a, "value"))},
                            x, pos)
  logits = brute_force_logits(jax.tree.map(lambda a: a.value, params,
                                           is_leaf=lambda a: hasattr(a, "value")),
                              np.asarray(x, np.float64), cfg)
  causal = np.tril(np.ones((12, 12), bool))
  want = np.where(causal, logits, -np.inf).max(axis=(0, 2, 3))
  np.testing.assert_allclose(max_logits, want, rtol=2e-5)
  assert (logits.max(axis=(0, 2, 3)) > want + 1e-3).any(), "test needs masked pairs to matter"


def test_transformer_max_logits_of_first_layer():
  cfg = presets.get("k2_nano", init_std=0.1)
  variables = init_variables(cfg, 0)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
  _, aux = jax.jit(Transformer(cfg).apply)(variables, tokens)
  p = variables["params"]
  x = np.asarray(p["embed"]["embedding"], np.float64)[np.asarray(tokens)]
  x = rms(x, np.asarray(p["dense_layers"]["attn_norm"]["scale"][0], np.float64), cfg.rms_norm_eps)
  layer0 = jax.tree.map(lambda a: a[0], p["dense_layers"]["attn"])
  logits = brute_force_logits(layer0, x, cfg)
  want = np.where(np.tril(np.ones((10, 10), bool)), logits, -np.inf).max(axis=(0, 2, 3))
  assert aux["max_logits"].shape == (cfg.num_hidden_layers, cfg.num_attention_heads)
  np.testing.assert_allclose(aux["max_logits"][0], want, rtol=2e-5)


def test_aux_shapes_and_expert_load_counts():
  cfg = presets.get("k2_nano")
  variables = init_variables(cfg, 0)
  tokens = jnp.zeros((3, 7), jnp.int32)
  logits, aux = jax.jit(Transformer(cfg).apply)(variables, tokens)
  assert logits.shape == (3, 7, cfg.vocab_size) and logits.dtype == jnp.float32
  assert aux["expert_load"].shape == (cfg.num_moe_layers, cfg.n_routed_experts)
  np.testing.assert_array_equal(aux["expert_load"].sum(-1), 3 * 7 * cfg.num_experts_per_tok)
  assert float(aux["dropped_frac"]) == 0.0 and aux["balance_loss"].shape == (3,)


def loss_fn(params, router, cfg, tokens):
  logits, _ = Transformer(cfg).apply({"params": params, "router": router}, tokens[:, :-1])
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


@pytest.mark.slow  # a compiled cross-check: make test runs it, make test-fast not.
def test_scan_unroll_and_remat_compute_the_same_function():
  cfg = presets.get("k2_nano", num_hidden_layers=2)
  v = init_variables(cfg, 0)
  tokens = jax.random.randint(jax.random.key(3), (2, 9), 0, cfg.vocab_size)
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=2)
  ref_loss, ref_grads = value_and_grad(v["params"], v["router"], cfg, tokens)
  for changes in (dict(scan_layers=False), dict(remat="dots")):
    loss, grads = value_and_grad(v["params"], v["router"], cfg.replace(**changes), tokens)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_is_close_to_float32():
  cfg = presets.get("k2_nano")
  v = init_variables(cfg, 0)
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, cfg.vocab_size)
  ref, _ = jax.jit(Transformer(cfg).apply)(v, tokens)
  got, _ = jax.jit(Transformer(cfg.replace(dtype="bfloat16")).apply)(v, tokens)
  assert got.dtype == jnp.float32
  # Mean error: a rare bf16-induced flip of a routed expert moves single logits further.
  rel = float(jnp.mean(jnp.abs(got - ref)) / jnp.mean(jnp.abs(ref)))
  assert 0 < rel < 0.02, rel


def test_every_parameter_has_logical_axes():
  cfg = presets.get("k2_nano")
  axes = logical_axes(cfg)
  shapes = jax.tree.map(jnp.shape, init_variables(cfg, 0))
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat_axes) == len(flat_shapes)
  for names, shape in zip(flat_axes, flat_shapes):
    assert len(names) == len(shape)
  assert axes["params"]["moe_layers"]["moe"]["experts"]["gate"] == (
      "layers", "expert", "embed", "moe_mlp")
  assert axes["router"]["moe_layers"]["moe"]["e_score_correction_bias"] == ("layers", "router")


@pytest.mark.slow  # a compiled cross-check: make test runs it, make test-fast not.
def test_nano_overfits_one_batch_with_gradient_descent():
  cfg = presets.get("k2_nano")
  v = init_variables(cfg, 0)
  tokens = (jnp.arange(4)[:, None] * 7 + jnp.arange(33)[None] * 3) % 64  # learnable bigrams

  @jax.jit
  def step(params):
    loss, grads = jax.value_and_grad(loss_fn)(params, v["router"], cfg, tokens)
    return jax.tree.map(lambda p, g: p - 1.0 * g, params, grads), loss, grads

  # Full-batch descent at this rate is not monotone (the loss spikes now and then), so the last
  # step's loss hangs on float rounding order; the best loss over the run does not.
  params, first, _ = step(v["params"])
  losses = []
  for _ in range(80):
    params, loss, grads = step(params)
    losses.append(float(loss))
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert min(losses) < 0.3 * float(first), (float(first), losses)


def test_packed_segments_equal_each_sequence_alone():
  """A row packing A | B | padding gives A's and B's logits as if each ran alone (full model, MoE
  routing included); a padding row changes nothing; cross-segment pairs never enter max_logits
  (B's first key is made huge: only A's queries could see it without the segment mask); the
  expert load counts no padding; gradients through padding stay finite."""
  cfg = presets.get("k2_nano", init_std=0.1, num_hidden_layers=2)
  v = init_variables(cfg, 0)
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 5)
  apply = jax.jit(Transformer(cfg).apply)
  alone_a, aux_a = apply(v, jnp.asarray([a]))
  alone_b, aux_b = apply(v, jnp.asarray([b]))
  tokens = np.zeros((2, 16), np.int32)
  tokens[0, :12] = np.concatenate([a, b])
  seg = np.zeros((2, 16), np.int32)
  seg[0, :7], seg[0, 7:12] = 1, 2
  pos = np.zeros((2, 16), np.int32)
  pos[0, :12] = np.concatenate([np.arange(7), np.arange(5)])
  packed, aux = apply(v, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
  scale = float(jnp.max(jnp.abs(alone_a)))
  np.testing.assert_allclose(packed[0, :7], alone_a[0], atol=1e-5 * scale)
  np.testing.assert_allclose(packed[0, 7:12], alone_b[0], atol=1e-5 * scale)
  np.testing.assert_allclose(aux["max_logits"], jnp.maximum(aux_a["max_logits"],
                                                             aux_b["max_logits"]), rtol=1e-5)
  np.testing.assert_array_equal(aux["expert_load"], aux_a["expert_load"] + aux_b["expert_load"])
  # The same row next to a different padding row (all segment 0) is unchanged.
  other = tokens.copy()
  other[1] = rng.integers(0, cfg.vocab_size, 16)
  again, aux2 = apply(v, jnp.asarray(other), jnp.asarray(pos), jnp.asarray(seg))
  np.testing.assert_array_equal(again[0], packed[0])
  np.testing.assert_array_equal(aux2["max_logits"], aux["max_logits"])

  def loss(params):
    logits, _ = Transformer(cfg).apply({**v, "params": params}, jnp.asarray(tokens),
                                       jnp.asarray(pos), jnp.asarray(seg))
    return jnp.sum(logits[0, :12] ** 2)

  grads = jax.jit(jax.grad(loss))(v["params"])
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_max_logits_skip_pairs_across_segments():
  """A huge key in segment 1: the recorded max logit is the float64 max over same-segment causal
  pairs, which differs from the max over all causal pairs (segment 2's queries would see it)."""
  cfg = presets.get("k2_nano", init_std=0.2, num_hidden_layers=1, first_k_dense_replace=1)
  p0 = jax.tree.map(lambda a: a[0], init_variables(cfg, 0)["params"]["dense_layers"]["attn"])
  x = jax.random.normal(jax.random.key(0), (1, 10, cfg.hidden_size))
  x = x.at[0, 1].multiply(40.0)  # its rotary key (not normalised) grows 40x.
  seg = np.array([1, 1, 1, 2, 2, 2, 2, 2, 2, 2])
  pos = np.array([0, 1, 2, 0, 1, 2, 3, 4, 5, 6])
  _, max_h = jax.jit(MLA(cfg).apply)({"params": p0}, x, jnp.asarray([pos]), jnp.asarray([seg]))
  logits = brute_force_logits(p0, np.asarray(x, np.float64), cfg, jnp.asarray([pos]))[0]
  causal = np.tril(np.ones((10, 10), bool))
  want = np.where(causal & (seg[:, None] == seg[None, :]), logits, -np.inf).max(axis=(1, 2))
  np.testing.assert_allclose(max_h, want, rtol=1e-4)
  assert not np.allclose(want, np.where(causal, logits, -np.inf).max(axis=(1, 2)), rtol=1e-2)
