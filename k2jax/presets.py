"""Named model presets: the released architectures and K2-shaped research scales.

`get(name, **overrides)`. The research presets keep K2's shape (first layer dense, MLA with q_lora,
one shared expert, sigmoid router) at sizes that train on a CPU; their routed_scaling_factor comes
from the Moonlight App. C recipe (`derive_routed_scaling_factor`), and is re-derived when an
override changes the expert count or top-k without giving the factor.
"""

from __future__ import annotations

from k2jax.config import ModelConfig, derive_routed_scaling_factor

_YARN_K2 = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
            "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
_YARN_DSV3 = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

_PRESETS = {
    "kimi_k2": dict(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=64, n_shared_experts=1, n_routed_experts=384,
        num_experts_per_tok=8, routed_scaling_factor=2.827, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=1536, kv_lora_rank=512, rope_theta=50000.0,
        rope_scaling=_YARN_K2, max_position_embeddings=131072, rms_norm_eps=1e-6),
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        num_experts_per_tok=8, routed_scaling_factor=2.5, n_group=8, topk_group=4,
        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, rope_theta=10000.0,
        rope_scaling=_YARN_DSV3, max_position_embeddings=163840, rms_norm_eps=1e-6,
        num_nextn_predict_layers=1),
    "moonlight_16b_a3b": dict(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, routed_scaling_factor=2.446, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, rope_theta=50000.0,
        rope_scaling=None, max_position_embeddings=8192, rms_norm_eps=1e-5),
    # Research scales shaped like K2. Sizes: k2_nano ~2M, k2_micro ~17M, k2_small ~130M params.
    "k2_nano": dict(
        vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1, n_routed_experts=16,
        num_experts_per_tok=2, routed_scaling_factor=1.412, first_k_dense_replace=1,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_theta=50000.0, max_position_embeddings=4096),
    "k2_micro": dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=6, num_attention_heads=4, n_shared_experts=1, n_routed_experts=32,
        num_experts_per_tok=4, routed_scaling_factor=1.996, first_k_dense_replace=1,
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_theta=50000.0, max_position_embeddings=4096),
    "k2_small": dict(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=128,
        num_hidden_layers=8, num_attention_heads=8, n_shared_experts=1, n_routed_experts=64,
        num_experts_per_tok=8, routed_scaling_factor=2.823, first_k_dense_replace=1,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        rope_theta=50000.0, max_position_embeddings=4096),
}
RESEARCH = ("k2_nano", "k2_micro", "k2_small")


def names() -> list[str]:
  return list(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
  """The preset `name` with ModelConfig field overrides applied."""
  if name not in _PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {names()}")
  fields = {**_PRESETS[name], **overrides}
  moe_changed = ({"n_routed_experts", "num_experts_per_tok"} & set(overrides)
                 and "routed_scaling_factor" not in overrides)
  if moe_changed and fields["num_experts_per_tok"] <= fields["n_routed_experts"]:
    fields["routed_scaling_factor"] = derive_routed_scaling_factor(
        fields["n_routed_experts"], fields["num_experts_per_tok"])
  return ModelConfig(**fields)
