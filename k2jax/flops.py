"""Training FLOPs per token of a K2-style model (MaxText / DeepSeek accounting).

flops_per_token(cfg, T) = 6 * N_act + 3 * (L + K) * H * (dq + dv) * T

- N_act: activated matmul weights per token: every attention projection of MLA (q_a, q_b or
  q_proj, kv_a, kv_b, o), the dense FFNs, the router, the shared experts and the k routed experts a
  token visits, and the LM head; plus, per multi-token-prediction layer (K of them, trained with
  the main model), its eh_proj, its MoE block and the shared head once more. The embedding lookup
  (a gather) and the norms are not counted. 6 = 2 (multiply-add) * 3 (forward + two backward
  matmuls).
- Attention scores and values: forward 2 * T * H * (dq + dv) per token and layer for full
  attention (q.k over dq, p.v over dv), halved for causal masking (MaxText's convention), times 3
  for training; the MTP layers' blocks attend too.
  Remat recomputation is not counted (MFU, not hardware FLOPs utilisation).
"""

from __future__ import annotations

from k2jax.config import ModelConfig


def attention_matmul_params(cfg: ModelConfig) -> int:
  """Weights of one MLA layer's projections."""
  H, D = cfg.num_attention_heads, cfg.hidden_size
  if cfg.q_lora_rank is None:
    q = D * H * cfg.qk_head_dim
  else:
    q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
  kv_a = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
  o = H * cfg.v_head_dim * D
  return q + kv_a + kv_b + o


def activated_matmul_params(cfg: ModelConfig) -> int:
  """Matmul weights one token passes through in training (embedding lookup excluded, LM head
  included, the MTP layers' eh_proj, MoE blocks and shared head included)."""
  D = cfg.hidden_size
  dense_ffn = 3 * D * cfg.intermediate_size
  moe_ffn = (D * cfg.n_routed_experts
             + 3 * D * cfg.moe_intermediate_size
             * (cfg.num_experts_per_tok + cfg.n_shared_experts))
  mtp = 2 * D * D + attention_matmul_params(cfg) + moe_ffn + D * cfg.vocab_size
  return (cfg.num_hidden_layers * attention_matmul_params(cfg)
          + cfg.num_dense_layers * dense_ffn + cfg.num_moe_layers * moe_ffn
          + D * cfg.vocab_size + cfg.num_nextn_predict_layers * mtp)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs of causal q.k and p.v per token: 3 * (L + K) * H * (dq + dv) * T."""
  return (3.0 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers) * cfg.num_attention_heads
          * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token at sequence length seq_len."""
  if seq_len <= 0:
    raise ValueError(f"flops_per_token: seq_len must be positive, got {seq_len}")
  return 6.0 * activated_matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
