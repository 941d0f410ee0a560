"""k2jax.hf config conversion: hub configs, transformers 5.x configs, round trips, bad fields."""

import dataclasses

import numpy as np
import pytest
import transformers
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

from k2jax.config import ModelConfig, softmax_scale
from k2jax.hf import config_from_hf, config_to_hf
from k2jax.model.rope import rope_frequencies

# The hub config.json files, as published (quantization_config and auto_map trimmed).
K2_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 163584,
    "eos_token_id": 163585, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 131072, "model_type": "kimi_k2",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.48.3", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 163840,
}
DSV3_HUB = {
    **K2_HUB, "model_type": "deepseek_v3", "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "max_position_embeddings": 163840, "n_group": 8,
    "n_routed_experts": 256, "num_attention_heads": 128, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "topk_group": 4, "vocab_size": 129280,
}
OWN_FIELDS = ("dtype", "param_dtype", "moe_dispatch", "capacity_factor", "moe_block_size",
              "scan_layers", "remat")
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                   num_hidden_layers=3, num_attention_heads=2, n_routed_experts=8,
                   num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                   q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                   v_head_dim=8, rope_theta=500.0, max_position_embeddings=64,
                   routed_scaling_factor=2.5, norm_topk_prob=False, rms_norm_eps=1e-5,
                   n_shared_experts=2, num_nextn_predict_layers=0, init_std=0.05)
TINY_YARN = TINY.replace(q_lora_rank=8, rope_scaling={
    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8,
    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5})


def test_k2_hub_config_is_the_k2_preset():
  cfg = config_from_hf(K2_HUB)
  k2 = ModelConfig()
  for f in dataclasses.fields(ModelConfig):
    if f.name != "rope_scaling":
      assert getattr(cfg, f.name) == getattr(k2, f.name), f.name
  assert cfg.rope_scaling == {"rope_type": "yarn", **{
      k: v for k, v in K2_HUB["rope_scaling"].items() if k != "type"}}
  assert softmax_scale(cfg) == pytest.approx(0.130861, abs=1e-6)


def test_dsv3_hub_config():
  cfg = config_from_hf(DSV3_HUB)
  assert (cfg.n_group, cfg.topk_group, cfg.first_k_dense_replace) == (8, 4, 3)
  assert (cfg.n_routed_experts, cfg.num_attention_heads, cfg.rope_theta) == (256, 128, 10000.0)
  assert cfg.num_nextn_predict_layers == 1
  assert softmax_scale(cfg) == pytest.approx(0.135234, abs=1e-6)


@pytest.mark.parametrize("hub", [K2_HUB, DSV3_HUB], ids=["k2", "dsv3"])
def test_legacy_and_transformers5_forms_agree(hub):
  """transformers 5.x rewrites rope_scaling/rope_theta into rope_parameters: same ModelConfig."""
  d5 = transformers.DeepseekV3Config(**hub).to_dict()
  assert "rope_scaling" not in d5 and d5["rope_parameters"]["rope_type"] == "yarn"
  assert config_from_hf(d5) == config_from_hf(hub)


@pytest.mark.parametrize("cfg", [TINY, TINY_YARN, ModelConfig()], ids=["tiny", "yarn", "k2"])
def test_round_trip(cfg):
  own = {k: getattr(cfg, k) for k in OWN_FIELDS}
  assert config_from_hf(config_to_hf(cfg), **own) == cfg
  d5 = transformers.DeepseekV3Config(**config_to_hf(cfg)).to_dict()
  assert config_from_hf(d5, **own) == cfg


@pytest.mark.parametrize("cfg", [TINY, TINY_YARN, config_from_hf(K2_HUB)],
                         ids=["tiny", "yarn", "k2"])
def test_transformers_computes_the_same_rope_and_scale(cfg):
  """HF's RoPE frequencies, cos/sin factor and softmax scale from config_to_hf match ours."""
  hf = transformers.DeepseekV3Config(**config_to_hf(cfg))
  assert hf.rope_interleave and hf.num_key_value_heads == hf.num_attention_heads
  rotary = hf_ds.DeepseekV3RotaryEmbedding(hf)
  inv_freq, factor = rope_frequencies(cfg)
  np.testing.assert_allclose(rotary.inv_freq.numpy(), inv_freq, rtol=1e-6)
  assert rotary.attention_scaling == pytest.approx(factor, rel=1e-12)
  hf_scale = hf_ds.yarn_apply_mscale(hf.rope_parameters, hf.qk_head_dim ** -0.5)
  assert hf_scale == pytest.approx(softmax_scale(cfg), rel=1e-12)


def test_rope_parameters_without_scaling():
  d = {**config_to_hf(TINY), "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}
  cfg = config_from_hf(d)
  assert cfg.rope_scaling is None and cfg.rope_theta == 123.0


def test_yarn_defaults_follow_transformers():
  """A YaRN dict without factor takes max_position_embeddings / original length."""
  d = {**K2_HUB, "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}}
  assert config_from_hf(d).rope_scaling["factor"] == 32.0


@pytest.mark.parametrize("field,value", [
    ("model_type", "llama"), ("tie_word_embeddings", True), ("attention_bias", True),
    ("num_key_value_heads", 8), ("topk_method", "greedy"), ("scoring_func", "softmax"),
    ("hidden_act", "gelu"), ("moe_layer_freq", 2), ("attention_dropout", 0.1),
    ("rope_interleave", None), ("n_group", None),
])
def test_unsupported_value_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    config_from_hf({**K2_HUB, field: value})


@pytest.mark.parametrize("rope,culprit", [
    ({"type": "linear", "factor": 2.0}, "rope_type 'linear'"),
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096, "low": 1},
     "'low'"),
])
def test_unsupported_rope_names_the_problem(rope, culprit):
  with pytest.raises(ValueError, match=culprit):
    config_from_hf({**K2_HUB, "rope_scaling": rope})


def test_missing_field_and_bad_override():
  d = dict(K2_HUB)
  del d["kv_lora_rank"]
  with pytest.raises(ValueError, match="kv_lora_rank"):
    config_from_hf(d)
  with pytest.raises(ValueError, match="bogus"):
    config_from_hf(K2_HUB, bogus=1)
  assert config_from_hf(K2_HUB, dtype="bfloat16", num_hidden_layers=2).num_hidden_layers == 2
