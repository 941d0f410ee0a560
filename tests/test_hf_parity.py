"""Logits parity with transformers' DeepseekV3ForCausalLM, and the state-dict bridge's contracts.

The HF model runs eager attention in float32 with weights scaled well above the default init (so
attention is far from uniform) and a random e_score_correction_bias large enough to change which
experts are chosen; each case also asserts that the feature it covers really acts.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_layers import MtpModel
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

from k2jax.config import ModelConfig
from k2jax.hf import config_to_hf, from_torch_state_dict, to_torch_state_dict
from k2jax.model import Transformer, abstract_variables

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, rope_theta=500.0,
            max_position_embeddings=64, routed_scaling_factor=2.5)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 8, "beta_slow": 1}
CASES = {
    # K2-like: q LoRA, one group, 1 dense layer, 1 shared expert, YaRN with mscale = mscale_all_dim.
    "qlora_yarn": ModelConfig(**BASE, num_hidden_layers=2, q_lora_rank=16, n_group=1,
                              topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
                              rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # Moonlight-like q_proj; 2 of 4 groups; 2 dense layers, 2 shared experts; no renormalisation;
    # a large rms_norm_eps that the latent norms (eps 1e-6) must not use.
    "plain_q_groups": ModelConfig(**BASE, num_hidden_layers=4, q_lora_rank=None, n_group=4,
                                  topk_group=2, first_k_dense_replace=2, n_shared_experts=2,
                                  norm_topk_prob=False, rms_norm_eps=1e-2),
    # YaRN without mscale_all_dim: HF scales cos/sin by 0.1 ln(factor) + 1, not the softmax.
    "qlora_groups_yarn_cos": ModelConfig(**BASE, num_hidden_layers=3, q_lora_rank=16, n_group=2,
                                         topk_group=1, first_k_dense_replace=1,
                                         n_shared_experts=2, rope_scaling={**YARN, "mscale": 1.0}),
}
SEQ_LEN = 24  # beyond YaRN's original 16 positions.


def _hf_model(cfg: ModelConfig, rope_interleave: bool = True, seed: int = 0):
  """Eager float32 HF model with weights scaled up from the default init and a random bias."""
  d = {**config_to_hf(cfg), "rope_interleave": rope_interleave}
  hf_cfg = transformers.DeepseekV3Config(**d, attn_implementation="eager",
                                         experts_implementation="eager")
  model = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
  _randomize(model, seed)
  return model


def _hf_forward(model, tokens_BT: np.ndarray):
  """HF logits, attention probabilities and, per MoE layer, (router logits, chosen experts)."""
  routes = []
  hooks = [m.register_forward_hook(lambda _, __, out: routes.append((out[0], out[2])))
           for m in model.modules() if isinstance(m, hf_ds.DeepseekV3TopkRouter)]
  with torch.no_grad():
    out = model(torch.as_tensor(tokens_BT), output_attentions=True)
  for h in hooks:
    h.remove()
  return out.logits.numpy(), [a.numpy() for a in out.attentions], routes


def _ours(cfg: ModelConfig, variables, tokens_BT: np.ndarray):
  return jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens_BT))


def _tokens(cfg: ModelConfig, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, SEQ_LEN))


def _topk_sets(x_TE: torch.Tensor, k: int) -> list[set]:
  return [set(r) for r in torch.topk(x_TE, k, dim=-1)[1].tolist()]


def _check_parity(cfg: ModelConfig, rope_interleave: bool):
  model = _hf_model(cfg, rope_interleave)
  tokens = _tokens(cfg)
  ref, attn, routes = _hf_forward(model, tokens)
  variables = from_torch_state_dict(cfg, model.state_dict(), rope_interleave=rope_interleave)
  logits, aux = _ours(cfg, variables, tokens)
  err = float(np.max(np.abs(np.asarray(logits) - ref)) / np.max(np.abs(ref)))
  assert err <= 1e-5, err
  # Same experts chosen in every MoE layer.
  bias = [m.mlp.gate.e_score_correction_bias for m in model.model.layers[cfg.num_dense_layers:]]
  hf_load = np.stack([np.bincount(idx.reshape(-1).numpy(), minlength=cfg.n_routed_experts)
                      for _, idx in routes])
  np.testing.assert_array_equal(np.asarray(aux["expert_load"]), hf_load)
  # The case exercises what it claims: peaked attention, a bias and groups that change choices.
  assert np.mean([a[..., SEQ_LEN // 2:, :].max(-1).mean() for a in attn]) > 0.5
  k = cfg.num_experts_per_tok
  for (logits_TE, idx_TK), b_E in zip(routes, bias):
    chosen = [set(r) for r in idx_TK.tolist()]
    scores = logits_TE.sigmoid()
    # Differs from plain top-k of the scores (by the bias alone when n_group == 1).
    assert sum(c != u for c, u in zip(chosen, _topk_sets(scores, k))) >= 3
    if cfg.topk_group < cfg.n_group:  # the group limit changes choices too.
      assert sum(c != u for c, u in zip(chosen, _topk_sets(scores + b_E, k))) >= 3


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_parity(name):
  _check_parity(CASES[name], rope_interleave=True)


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["capacity", "ragged"])
def test_logits_parity_other_dispatches(dispatch):
  """The other MoE dispatch paths (capacity large enough to drop nothing) match HF too."""
  cfg = CASES["qlora_groups_yarn_cos"]
  _check_parity(cfg.replace(moe_dispatch=dispatch, capacity_factor=cfg.n_routed_experts /
                            cfg.num_experts_per_tok), rope_interleave=True)


def test_logits_parity_rotate_half_weights():
  """An HF config with rope_interleave=False maps exactly onto k2jax's interleaved RoPE."""
  _check_parity(CASES["qlora_yarn"], rope_interleave=False)


def _numpy_sd(model) -> dict:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _hub_names(sd: dict, cfg: ModelConfig) -> dict:
  """The per-expert hub naming of a transformers state dict."""
  F, out = cfg.moe_intermediate_size, {}
  for name, w in sd.items():
    if name.endswith("experts.gate_up_proj"):
      stem = name[: -len("gate_up_proj")]
      for e in range(cfg.n_routed_experts):
        out[f"{stem}{e}.gate_proj.weight"] = w[e, :F]
        out[f"{stem}{e}.up_proj.weight"] = w[e, F:]
    elif name.endswith("experts.down_proj"):
      stem = name[: -len("down_proj")]
      for e in range(cfg.n_routed_experts):
        out[f"{stem}{e}.down_proj.weight"] = w[e]
    else:
      out[name] = w
  return out


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_identity(name, rope_interleave):
  """HF -> k2jax -> HF gives back every tensor bit for bit, under transformers' exact names."""
  cfg = CASES[name]
  sd = _numpy_sd(_hf_model(cfg, rope_interleave))
  back = to_torch_state_dict(cfg, from_torch_state_dict(cfg, sd, rope_interleave=rope_interleave),
                             rope_interleave=rope_interleave)
  assert list(back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_hub_and_fused_names_give_identical_variables():
  cfg = CASES["plain_q_groups"]
  sd = _numpy_sd(_hf_model(cfg))
  hub = _hub_names(sd, cfg)
  variables = from_torch_state_dict(cfg, sd)
  _assert_same_tree(from_torch_state_dict(cfg, hub), variables)
  back = to_torch_state_dict(cfg, variables, hub_names=True)
  assert sorted(back) == sorted(hub)
  for k in hub:
    np.testing.assert_array_equal(back[k], hub[k], err_msg=k)


def test_layout_matches_the_model():
  """Same tree, shapes and dtypes as the model's variables, for float32 and bfloat16 params."""
  for param_dtype in ("float32", "bfloat16"):
    cfg = CASES["qlora_groups_yarn_cos"].replace(param_dtype=param_dtype)
    ours = from_torch_state_dict(cfg, _hf_model(cfg).state_dict())
    ref = abstract_variables(cfg)
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      assert (x.shape, x.dtype) == (y.shape, y.dtype)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_strict_load_into_transformers():
  """to_torch_state_dict loads strictly into a fresh HF model, also without shared experts."""
  for cfg in (CASES["qlora_yarn"], CASES["qlora_yarn"].replace(n_shared_experts=0)):
    model = _hf_model(cfg)
    variables = from_torch_state_dict(cfg, model.state_dict())
    fresh = _hf_model(cfg, seed=1)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in
                           to_torch_state_dict(cfg, variables).items()}, strict=True)
    tokens = _tokens(cfg)
    np.testing.assert_array_equal(_hf_forward(fresh, tokens)[0], _hf_forward(model, tokens)[0])


def test_torch_bfloat16_tensors():
  cfg = CASES["qlora_yarn"]
  model = _hf_model(cfg)
  expect = from_torch_state_dict(cfg, {k: v.to(torch.bfloat16).float()
                                       for k, v in model.state_dict().items()})
  got = from_torch_state_dict(cfg, {k: v.to(torch.bfloat16) for k, v in
                                    model.state_dict().items()})
  _assert_same_tree(got, expect)


def _randomize(model, seed: int) -> None:
  """Weights well above the default init (peaked attention) and a random routing bias."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1:  # RMSNorm gains.
        p.copy_(1.0 + 0.3 * noise)
      else:  # std gain / sqrt(fan_in); queries and keys 2.5x: attention logits of std ~6.
        gain = 2.5 if ("self_attn.q_" in name or "kv_b_proj" in name) else 1.0
        p.copy_(noise * gain / p.shape[-1] ** 0.5)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _hf_mtp(model):
  """transformers' own MTP module for `model` (as many layers as its config has), randomised, and
  its tensors under DeepSeek-V3's checkpoint names `model.layers.{L + k}.*` (with the copies of
  the embedding and head that DeepSeek's checkpoints carry)."""
  n_main, n_mtp = model.config.num_hidden_layers, model.config.num_nextn_predict_layers
  mtp = MtpModel(model, n_mtp).eval()
  _randomize(mtp, seed=1)
  renames = []
  for k in range(n_mtp):
    layer = f"model.layers.{n_main + k}."
    renames += [(f"layers.{k}.mtp_block.", layer),
                (f"layers.{k}.post_norm.", layer + "shared_head.norm."), (f"layers.{k}.", layer)]
  sd = {}
  for name, w in mtp.state_dict().items():
    prefix, new = next(((p, n) for p, n in renames if name.startswith(p)), (None, None))
    if prefix is not None:
      sd[new + name[len(prefix):]] = w.numpy()
  for k in range(n_mtp):
    layer = f"model.layers.{n_main + k}."
    sd[layer + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().numpy()
    sd[layer + "shared_head.head.weight"] = model.lm_head.weight.detach().numpy()
  return mtp, sd


MTP_CASE = CASES["qlora_yarn"].replace(num_nextn_predict_layers=2)


def test_mtp_logits_match_transformers_mtp_model():
  """Two MTP layers read from DeepSeek-V3's checkpoint names compute what transformers' MtpModel
  computes with the true tokens ahead: depth k's logits of the token k + 1 ahead, from the
  previous depth's normed output (depth 1: the main model's, its head's input) and the embedding
  of the token k ahead. The main logits are those of the model without MTP layers."""
  cfg = MTP_CASE
  model = _hf_model(cfg)
  mtp, mtp_sd = _hf_mtp(model)
  tokens = _tokens(cfg)
  T = tokens.shape[1] - 1
  ref = []
  with torch.no_grad():
    hidden = model(torch.as_tensor(tokens[:, :-1]), output_hidden_states=True).hidden_states[-1]
    for k in range(cfg.num_nextn_predict_layers):  # depth k + 1 reads the token k + 1 ahead.
      ahead = np.pad(tokens[:, k + 1:], ((0, 0), (0, k)))
      hidden = mtp.forward_layer(k, hidden, torch.arange(T)[None], None,
                                 input_ids=torch.as_tensor(ahead))
      ref.append(mtp._project_to_logits(hidden).numpy()[:, :T - k])
  variables = from_torch_state_dict(cfg, {**_numpy_sd(model), **mtp_sd})
  logits, aux = jax.jit(Transformer(cfg).apply)(variables, tokens[:, :-1],
                                                next_tokens_BT=tokens[:, 1:])
  main = CASES["qlora_yarn"]
  np.testing.assert_array_equal(
      logits, _ours(main, from_torch_state_dict(main, _numpy_sd(model)), tokens[:, :-1])[0])
  for k, want in enumerate(ref):  # depth k + 1 has the tokens k + 1 ahead up to position T - k.
    got = np.asarray(aux["mtp_logits"][k, :, :T - k])
    assert float(np.max(np.abs(got - want)) / np.max(np.abs(want))) <= 1e-4, k  # f32 rounding
  n = cfg.num_nextn_predict_layers
  assert aux["max_logits"].shape[0] == cfg.num_hidden_layers + n
  loads = np.asarray(aux["expert_load"][-n:]).sum(-1) / cfg.num_experts_per_tok
  np.testing.assert_array_equal(loads, [tokens.shape[0] * (T - k) for k in range(n)])


@pytest.mark.parametrize("hub_names", [False, True])
def test_round_trip_with_mtp_layer(hub_names):
  """DeepSeek-V3's MTP tensors (with their embedding and head copies) come back bit for bit."""
  cfg = MTP_CASE
  model = _hf_model(cfg)
  sd = {**_numpy_sd(model), **_hf_mtp(model)[1]}
  if hub_names:
    sd = _hub_names(sd, cfg)
  variables = from_torch_state_dict(cfg, sd)
  assert variables["params"]["mtp_layers"]["eh_proj"]["kernel"].shape == (2, 64, 32)
  back = to_torch_state_dict(cfg, variables, hub_names=hub_names)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_mtp_layers_skipped_or_required(caplog):
  """MTP layers past the config's are skipped with one warning (all of them for a config without
  MTP layers); an MTP layer the config has but the checkpoint lacks, or a copy that is not the
  main tensor, is a one-line error naming the layer or tensor."""
  cfg = MTP_CASE
  model = _hf_model(cfg)
  sd, mtp_sd = _numpy_sd(model), _hf_mtp(model)[1]
  full = from_torch_state_dict(cfg, {**sd, **mtp_sd})
  for n, skipped in ((0, "model.layers.2, model.layers.3"), (1, "model.layers.3")):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      got = from_torch_state_dict(cfg.replace(num_nextn_predict_layers=n), {**sd, **mtp_sd})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"layer(s) {skipped} (num_nextn_predict_layers={n})" in \
        warnings[0], warnings
    first = jax.tree.map(lambda x, n=n: x[:n], {c: full[c]["mtp_layers"] for c in full})
    want = {c: {k: v for k, v in full[c].items() if k != "mtp_layers"} for c in full}
    if n:
      want = {c: {**want[c], "mtp_layers": first[c]} for c in full}
    _assert_same_tree(got, want)
  with pytest.raises(ValueError, match=r"no multi-token-prediction layer 'model\.layers\.2' "
                                       r"\(num_nextn_predict_layers=2\)"):
    from_torch_state_dict(cfg, sd)
  copy = "model.layers.2.shared_head.head.weight"
  with pytest.raises(ValueError, match=rf"'{copy}' differs from the main model's lm_head/kernel"):
    from_torch_state_dict(cfg, {**sd, **mtp_sd, copy: mtp_sd[copy] + 1})


def test_recomputed_rope_buffers_are_skipped():
  """`named_buffers()` adds rotary_emb.inv_freq (and original_inv_freq), recomputed from the
  config: skipped like transformers does, with the same variables as the plain state dict."""
  cfg = CASES["qlora_yarn"]
  model = _hf_model(cfg)
  buffers = {k: v.numpy() for k, v in model.named_buffers()}
  assert any(k.endswith("rotary_emb.inv_freq") for k in buffers)
  _assert_same_tree(from_torch_state_dict(cfg, {**_numpy_sd(model), **buffers}),
                    from_torch_state_dict(cfg, _numpy_sd(model)))


def test_errors_name_the_tensor():
  cfg = CASES["qlora_yarn"]
  sd = _numpy_sd(_hf_model(cfg))
  name = "model.layers.1.mlp.experts.gate_up_proj"
  with pytest.raises(ValueError, match=rf"missing tensor '{name}'"):
    from_torch_state_dict(cfg, {k: v for k, v in sd.items() if k != name})
  bad = "model.layers.0.self_attn.kv_b_proj.weight"
  with pytest.raises(ValueError, match=rf"'{bad}' has shape \(64, 8\)"):
    from_torch_state_dict(cfg, {**sd, bad: sd[bad][:, :8]})
  with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.mlp.extra'"):
    from_torch_state_dict(cfg, {**sd, "model.layers.0.mlp.extra": sd[bad]})
  scale = "model.layers.0.self_attn.o_proj.weight_scale_inv"
  with pytest.raises(ValueError, match=rf"'{scale}': FP8"):
    from_torch_state_dict(cfg, {**sd, scale: np.ones((1, 1), np.float32)})
  variables = from_torch_state_dict(cfg, sd)
  del variables["router"]["moe_layers"]
  with pytest.raises(ValueError, match="missing variable 'router/moe_layers/moe/e_score"):
    to_torch_state_dict(cfg, variables)
