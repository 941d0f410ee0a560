"""ModelConfig <-> Hugging Face DeepseekV3 config dicts (hub `config.json` or transformers 5.x).

Reads both RoPE forms: the hub's legacy `rope_scaling` + `rope_theta` (model_type "kimi_k2" or
"deepseek_v3") and transformers 5.x `rope_parameters` (rope_theta inside). Writes the 5.x form,
which `transformers.DeepseekV3Config(**d)` accepts. Keys that do not change the function the model
computes (token ids, dtype, auto_map, quantization_config, ...) are ignored; values k2jax cannot
reproduce raise a one-line ValueError naming the field. `aux_loss_alpha` is a training choice, not
read from HF (DS-V3's hub value 0.001 is not the paper's 1e-4): the train config's
`loss.balance` weight sets it.
`rope_interleave: False` is accepted: the weights then need `from_torch_state_dict(...,
rope_interleave=False)`, which permutes the rotary rows into k2jax's interleaved layout.
"""

from __future__ import annotations

import dataclasses

from k2jax.config import ModelConfig

MODEL_TYPES = ("deepseek_v3", "kimi_k2")
# ModelConfig fields that are copied as they are (same name, same meaning in HF).
_COPIED = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
           "num_hidden_layers", "num_attention_heads", "n_shared_experts", "n_routed_experts",
           "num_experts_per_tok", "routed_scaling_factor", "n_group", "topk_group",
           "norm_topk_prob", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank",
           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rms_norm_eps",
           "max_position_embeddings")
# HF fields that must hold one value: (field, required value, default when absent).
_FIXED = (("tie_word_embeddings", False, False), ("attention_bias", False, False),
          ("hidden_act", "silu", "silu"), ("topk_method", "noaux_tc", "noaux_tc"),
          ("scoring_func", "sigmoid", "sigmoid"), ("moe_layer_freq", 1, 1),
          ("attention_dropout", 0.0, 0.0))
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "attention_factor", "truncate")
_HF_DEFAULT_THETA = 10000.0  # transformers' default_theta when a config names none.


def config_from_hf(d: dict, **overrides) -> ModelConfig:
  """ModelConfig from an HF DeepseekV3 / Kimi K2 config dict; `overrides` set any field after."""
  model_type = d.get("model_type", "deepseek_v3")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"HF config model_type must be one of {MODEL_TYPES}, got {model_type!r}")
  missing = [k for k in _COPIED if k not in d]
  if missing:
    raise ValueError(f"HF config lacks field {missing[0]!r}")
  for field, value, default in _FIXED:
    if d.get(field, default) != value:
      raise ValueError(f"HF config {field}={d[field]!r} is unsupported (k2jax needs {value!r})")
  heads = d.get("num_attention_heads")
  kv_heads = d.get("num_key_value_heads")
  if kv_heads is not None and kv_heads != heads:
    raise ValueError(f"HF config num_key_value_heads={kv_heads} must equal num_attention_heads="
                     f"{heads} (MLA has one key/value head per query head)")
  if d.get("rope_interleave", True) not in (True, False):
    raise ValueError(f"HF config rope_interleave must be a bool, got {d['rope_interleave']!r}")
  fields = {k: d[k] for k in _COPIED}
  fields["rope_theta"], fields["rope_scaling"] = _rope_from_hf(d)
  fields["num_nextn_predict_layers"] = d.get("num_nextn_predict_layers",
                                             d.get("num_mtp_layers", 0))
  if "initializer_range" in d:
    fields["init_std"] = d["initializer_range"]
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f"config_from_hf: unknown override {unknown[0]!r} (not a ModelConfig field)")
  return ModelConfig(**{**fields, **overrides})


def config_to_hf(cfg: ModelConfig) -> dict:
  """transformers 5.x DeepseekV3Config kwargs computing the same function as `cfg`."""
  d = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}
  d.update({k: getattr(cfg, k) for k in _COPIED})
  d.update(num_key_value_heads=cfg.num_attention_heads, rope_interleave=True,
           tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
           attention_dropout=0.0, num_nextn_predict_layers=cfg.num_nextn_predict_layers,
           initializer_range=cfg.init_std)
  rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
  if cfg.rope_scaling is not None:
    rope.update({k: cfg.rope_scaling[k] for k in _YARN_KEYS if k in cfg.rope_scaling},
                rope_type="yarn")
  d["rope_parameters"] = rope
  return d


def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
  """(rope_theta, ModelConfig.rope_scaling) from either HF RoPE form."""
  field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"  # transformers' order.
  rope = dict(d.get(field) or {})
  theta = rope.pop("rope_theta", d.get("rope_theta", _HF_DEFAULT_THETA))
  kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
  rope.pop("type", None)
  if kind == "default":
    if rope:
      raise ValueError(f"HF config {field} has keys {sorted(rope)} but no YaRN rope_type")
    return float(theta), None
  if kind != "yarn":
    raise ValueError(f"HF config {field} rope_type {kind!r} is unsupported (only 'yarn')")
  unknown = sorted(set(rope) - set(_YARN_KEYS))
  if unknown:
    raise ValueError(f"HF config {field} has unsupported YaRN key {unknown[0]!r}")
  # transformers' defaults: original length = max_position_embeddings, factor = their ratio.
  rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
  if rope.get("factor") is None:
    rope["factor"] = d["max_position_embeddings"] / rope["original_max_position_embeddings"]
  return float(theta), {"rope_type": "yarn", **rope}
