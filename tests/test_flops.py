"""flops_per_token against hand counts."""

import pytest

from k2jax.config import ModelConfig
from k2jax.flops import activated_matmul_params, flops_per_token

TINY = dict(vocab_size=10, hidden_size=4, intermediate_size=6, moe_intermediate_size=3,
            num_hidden_layers=3, num_attention_heads=2, n_shared_experts=1, n_routed_experts=5,
            num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=7, kv_lora_rank=8,
            qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3)


def test_hand_count_tiny():
  cfg = ModelConfig(**TINY)
  # Attention per layer: q_a 4*7 + q_b 7*(2*6) + kv_a 4*(8+2) + kv_b 8*(2*(4+3)) + o (2*3)*4.
  attn = 28 + 84 + 40 + 112 + 24
  dense = 3 * 4 * 6
  moe = 4 * 5 + 3 * 4 * 3 * (2 + 1)  # router + (k routed + shared) experts.
  head = 4 * 10
  n_act = 3 * attn + dense + 2 * moe + head
  assert activated_matmul_params(cfg) == n_act == 1232
  # Causal attention: 3 * L * H * (dq + dv) * T.
  assert flops_per_token(cfg, 16) == 6 * 1232 + 3 * 3 * 2 * (6 + 3) * 16


def test_mtp_layers_add_their_projections_block_and_head():
  """Each MTP layer trains eh_proj [2D, D], one MoE block and the shared head once more."""
  cfg = ModelConfig(**TINY, num_nextn_predict_layers=1)
  mtp = 2 * 4 * 4 + (28 + 84 + 40 + 112 + 24) + (4 * 5 + 3 * 4 * 3 * (2 + 1)) + 4 * 10
  assert activated_matmul_params(cfg) == 1232 + mtp == 1720
  assert flops_per_token(cfg, 16) == 6 * 1720 + 3 * (3 + 1) * 2 * (6 + 3) * 16


def test_plain_q_proj():
  cfg = ModelConfig(**{**TINY, "q_lora_rank": None})
  assert activated_matmul_params(cfg) == 1232 - 3 * (28 + 84) + 3 * 4 * 12


def test_kimi_k2_activated_params():
  """Counting every weight gives about 32.9B activated (embedding + norms included)."""
  cfg = ModelConfig()
  D, L = cfg.hidden_size, cfg.num_hidden_layers
  norms = L * (2 * D + cfg.q_lora_rank + cfg.kv_lora_rank) + D
  total = activated_matmul_params(cfg) + cfg.vocab_size * D + norms
  assert total == pytest.approx(32.9e9, rel=0.02)


def test_bad_seq_len():
  with pytest.raises(ValueError, match="seq_len"):
    flops_per_token(ModelConfig(**TINY), 0)
