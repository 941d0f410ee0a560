"""Multi-token prediction: the forward against a float64 numpy reference written from DeepSeek-V3's
equations (MoE in the MTP blocks, packed segments), the "mtp" loss term against hand-computed
cross-entropies of shifted targets, its weight schedule, lambda = 0 against training without
MTP layers, and QK-Clip and the router-bias update covering the MTP blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k2jax import optim
from k2jax.config import ModelConfig
from k2jax.model import Transformer, init_variables
from k2jax.model.counting import count_params
from k2jax.train import default_config, init_state, losses, make_train_step, model_config
from k2jax.train.config import ConfigError
from k2jax.train.schedules import make_schedule
from k2jax.train.step import make_eval_step

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=2, n_shared_experts=1,
                  n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=1.8,
                  first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=8, rope_theta=1000.0, max_position_embeddings=64,
                  num_nextn_predict_layers=2, init_std=0.3)
# Packed rows of T + 1 = 17 tokens: row 0 holds segments of 7, 2 and 5 tokens and padding; row 1
# one sequence whose last token is only a target.
SEGMENTS = np.array([[1] * 7 + [2] * 2 + [3] * 5 + [0] * 3, [1] * 17])


def _variables(seed: int = 0) -> dict:
  """Random weights, norm gains away from 1 and a router bias that changes choices."""
  v = init_variables(CFG, seed)
  rng = np.random.default_rng(seed)
  scale = lambda path, x: (1 + 0.3 * rng.standard_normal(x.shape)).astype(x.dtype) \
      if path[-1].key == "scale" else x
  return {"params": jax.tree_util.tree_map_with_path(scale, v["params"]),
          "router": jax.tree.map(lambda b: 0.1 * rng.standard_normal(b.shape).astype(b.dtype),
                                 v["router"])}


def _batch(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  positions = np.zeros_like(SEGMENTS)
  for row, seg in zip(positions, SEGMENTS):
    for s in set(seg):
      row[seg == s] = np.arange(np.sum(seg == s))
  return {"tokens": rng.integers(0, CFG.vocab_size, SEGMENTS.shape).astype(np.int32),
          "segment_ids": SEGMENTS.astype(np.int32), "positions": positions.astype(np.int32),
          "loss_mask": (rng.random(SEGMENTS.shape) < 0.7).astype(np.float32)}


# The reference: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in float64 numpy, one sequence at a time.

def _rms(x, g, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g


def _rope(x, positions):
  """Rotates the interleaved pairs (2i, 2i + 1) of x [T, ..., dr] by position * theta^(-2i/dr)."""
  dr = x.shape[-1]
  angle = positions[:, None] * CFG.rope_theta ** (-np.arange(0, dr, 2) / dr)
  angle = angle.reshape(angle.shape[:1] + (1,) * (x.ndim - 2) + angle.shape[1:])
  out = np.empty_like(x)
  out[..., 0::2] = x[..., 0::2] * np.cos(angle) - x[..., 1::2] * np.sin(angle)
  out[..., 1::2] = x[..., 1::2] * np.cos(angle) + x[..., 0::2] * np.sin(angle)
  return out


def _attention(p, x):
  """Causal MLA over one sequence x [T, D] at positions 0..T-1."""
  T, H = x.shape[0], CFG.num_attention_heads
  dn, dr, C = CFG.qk_nope_head_dim, CFG.qk_rope_head_dim, CFG.kv_lora_rank
  q = (_rms(x @ p["q_a"]["kernel"], p["q_a_norm"]["scale"]) @ p["q_b"]["kernel"]).reshape(T, H, -1)
  kv = x @ p["kv_a"]["kernel"]
  k_v = (_rms(kv[:, :C], p["kv_a_norm"]["scale"]) @ p["kv_b"]["kernel"]).reshape(T, H, -1)
  positions = np.arange(T, dtype=np.float64)
  logits = (np.einsum("thd,shd->hts", q[..., :dn], k_v[..., :dn])
            + np.einsum("thd,sd->hts", _rope(q[..., dn:], positions), _rope(kv[:, C:], positions)))
  logits = np.where(np.tril(np.ones((T, T), bool)), logits / np.sqrt(dn + dr), -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("hts,shd->thd", probs, k_v[..., dn:]).reshape(T, -1) @ p["o"]["kernel"]


def _swiglu(x, gate, up, down):
  a = x @ gate
  return (a / (1 + np.exp(-a)) * (x @ up)) @ down


def _moe(p, bias, x):
  """Sigmoid scores; top-k of scores + bias; weights = the chosen scores renormalised, scaled."""
  scores = 1 / (1 + np.exp(-(x @ p["router"]["kernel"])))
  ex = p["experts"]
  out = _swiglu(x, p["shared"]["gate"]["kernel"], p["shared"]["up"]["kernel"],
                p["shared"]["down"]["kernel"])
  for t in range(x.shape[0]):
    chosen = np.argsort(-(scores[t] + bias))[:CFG.num_experts_per_tok]
    weights = scores[t, chosen] / scores[t, chosen].sum() * CFG.routed_scaling_factor
    for e, w in zip(chosen, weights):
      out[t] += w * _swiglu(x[t], ex["gate"][e], ex["up"][e], ex["down"][e])
  return out


def _block(p, bias, x):
  h = x + _attention(p["attn"], _rms(x, p["attn_norm"]["scale"]))
  y = _rms(h, p["ffn_norm"]["scale"])
  if bias is None:
    return h + _swiglu(y, *(p["mlp"][n]["kernel"] for n in ("gate", "up", "down")))
  return h + _moe(p["moe"], bias, y)


def _reference(v, seq, m):
  """One sequence t_0..t_{n-1} of which the first m are inputs: (main logits [m, V], and per depth
  k = 1..K the MTP logits [n_k, V] at positions i < min(m, n - k), where t_{i+k} exists).

  Depth k: h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(g^{k-1}_i)]), g^k = norm(Block(h')),
  logits = head(g^k); g^0 = the main model's final norm output (DeepSeek-V3 §2.2).
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  r = jax.tree.map(lambda a: np.asarray(a, np.float64), v["router"])
  layer = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
  emb, head = p["embed"]["embedding"], p["lm_head"]["kernel"]
  x = emb[seq[:m]]
  for i in range(CFG.num_dense_layers):
    x = _block(layer(p["dense_layers"], i), None, x)
  for i in range(CFG.num_moe_layers):
    x = _block(layer(p["moe_layers"], i), r["moe_layers"]["moe"]["e_score_correction_bias"][i], x)
  g = _rms(x, p["final_norm"]["scale"])
  main, mtp = g @ head, []
  for k in range(1, CFG.num_nextn_predict_layers + 1):
    d, n_k = layer(p["mtp_layers"], k - 1), min(m, len(seq) - k)
    if n_k <= 0:  # no token k ahead in the sequence: depth k (and deeper) predicts nothing.
      mtp.append(np.zeros((0, head.shape[1])))
      g = g[:0]
      continue
    h = np.concatenate([_rms(emb[seq[k:k + n_k]], d["enorm"]["scale"]),
                        _rms(g[:n_k], d["hnorm"]["scale"])], -1) @ d["eh_proj"]["kernel"]
    bias = r["mtp_layers"]["block"]["moe"]["e_score_correction_bias"][k - 1]
    g = _rms(_block(d["block"], bias, h), d["norm"]["scale"])
    mtp.append(g @ head)
  return main, mtp


def test_forward_matches_the_float64_reference_with_packed_segments():
  """Main and MTP logits of packed rows equal the reference run on each segment alone, where
  depth k sees only the positions whose token k ahead is in the same segment; each depth's
  expert load counts exactly those positions."""
  v, batch = _variables(), _batch()
  tokens, seg = batch["tokens"], batch["segment_ids"]
  logits, aux = jax.jit(Transformer(CFG).apply)(
      v, tokens[:, :-1], batch["positions"][:, :-1], seg[:, :-1], next_tokens_BT=tokens[:, 1:],
      next_segment_ids_BT=seg[:, 1:])
  logits, mtp_logits = np.asarray(logits), np.asarray(aux["mtp_logits"])
  K, T = CFG.num_nextn_predict_layers, tokens.shape[1] - 1
  assert mtp_logits.shape == (K, 2, T, CFG.vocab_size)
  errors, positions = [], np.zeros(K, int)
  for b in range(2):
    for s in set(seg[b]) - {0}:
      where = np.flatnonzero(seg[b] == s)
      m = np.sum(where < T)
      main, mtp = _reference(v, tokens[b, where], m)
      errors.append(np.abs(logits[b, where[:m]] - main).max() / np.abs(main).max())
      for k, want in enumerate(mtp):
        positions[k] += len(want)
        if len(want):
          errors.append(np.abs(mtp_logits[k, b, where[:len(want)]] - want).max()
                        / np.abs(want).max())
  assert max(errors) < 1e-4, errors
  assert list(positions) == [6 + 1 + 4 + 16, 5 + 0 + 3 + 15]  # a 2-token segment: none at k=2
  load = np.asarray(aux["expert_load"][CFG.num_moe_layers:]).sum(-1)
  np.testing.assert_array_equal(load, positions * CFG.num_experts_per_tok)


def test_mtp_term_is_the_cross_entropy_of_the_shifted_targets():
  """Depth k's cross-entropy on t_{i+k+1}, over the targets in the same segment with their loss
  mask, averaged over the depths; the main term is untouched by the MTP layers."""
  v, batch = _variables(1), _batch(1)
  got = make_eval_step(CFG, {"cross_entropy": 1.0, "mtp": 1.0})(v["params"], v["router"], batch)
  tokens, seg, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
  logits, aux = Transformer(CFG).apply(v, **losses.model_inputs(batch, mtp=True))
  logp = np.asarray(jax.nn.log_softmax(aux["mtp_logits"]), np.float64)
  T = tokens.shape[1] - 1
  depth_ce = []
  for k in range(1, CFG.num_nextn_predict_layers + 1):
    total = count = 0.0
    for b in range(2):
      for i in range(T):
        j = i + k + 1
        if j <= T and seg[b, i] > 0 and seg[b, j] == seg[b, i]:
          total -= mask[b, j] * logp[k - 1, b, i, tokens[b, j]]
          count += mask[b, j]
    depth_ce.append(total / count)
  assert float(got["mtp"]) == pytest.approx(np.mean(depth_ce), rel=1e-5)
  assert abs(depth_ce[0] - depth_ce[1]) > 1e-3  # two different depths are averaged.
  plain = CFG.replace(num_nextn_predict_layers=0)
  no_mtp = {c: {k: x for k, x in v[c].items() if k != "mtp_layers"} for c in v}
  want = make_eval_step(plain)(no_mtp["params"], no_mtp["router"], batch)
  assert float(got["cross_entropy"]) == float(want["cross_entropy"])
  assert float(got["loss"]) == pytest.approx(float(got["cross_entropy"] + got["mtp"]), rel=1e-6)


def _random_batch(seed: int, B: int = 4, T: int = 16) -> dict:
  return {"tokens": jax.random.randint(jax.random.key(seed), (B, T + 1), 0, CFG.vocab_size,
                                       jnp.int32)}


@pytest.mark.slow  # three train steps to compile.
def test_lambda_zero_trains_exactly_as_without_mtp_layers():
  """With lambda = 0 the main model's parameters, router biases and loss follow the run of the
  same model without MTP layers to float32 rounding (two programs, which XLA may fuse
  differently: a few ulps; the MTP layers run and are reported, but teach nothing); with lambda =
  0.3 the MTP loss trains the main model too, thousands of ulps away. (AdamW: Muon batches the
  Newton-Schulz iteration of equal-shaped matrices, and the MTP layers' matrices joining those
  batches change their rounding, not the gradient.)"""
  sched = make_schedule("constant", 1e-2, 100, 0)
  runs = {}
  for name, cfg, weights in (("plain", CFG.replace(num_nextn_predict_layers=0),
                              {"cross_entropy": 1.0}),
                             ("zero", CFG, {"cross_entropy": 1.0, "mtp": 0.0}),
                             ("on", CFG, {"cross_entropy": 1.0, "mtp": 0.3})):
    tx = optim.adamw(sched)
    step = make_train_step(cfg, tx, sched, loss_weights=weights, grad_clip=1.0,
                           bias_update_rate=1e-3)
    state, metrics = init_state(cfg, tx, seed=0), []
    for i in range(3):
      state, m = step(state, _random_batch(i))
      metrics.append(m)
    runs[name] = (state, metrics)
  main = lambda tree: {k: x for k, x in tree.items() if k != "mtp_layers"}
  (plain, m_plain), (zero, m_zero), (on, _) = runs["plain"], runs["zero"], runs["on"]
  for a, b in zip(jax.tree.leaves((plain.params, plain.router)),
                  jax.tree.leaves((main(zero.params), main(zero.router)))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(m_plain, m_zero):
    assert float(a["cross_entropy"]) == pytest.approx(float(b["cross_entropy"]), rel=1e-6)
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
    assert float(b["mtp"]) > 1.0
  moved = [np.abs(a - b).max() > 1e-4 for a, b in zip(jax.tree.leaves(plain.params),
                                                       jax.tree.leaves(main(on.params)))]
  assert all(moved)


@pytest.mark.slow  # an MTP train step compiled and run three times.
def test_weight_schedule_and_bad_weights():
  """(0.3, 0.1, 2): lambda is 0.3 for steps 0 and 1, then 0.1; malformed weights and an MTP term
  without MTP layers are one-line errors naming the key."""
  sched = make_schedule("constant", 0.0, 100, 0)
  tx = optax.with_extra_args_support(optax.sgd(0.0))
  step = make_train_step(CFG, tx, sched, loss_weights={"cross_entropy": 1.0,
                                                       "mtp": (0.3, 0.1, 2)})
  state = init_state(CFG, tx, seed=0)
  for want in (0.3, 0.3, 0.1):
    state, m = step(state, _random_batch(0))
    lam = (float(m["loss"]) - float(m["cross_entropy"])) / float(m["mtp"])
    assert lam == pytest.approx(want, rel=1e-5)
  for w, match in [((0.3, 0.1), r"as a schedule must be \(value >= 0, final >= 0, switch_step"),
                   ((0.3, -0.1, 5), "as a schedule must be"), ((0.3, 0.1, 2.5), "as a schedule"),
                   (-0.3, "must be a number >= 0, got -0.3")]:
    with pytest.raises(ValueError, match=rf"^config.loss.mtp {match}"):
      losses.check_weights({"mtp": w})
  plain = CFG.replace(num_nextn_predict_layers=0)
  with pytest.raises(ValueError, match=r"^config.loss.mtp needs model.num_nextn_predict_layers"):
    make_train_step(plain, tx, sched, loss_weights={"cross_entropy": 1.0, "mtp": 0.3})
  config = default_config()
  config.loss.mtp = (0.3, 0.1, 400)
  with pytest.raises(ConfigError, match=r"^config.loss.mtp needs model.num_nextn_predict"):
    model_config(config, 257)
  config.model.num_nextn_predict_layers = 1
  assert model_config(config, 257).num_nextn_predict_layers == 1


@pytest.mark.slow  # two train steps to compile.
def test_accumulation_weighs_each_depth_over_the_whole_batch():
  """Micro-batches with very different numbers of targets per depth: the accumulated MTP term
  equals the one-batch term (each depth normalised by its count over the whole batch)."""
  sched = make_schedule("constant", 0.0, 100, 0)
  tx = optax.with_extra_args_support(optax.sgd(0.0))
  batch = {k: np.tile(x, (2, 1)) for k, x in _batch(2).items()}
  batch["loss_mask"][0::2, :12] = 0.0  # micro-batch 0 (rows 0 and 2) keeps few targets.
  values = []
  for accum in (1, 2):
    step = make_train_step(CFG, tx, sched, loss_weights={"cross_entropy": 1.0, "mtp": 0.3},
                           grad_accum=accum)
    values.append(step(init_state(CFG, tx, seed=0), batch)[1])
  for key in ("mtp", "cross_entropy", "loss"):
    assert float(values[1][key]) == pytest.approx(float(values[0][key]), rel=2e-5), key


@pytest.mark.slow  # a compiled cross-check: make test runs it, make test-fast not.
def test_qk_clip_and_router_bias_cover_the_mtp_blocks():
  """max_logits rows L..L+K-1 are the MTP blocks': QK-Clip rescales their query/key columns by
  tau / S_max, and each MTP block's routing bias moves by the sign rule on its own expert load."""
  sched = make_schedule("constant", 0.0, 100, 0)
  tau, rate = 0.5, 0.01
  tx = optim.muonclip(sched, model_config=CFG, qk_clip_tau=tau, weight_decay=0.0)
  step = make_train_step(CFG, tx, sched, loss_weights={"cross_entropy": 1.0, "mtp": 0.3},
                         bias_update_rate=rate)
  v, batch = _variables(3), _random_batch(3)
  state = init_state(CFG, tx, seed=0).replace(params=v["params"], router=v["router"])
  _, aux = Transformer(CFG).apply(v, **losses.model_inputs(batch, mtp=True))
  params, router = jax.tree.map(np.array, (state.params, state.router))  # the step donates.
  new, m = step(state, batch)
  L, Lm, K, H = (CFG.num_hidden_layers, CFG.num_moe_layers, CFG.num_nextn_predict_layers,
                 CFG.num_attention_heads)
  s_KH = np.asarray(aux["max_logits"][L:], np.float64)
  assert aux["max_logits"].shape == (L + K, H) and np.all(s_KH > tau)
  assert int(m["clipped_heads"]) == int(np.sum(np.asarray(aux["max_logits"]) > tau))
  gamma_KH = tau / s_KH
  dn, dr, dv = CFG.qk_nope_head_dim, CFG.qk_rope_head_dim, CFG.v_head_dim
  old, got = (p["mtp_layers"]["block"]["attn"] for p in (params, new.params))
  q_scale = np.concatenate([np.repeat(np.sqrt(gamma_KH)[..., None], dn, -1),
                            np.repeat(gamma_KH[..., None], dr, -1)], -1).reshape(K, 1, -1)
  kv_scale = np.concatenate([np.repeat(np.sqrt(gamma_KH)[..., None], dn, -1),
                             np.ones((K, H, dv))], -1).reshape(K, 1, -1)
  np.testing.assert_allclose(got["q_b"]["kernel"], old["q_b"]["kernel"] * q_scale, rtol=1e-6)
  np.testing.assert_allclose(got["kv_b"]["kernel"], old["kv_b"]["kernel"] * kv_scale, rtol=1e-6)
  load_KE = np.asarray(aux["expert_load"][Lm:])
  bias = lambda r: np.asarray(r["mtp_layers"]["block"]["moe"]["e_score_correction_bias"])
  want = bias(router) + rate * np.sign(load_KE.mean(-1, keepdims=True) - load_KE)
  np.testing.assert_allclose(bias(new.router), want, rtol=1e-6)
  assert np.any(np.sign(load_KE.mean(-1, keepdims=True) - load_KE) != 0)


def test_parameter_count_keeps_the_mtp_layers_apart():
  """The main model's totals are those of the model without MTP layers (as DeepSeek-V3's 671B);
  "mtp" holds each layer's enorm, hnorm, eh_proj [2D, D], MoE block and head norm."""
  plain, with_mtp = count_params(CFG.replace(num_nextn_predict_layers=0)), count_params(CFG)
  assert plain["mtp"] == 0 and {**with_mtp, "mtp": 0} == plain
  D, H, F, E = CFG.hidden_size, CFG.num_attention_heads, CFG.moe_intermediate_size, 8
  attn = (D * 16 + 16 + 16 * H * 16 + D * (16 + 8) + 16 + 16 * H * (8 + 8) + H * 8 * D)
  moe = D * E + 3 * E * D * F + 3 * D * F
  assert with_mtp["mtp"] == CFG.num_nextn_predict_layers * (3 * D + 2 * D * D + attn + 2 * D + moe)
