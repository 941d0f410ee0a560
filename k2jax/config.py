"""ModelConfig: the DeepSeek-V3 / Kimi K2 architecture with Hugging Face field names.

Fields mirror `transformers.DeepseekV3Config`; the extra fields at the end are
k2jax's own (compute dtype, init, MoE dispatch, scanning and remat). Every field is checked at
construction and a bad one raises a one-line `ValueError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

DISPATCHES = ("sort", "capacity", "ragged")
REMATS = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture plus numerics of one K2-style model (HF field names)."""

  vocab_size: int = 163840
  hidden_size: int = 7168
  intermediate_size: int = 18432
  moe_intermediate_size: int = 2048
  num_hidden_layers: int = 61
  num_attention_heads: int = 64
  n_shared_experts: int = 1
  n_routed_experts: int = 384
  num_experts_per_tok: int = 8
  routed_scaling_factor: float = 2.827
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = True
  first_k_dense_replace: int = 1
  q_lora_rank: int | None = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 50000.0
  rope_scaling: dict | None = None
  max_position_embeddings: int = 131072
  num_nextn_predict_layers: int = 0
  # k2jax's own fields.
  dtype: str = "float32"  # compute dtype of matmuls (they accumulate in float32).
  param_dtype: str = "float32"
  init_std: float = 0.02
  moe_dispatch: str = "sort"  # sort (dropless, CPU default) | capacity | ragged (GPU/TPU).
  capacity_factor: float = 1.25  # capacity path; also the sort path's fast no-drop layout.
  moe_block_size: int = 0  # rows per block of the sort path's block layout; 0: auto (dispatch.py).
  scan_layers: bool = True
  remat: str = "none"  # none | full | dots (save matmul outputs).

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                 "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "max_position_embeddings", "n_group", "topk_group"):
      _check(isinstance(getattr(self, name), (int, np.integer)) and getattr(self, name) > 0,
             name, f"must be a positive integer, got {getattr(self, name)!r}")
    for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers",
                 "moe_block_size"):
      _check(isinstance(getattr(self, name), (int, np.integer)) and getattr(self, name) >= 0,
             name, f"must be a non-negative integer, got {getattr(self, name)!r}")
    _check(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
           "q_lora_rank", f"must be None or a positive integer, got {self.q_lora_rank!r}")
    _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
           f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
    _check(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
           f"({self.num_experts_per_tok}) must not exceed n_routed_experts "
           f"({self.n_routed_experts})")
    _check(self.n_routed_experts % self.n_group == 0, "n_group",
           f"({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})")
    _check(self.topk_group <= self.n_group, "topk_group",
           f"({self.topk_group}) must not exceed n_group ({self.n_group})")
    _check(self.num_experts_per_tok <= self.topk_group * self.n_routed_experts // self.n_group,
           "num_experts_per_tok", f"({self.num_experts_per_tok}) exceeds the experts left in "
           f"topk_group={self.topk_group} of n_group={self.n_group} groups")
    _check(self.n_group == 1 or self.n_routed_experts // self.n_group >= 2, "n_group",
           f"({self.n_group}) leaves fewer than 2 experts per group (groups rank by their top 2)")
    _check(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
           f"({self.first_k_dense_replace}) exceeds num_hidden_layers ({self.num_hidden_layers})")
    for name in ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "init_std",
                 "capacity_factor"):
      _check(float(getattr(self, name)) > 0, name, f"must be positive, got {getattr(self, name)!r}")
    _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
    _check(self.param_dtype in DTYPES, "param_dtype",
           f"must be one of {DTYPES}, got {self.param_dtype!r}")
    _check(self.moe_dispatch in DISPATCHES, "moe_dispatch",
           f"must be one of {DISPATCHES}, got {self.moe_dispatch!r}")
    _check(self.remat in REMATS, "remat", f"must be one of {REMATS}, got {self.remat!r}")
    if self.rope_scaling is not None:
      rs = self.rope_scaling
      _check(isinstance(rs, dict), "rope_scaling", f"must be None or a dict, got {rs!r}")
      kind = rs.get("rope_type", rs.get("type"))
      _check(kind == "yarn", "rope_scaling", f"only YaRN is supported, got type {kind!r}")
      for key in ("factor", "original_max_position_embeddings"):
        _check(key in rs, "rope_scaling", f"YaRN needs {key!r}")
      _check(rs["factor"] >= 1, "rope_scaling", f"factor must be >= 1, got {rs['factor']}")

  # Derived sizes.
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.first_k_dense_replace

  @property
  def num_dense_layers(self) -> int:
    return self.first_k_dense_replace

  def __hash__(self) -> int:  # rope_scaling is a dict; hash the JSON form so cfg can be static.
    return hash(json.dumps(self.to_dict(), sort_keys=True))

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
    return cls(**d)


def _check(ok: bool, field: str, msg: str) -> None:
  if not ok:
    raise ValueError(f"ModelConfig.{field} {msg}")


def derive_routed_scaling_factor(n_experts: int, k: int, draws: int = 200_000,
                                 seed: int = 0) -> float:
  """Moonlight App. C recipe: mean of 1/sqrt(sum p^2) over normalised top-k sigmoid scores.

  Logits are standard normal; the k largest sigmoid scores are renormalised to sum 1.
  (64, 6) -> 2.446 (Moonlight) and (384, 8) -> 2.827 (Kimi K2).
  """
  rng = np.random.default_rng(seed)
  total, done = 0.0, 0
  while done < draws:
    n = min(20_000, draws - done)
    s = 1.0 / (1.0 + np.exp(-rng.standard_normal((n, n_experts))))
    top = -np.partition(-s, k - 1, axis=-1)[:, :k]
    p = top / top.sum(-1, keepdims=True)
    total += float((1.0 / np.sqrt((p * p).sum(-1))).sum())
    done += n
  return round(total / draws, 3)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """DS/HF `yarn_get_mscale`: 0.1 * mscale * ln(scale) + 1 for scale > 1."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
  """dq^-0.5, times mscale(factor, mscale_all_dim)^2 when YaRN is on (DeepSeek-V3)."""
  scale = cfg.qk_head_dim ** -0.5
  if cfg.rope_scaling is not None:
    m = yarn_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling.get("mscale_all_dim", 0.0))
    scale *= m * m
  return scale
