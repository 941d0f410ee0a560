"""QK-Clip on hand-built MLA and MHA weights, checked against brute-force numpy max logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import k2jax.optim as ko
from k2jax import presets
from k2jax.paths import path_str

B, T, THETA = 2, 8, 10000.0


def small_cfg(**overrides):
  fields = dict(hidden_size=32, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=12,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_hidden_layers=3,
                first_k_dense_replace=1)
  return presets.get("k2_nano", **{**fields, **overrides})


def rope(x, pos):
  """Interleaved-pair RoPE on the last axis of x [.., T, (H,) R]; pos [T]."""
  r = x.shape[-1]
  ang = pos[:, None] * THETA ** (-np.arange(0, r, 2) / r)
  ang = ang.reshape(ang.shape[0], *([1] * (x.ndim - 3)), -1) if x.ndim > 3 else ang
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
  out[..., 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
  return out


def rms_norm(x, scale):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def mla_max_logits(attn, x_BTD, cfg):
  """S_max [H] of one layer's MLA in float64 (DeepSeek-V3's MLA), attn: that layer's weights."""
  h, dn, dr = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
  w = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in attn.items()}
  if "q_proj" in w:
    q = x_BTD @ w["q_proj"]["kernel"]
  else:
    q = rms_norm(x_BTD @ w["q_a"]["kernel"], w["q_a_norm"]["scale"]) @ w["q_b"]["kernel"]
  q = q.reshape(B, T, h, dn + dr)
  kv = x_BTD @ w["kv_a"]["kernel"]
  c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
  k_nope = (rms_norm(c, w["kv_a_norm"]["scale"]) @ w["kv_b"]["kernel"]).reshape(B, T, h, -1)[
    ..., :dn]
  pos = np.arange(T, dtype=np.float64)
  logits = (np.einsum("bthk,bshk->bhts", q[..., :dn], k_nope)
            + np.einsum("bthr,bsr->bhts", rope(q[..., dn:], pos), rope(k_pe, pos)))
  logits = logits * (dn + dr) ** -0.5
  logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  return logits.max(axis=(0, 2, 3))


def layer_attn(params, cfg, l):
  """Layer l's attention weights (layer order 0..L-1 over the dense then the MoE stack)."""
  ld = cfg.num_dense_layers
  stack, i = ("dense_layers", l) if l < ld else ("moe_layers", l - ld)
  return jax.tree.map(lambda a: np.asarray(a)[i], params[stack]["attn"])


def all_max_logits(params, xs, cfg):
  return np.stack([mla_max_logits(layer_attn(params, cfg, l), xs[l], cfg)
                   for l in range(cfg.num_hidden_layers)])


def mla_params(cfg, seed=0):
  """Random weights in the documented layout (attention, norms, MLP, embedding, head)."""
  rng = np.random.default_rng(seed)
  h, d = cfg.num_attention_heads, cfg.hidden_size
  dq, dkv = cfg.qk_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
  normal = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32) / np.sqrt(s[-2]))

  def stack(n):
    attn = {"kv_a": {"kernel": normal(n, d, cfg.kv_lora_rank + cfg.qk_rope_head_dim)},
            "kv_a_norm": {"scale": jnp.ones((n, cfg.kv_lora_rank))},
            "kv_b": {"kernel": 3 * normal(n, cfg.kv_lora_rank, h * dkv)},
            "o": {"kernel": normal(n, h * cfg.v_head_dim, d)}}
    if cfg.q_lora_rank is None:
      attn["q_proj"] = {"kernel": 3 * normal(n, d, h * dq)}
    else:
      attn.update(q_a={"kernel": normal(n, d, cfg.q_lora_rank)},
                  q_a_norm={"scale": jnp.ones((n, cfg.q_lora_rank))},
                  q_b={"kernel": 3 * normal(n, cfg.q_lora_rank, h * dq)})
    return {"attn": attn, "attn_norm": {"scale": jnp.ones((n, d))},
            "mlp": {"up": {"kernel": normal(n, d, 24)}}}

  return {"embed": {"embedding": normal(50, d)}, "dense_layers": stack(cfg.num_dense_layers),
          "moe_layers": stack(cfg.num_moe_layers), "lm_head": {"kernel": normal(d, 50)}}


def one_step(tx, params, max_logits, seed=1):
  """params after one update with random gradients, and the optimizer metrics."""
  rng = np.random.default_rng(seed)
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)

  @jax.jit
  def step(params, grads, max_logits):
    updates, state = tx.update(grads, tx.init(params), params, max_logits=max_logits)
    return optax.apply_updates(params, updates), ko.optimizer_metrics(state)

  return step(params, grads, jnp.asarray(max_logits))


def clipped_columns(cfg, s_LH, tau):
  """{(stack, kernel): bool [layers, H*w]} of the output columns QK-Clip may change."""
  dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  q_name = "q_proj" if cfg.q_lora_rank is None else "q_b"
  clip_LH = s_LH > tau
  out = {}
  for stack, rows in (("dense_layers", slice(0, cfg.num_dense_layers)),
                      ("moe_layers", slice(cfg.num_dense_layers, None))):
    c = clip_LH[rows][:, :, None]
    out[stack, q_name] = np.broadcast_to(c, (*c.shape[:2], dn + dr)).reshape(c.shape[0], -1)
    kv = np.concatenate([np.broadcast_to(c, (*c.shape[:2], dn)),
                         np.zeros((*c.shape[:2], dv), bool)], -1)
    out[stack, "kv_b"] = kv.reshape(c.shape[0], -1)
  return out


@pytest.mark.parametrize("q_lora_rank", [16, None], ids=["q_lora", "q_proj"])
def test_mla_clip_sets_max_logit_to_tau(q_lora_rank):
  cfg = small_cfg(q_lora_rank=q_lora_rank)
  params = mla_params(cfg)
  xs = np.random.default_rng(2).standard_normal((cfg.num_hidden_layers, B, T, cfg.hidden_size))
  s_LH = all_max_logits(params, xs, cfg)
  tau = float(np.median(s_LH))
  clip_LH = s_LH > tau
  assert clip_LH.any(axis=1).all() and not clip_LH.all()  # some heads of every layer clip

  tx = ko.muonclip(0.0, model_config=cfg, qk_clip_tau=tau, ns_dtype=jnp.float32)
  new, metrics = one_step(tx, params, s_LH)

  s_new = all_max_logits(new, xs, cfg)
  np.testing.assert_allclose(s_new[clip_LH], tau, rtol=1e-4)
  assert np.array_equal(s_new[~clip_LH], s_LH[~clip_LH])
  # Only the clipped heads' q and k_nope columns change; everything else is bit-identical.
  cols = clipped_columns(cfg, s_LH, tau)
  for (path, old), now in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree.leaves(new)):
    name = tuple(k.key for k in path)
    changed = np.asarray(now) != np.asarray(old)
    allowed = cols.get((name[0], name[2])) if len(name) > 2 and name[1] == "attn" else None
    if allowed is None:
      assert not changed.any(), name
    else:
      assert not (changed & ~allowed[:, None, :]).any(), name
  assert np.array_equal(metrics["qk_clip/clipped_heads"], clip_LH.sum(1))
  np.testing.assert_allclose(metrics["qk_clip/min_gamma"], tau / s_LH.max(), rtol=1e-6)


def test_clip_applies_to_the_updated_weights():
  cfg = small_cfg()
  params = mla_params(cfg)
  s_LH = np.random.default_rng(3).uniform(50.0, 150.0, (cfg.num_hidden_layers, 4))
  kw = dict(ns_dtype=jnp.float32, weight_decay=0.1)
  clipped, _ = one_step(ko.muonclip(1e-2, model_config=cfg, qk_clip_tau=100.0, **kw), params, s_LH)
  plain, _ = one_step(ko.muon(1e-2, **kw), params, s_LH)
  gamma_LH = np.where(s_LH > 100.0, 100.0 / s_LH, 1.0)
  dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  for stack, rows in (("dense_layers", slice(0, 1)), ("moe_layers", slice(1, None))):
    g = gamma_LH[rows][:, None, :, None]
    attn, ref = clipped[stack]["attn"], plain[stack]["attn"]
    q_want = np.asarray(ref["q_b"]["kernel"])
    q_want = q_want.reshape(*q_want.shape[:2], -1, dn + dr).copy()
    q_want[..., :dn] *= np.sqrt(g)
    q_want[..., dn:] *= g
    np.testing.assert_allclose(np.asarray(attn["q_b"]["kernel"]), q_want.reshape(
      ref["q_b"]["kernel"].shape), rtol=1e-6, atol=1e-7)
    kv_want = np.asarray(ref["kv_b"]["kernel"])
    kv_want = kv_want.reshape(*kv_want.shape[:2], -1, dn + dv).copy()
    kv_want[..., :dn] *= np.sqrt(g)
    np.testing.assert_allclose(np.asarray(attn["kv_b"]["kernel"]), kv_want.reshape(
      ref["kv_b"]["kernel"].shape), rtol=1e-6, atol=1e-7)
    for name in ("q_a", "kv_a", "o"):  # untouched by the clip (two programs: to rounding).
      np.testing.assert_allclose(attn[name]["kernel"], ref[name]["kernel"], rtol=1e-6,
                                 atol=1e-7, err_msg=name)


def mha_max_logits(q_w, k_w, x_BTD, head_dim):
  q = (x_BTD @ np.asarray(q_w, np.float64)).reshape(B, T, -1, head_dim)
  k = (x_BTD @ np.asarray(k_w, np.float64)).reshape(B, T, -1, head_dim)
  logits = np.einsum("bthk,bshk->bhts", q, k) * head_dim**-0.5
  return np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf).max(axis=(0, 2, 3))


@pytest.mark.parametrize("stacked", [False, True], ids=["per_layer_leaves", "stacked"])
def test_mha_clip(stacked):
  rng = np.random.default_rng(4)
  num_layers, d, h, hd = 3, 16, 4, 8
  w = lambda: jnp.asarray(rng.standard_normal((num_layers, d, h * hd)).astype(np.float32))
  q, k, v = w(), w(), w()
  if stacked:
    params = {"blocks": {"q": q, "k": k, "v": v}}
    targets = ko.mha_targets(r"^blocks/q$", r"^blocks/k$", hd)
    get = lambda p, l: (p["blocks"]["q"][l], p["blocks"]["k"][l])
  else:
    params = {f"layers_{l}": {"attn": {"query": {"kernel": q[l]}, "key": {"kernel": k[l]},
                                       "value": {"kernel": v[l]}}} for l in range(num_layers)}
    targets = ko.mha_targets(r"layers_(?P<layer>\d+)/attn/query/kernel$",
                             r"layers_(?P<layer>\d+)/attn/key/kernel$", hd)
    get = lambda p, l: (p[f"layers_{l}"]["attn"]["query"]["kernel"],
                        p[f"layers_{l}"]["attn"]["key"]["kernel"])
  xs = rng.standard_normal((num_layers, B, T, d))
  maxes = lambda p: np.stack([mha_max_logits(*get(p, l), xs[l], hd) for l in range(num_layers)])
  s_LH = maxes(params)
  tau = float(np.median(s_LH))
  tx = ko.muonclip(0.0, qk_clip_targets=targets, qk_clip_tau=tau, ns_dtype=jnp.float32)
  new, metrics = one_step(tx, params, s_LH)
  s_new, clip_LH = maxes(new), s_LH > tau
  np.testing.assert_allclose(s_new[clip_LH], tau, rtol=1e-4)
  assert np.array_equal(s_new[~clip_LH], s_LH[~clip_LH])
  for l in range(num_layers):  # q and k columns of clipped heads scale by sqrt(gamma) each
    scale = np.repeat(np.where(clip_LH[l], np.sqrt(tau / s_LH[l]), 1.0), hd)
    for old, now in zip(get(params, l), get(new, l)):
      np.testing.assert_allclose(now, np.asarray(old) * scale, rtol=1e-6)
  values = lambda p: [x for path, x in jax.tree_util.tree_flatten_with_path(p)[0]
                      if {"v", "value"} & set(path_str(path).split("/"))]
  assert len(values(new)) == (1 if stacked else num_layers)
  for old, now in zip(values(params), values(new)):
    assert np.array_equal(old, now)
  assert np.array_equal(metrics["qk_clip/clipped_heads"], clip_LH.sum(1))


def test_bad_use_raises():
  cfg = small_cfg()
  params = mla_params(cfg)
  s_LH = np.full((cfg.num_hidden_layers, 4), 200.0)
  with pytest.raises(ValueError, match="neither model_config nor qk_clip_targets"):
    ko.muonclip(1e-3)
  with pytest.raises(ValueError, match="not both"):
    ko.muonclip(1e-3, model_config=cfg, qk_clip_targets=ko.mha_targets("q", "k", 8))
  with pytest.raises(ValueError, match="qk_clip_tau"):
    ko.muonclip(1e-3, model_config=cfg, qk_clip_tau=0.0)
  tx = ko.muonclip(1e-3, model_config=cfg)
  state = jax.eval_shape(tx.init, params)
  update = lambda *a, **k: jax.eval_shape(functools.partial(tx.update, **k), *a)  # traces only
  with pytest.raises(ValueError, match="needs max_logits"):
    update(params, state, params)
  with pytest.raises(ValueError, match="needs params"):
    update(params, state, max_logits=s_LH)
  with pytest.raises(ValueError, match=r"max_logits must be \[3, heads\]"):
    update(params, state, params, max_logits=s_LH[:2])
  with pytest.raises(ValueError, match="not 5 heads"):
    update(params, state, params, max_logits=np.full((3, 5), 200.0))
  bad = ko.muonclip(1e-3, qk_clip_targets=ko.mha_targets("nothing_q", "nothing_k", 8))
  with pytest.raises(ValueError, match="match no parameter"):
    jax.eval_shape(bad.init, params)
  with pytest.raises(ValueError, match="exponent"):
    ko.QKClipTarget("q", ((8, 2.0),))
  # Muon without the clip ignores max_logits.
  plain = ko.muon(1e-3)
  jax.eval_shape(functools.partial(plain.update, max_logits=s_LH), params,
                 jax.eval_shape(plain.init, params), params)
