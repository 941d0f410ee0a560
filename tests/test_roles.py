"""Role split by parameter path: defaults on the K2 layout, plain dicts, overrides, errors."""

import jax
import jax.numpy as jnp
import pytest

from k2jax import presets
from k2jax.model import abstract_variables
from k2jax.optim import describe_roles, param_roles


def k2_layout(cfg):
  """Zero arrays with the documented k2jax.Transformer parameter layout (docs/INTERFACES.md)."""
  d, h, ld, lm = cfg.hidden_size, cfg.num_attention_heads, cfg.num_dense_layers, cfg.num_moe_layers
  dq, dkv = cfg.qk_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
  e, f, i = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.intermediate_size

  def attn(n):
    out = {"kv_a": {"kernel": (n, d, cfg.kv_lora_rank + cfg.qk_rope_head_dim)},
           "kv_a_norm": {"scale": (n, cfg.kv_lora_rank)},
           "kv_b": {"kernel": (n, cfg.kv_lora_rank, h * dkv)},
           "o": {"kernel": (n, h * cfg.v_head_dim, d)}}
    if cfg.q_lora_rank is None:
      return {**out, "q_proj": {"kernel": (n, d, h * dq)}}
    return {**out, "q_a": {"kernel": (n, d, cfg.q_lora_rank)},
            "q_a_norm": {"scale": (n, cfg.q_lora_rank)},
            "q_b": {"kernel": (n, cfg.q_lora_rank, h * dq)}}

  mlp = lambda n, w: {"gate": {"kernel": (n, d, w)}, "up": {"kernel": (n, d, w)},
                      "down": {"kernel": (n, w, d)}}
  shapes = {
    "embed": {"embedding": (cfg.vocab_size, d)},
    "dense_layers": {"attn_norm": {"scale": (ld, d)}, "attn": attn(ld),
                     "ffn_norm": {"scale": (ld, d)}, "mlp": mlp(ld, i)},
    "moe_layers": {"attn_norm": {"scale": (lm, d)}, "attn": attn(lm),
                   "ffn_norm": {"scale": (lm, d)},
                   "moe": {"router": {"kernel": (lm, d, e)},
                           "experts": {"gate": (lm, e, d, f), "up": (lm, e, d, f),
                                       "down": (lm, e, f, d)},
                           "shared": mlp(lm, cfg.n_shared_experts * f)}},
    "final_norm": {"scale": (d,)},
    "lm_head": {"kernel": (d, cfg.vocab_size)},
  }
  return jax.tree.map(jnp.zeros, shapes, is_leaf=lambda x: isinstance(x, tuple))


ADAMW = {"embed/embedding", "final_norm/scale", "lm_head/kernel"} | {
  f"{s}/{n}/scale" for s in ("dense_layers", "moe_layers")
  for n in ("attn_norm", "ffn_norm", "attn/q_a_norm", "attn/kv_a_norm")}


def test_k2_defaults():
  params = k2_layout(presets.get("k2_nano"))
  roles = describe_roles(params)
  assert {p for p, r in roles.items() if r == "adamw"} == ADAMW
  muon = {p for p, r in roles.items() if r.startswith("muon")}
  assert muon == set(roles) - ADAMW
  assert "moe_layers/moe/router/kernel" in muon
  assert roles["moe_layers/moe/experts/gate"] == "muon 3x16x[128, 64]"
  assert roles["dense_layers/attn/q_b/kernel"] == "muon 1x[64, 192]"


def test_router_bias_frozen_and_labels_tree():
  tree = {"params": {"w": jnp.zeros((4, 4))},
          "router": {"moe_layers": {"moe": {"e_score_correction_bias": jnp.zeros((2, 8))}}}}
  labels = param_roles(tree)
  assert labels == {"params": {"w": "muon"},
                    "router": {"moe_layers": {"moe": {"e_score_correction_bias": "frozen"}}}}


def test_plain_dict_of_matrices_is_all_muon():
  params = {"w1": jnp.zeros((8, 16)), "w2": jnp.zeros((16, 4)), "nested": {"k": jnp.zeros((3, 3))}}
  assert set(jax.tree.leaves(param_roles(params))) == {"muon"}
  assert param_roles({"b": jnp.zeros(8)}) == {"b": "adamw"}


def test_user_rules_override_defaults():
  params = {"moe": {"router": {"kernel": jnp.zeros((4, 8))}},
            "embed": {"embedding": jnp.zeros((9, 4))}, "w": jnp.zeros((4, 4))}
  labels = param_roles(params, [(r"router/", "adamw"), (r"^embed/", "muon"), (r"^w$", "frozen")])
  assert labels == {"moe": {"router": {"kernel": "adamw"}}, "embed": {"embedding": "muon"},
                    "w": "frozen"}


def test_bad_rules_raise():
  with pytest.raises(ValueError, match="not a matrix"):
    param_roles({"b": jnp.zeros(3)}, [(r"b", "muon")])
  with pytest.raises(ValueError, match="unknown role 'sgd'"):
    param_roles({}, [(r"x", "sgd")])
  with pytest.raises(ValueError, match="does not compile"):
    param_roles({}, [(r"(", "adamw")])
  with pytest.raises(ValueError, match="pair"):
    param_roles({}, ["adamw"])


@pytest.mark.parametrize("q_lora_rank", [64, None], ids=["q_lora", "q_proj"])
def test_real_model_matches_documented_layout(q_lora_rank):
  cfg = presets.get("k2_nano", q_lora_rank=q_lora_rank)
  params = abstract_variables(cfg)["params"]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, k2_layout(cfg))
  assert describe_roles(params) == describe_roles(k2_layout(cfg))
