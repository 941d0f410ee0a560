"""Parameter counts from shapes alone (jax.eval_shape: nothing is allocated)."""

from __future__ import annotations

import math

import jax

from k2jax.config import ModelConfig
from k2jax.model.transformer import abstract_variables, logical_axes


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Total and activated parameters, with and without the embedding and LM head, of the main
  model; "mtp": the multi-token-prediction layers' own parameters, counted apart as the papers do
  (DeepSeek-V3's 671B leave them out; they share the embedding and head).

  Activated counts every weight a token touches: all but the (E - k) / E unused share of the
  routed experts (the leaves with an "expert" axis). The router's correction bias is a buffer,
  not a parameter.
  """
  params = dict(abstract_variables(cfg)["params"])
  mtp = params.pop("mtp_layers", {})
  axes = jax.tree.leaves({k: v for k, v in logical_axes(cfg)["params"].items() if k in params},
                         is_leaf=lambda x: isinstance(x, tuple))
  sizes = [math.prod(leaf.shape) for leaf in jax.tree.leaves(params)]
  total = sum(sizes)
  routed = sum(n for n, a in zip(sizes, axes) if "expert" in a)
  embed_head = sum(n for n, a in zip(sizes, axes) if "vocab" in a)
  inactive = routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
  return {
      "total": total,
      "activated": total - inactive,
      "total_no_embed": total - embed_head,
      "activated_no_embed": total - inactive - embed_head,
      "mtp": sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(mtp)),
  }
