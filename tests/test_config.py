"""ModelConfig validation, presets, parameter counts, routed scaling factor, softmax scale."""

import pytest

from k2jax import presets
from k2jax.config import ModelConfig, derive_routed_scaling_factor, softmax_scale
from k2jax.model.counting import count_params


@pytest.mark.parametrize("changes, field", [
    (dict(num_experts_per_tok=20, n_routed_experts=16), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_attention_heads=-1), "num_attention_heads"),
    (dict(moe_dispatch="magic"), "moe_dispatch"),
    (dict(dtype="float8"), "dtype"),
    (dict(remat="sometimes"), "remat"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(moe_block_size=-8), "moe_block_size"),
])
def test_validation_errors_are_one_line_and_name_the_field(changes, field):
  with pytest.raises(ValueError) as e:
    presets.get("k2_nano", **changes)
  msg = str(e.value)
  assert "\n" not in msg and f"ModelConfig.{field}" in msg


def test_unknown_preset_and_field():
  with pytest.raises(ValueError, match="unknown preset 'k3'"):
    presets.get("k3")
  with pytest.raises(ValueError, match="unknown field"):
    ModelConfig.from_dict({"hidden_sise": 3})


def test_config_is_hashable_and_round_trips():
  cfg = presets.get("kimi_k2")
  assert hash(cfg) == hash(presets.get("kimi_k2"))
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name, total, activated, tol, no_embed", [
    ("kimi_k2", 1.04e12, 32.6e9, 0.02, False),
    ("deepseek_v3", 671e9, 37e9, 0.02, False),
    ("moonlight_16b_a3b", 15.29e9, 2.24e9, 0.005, True),
])
def test_param_counts_match_the_papers(name, total, activated, tol, no_embed):
  c = count_params(presets.get(name))
  got_total = c["total_no_embed"] if no_embed else c["total"]
  got_act = c["activated_no_embed"] if no_embed else c["activated"]
  assert abs(got_total / total - 1) < tol, got_total
  assert abs(got_act / activated - 1) < tol, got_act


def test_routed_scaling_factor_recipe():
  assert abs(derive_routed_scaling_factor(64, 6) - 2.446) <= 0.002
  assert abs(derive_routed_scaling_factor(384, 8) - 2.827) <= 0.002
  for name in presets.RESEARCH:
    cfg = presets.get(name)
    derived = derive_routed_scaling_factor(cfg.n_routed_experts, cfg.num_experts_per_tok)
    assert cfg.routed_scaling_factor == derived
  cfg = presets.get("k2_nano", n_routed_experts=32, num_experts_per_tok=4)
  assert cfg.routed_scaling_factor == derive_routed_scaling_factor(32, 4)


def test_research_presets_are_k2_shaped():
  for name in presets.RESEARCH:
    cfg = presets.get(name)
    assert cfg.first_k_dense_replace == 1 and cfg.n_shared_experts == 1
    assert cfg.q_lora_rank is not None
  sizes = [count_params(presets.get(n))["total"] for n in presets.RESEARCH]
  assert sizes[0] < 5e6 and 50e6 < sizes[2] < 300e6 and sizes == sorted(sizes)


def test_softmax_scale_with_yarn_mscale():
  assert softmax_scale(presets.get("kimi_k2")) == pytest.approx(0.130861, abs=1e-6)
  assert softmax_scale(presets.get("deepseek_v3")) == pytest.approx(0.135234, abs=1e-6)
  assert softmax_scale(presets.get("moonlight_16b_a3b")) == pytest.approx(192 ** -0.5)
